"""Models and data made here, for tests and the demo: ``tiny`` (small random-weight
checkpoints of every served family), ``tokenizers`` (their tokenizers and chat templates),
``synthetic`` and ``clutter`` (scenes with answers by construction), ``tasks`` (their
questions and eval sets), ``demo_model`` (the demo VLM trained on them, shipped in
``demo/``)."""
