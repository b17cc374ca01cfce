"""Models and data made here, for tests and the demo: ``tiny`` (small random-weight
checkpoints of every served family), ``tokenizers`` (their tokenizers and chat templates),
``synthetic`` and ``clutter`` (scenes with answers by construction), ``tasks`` (their
questions and eval sets), ``demo_build`` (the demo VLM: tokenizer, processor, config) and
``demo_model`` (its training on them; the result is shipped in ``demo/``)."""
