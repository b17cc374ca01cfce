"""``vllm-tokenprune train``: ``features`` (the tower's output for images), ``store`` (those
features on disk in shards), ``ragged`` (features of images of several token counts, and
their padded batches), ``stream`` (batches, evaluation chunks and statistics read one
shard at a time), ``reconstruction`` (the reconstructor, the loss, checkpoint writing),
``evaluation`` (learned vs random on held-out images), ``train`` (the loop and the command),
``budget`` (the predictor behind ``auto``), ``query`` (``train-query``: the question-reading
selector), ``state`` (what ``--resume`` continues from), ``curves`` (the log and its plot)
and ``options`` (dataclass fields as command-line options, the learning-rate schedule)."""
