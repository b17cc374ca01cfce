"""Models and data made here, for tests and the demo: ``tiny`` (small random-weight
checkpoints of every served family), ``tokenizers`` (their tokenizers and chat templates),
``synthetic`` (scenes with answers by construction), ``demo_model`` (the demo VLM trained on
them, shipped in ``demo/``)."""
