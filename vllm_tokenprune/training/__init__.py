"""``vllm-tokenprune train``: ``features`` (the tower's output for an image folder),
``reconstruction`` (the reconstructor, the loss, checkpoint writing), ``train`` (the loop)
and ``options`` (dataclass fields as command-line options, the learning-rate schedule)."""
