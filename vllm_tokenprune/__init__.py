"""Learned visual-token pruning for vision-language models served by vLLM.

At the root, the shared core every sub-package reads: ``policy`` (what a request gets, and
K) and ``families`` (the one table of model families); and ``cli``, the command line.
The sub-packages follow a request and a training run:

- ``serving``: everything that runs inside vLLM's processes: the plugin, the HTTP layer,
  metrics, and one module per model family.
- ``selection``: how K tokens are chosen: the methods and the learned selector's inference.
- ``training``: tower features, the reconstructor and loss, the training loop.
- ``testbed``: tiny checkpoints, synthetic scenes, the demo model.
- ``tools``: the command line's tools (serve, bench, eval) and the server launcher.

Importing this package never imports vLLM: the vLLM plugin (``serving.plugin.register``)
names its classes by ``"module:Class"`` strings and vLLM imports them when it needs them.
Nothing in the shared core, ``serving`` or ``selection`` imports ``training``, ``testbed`` or ``tools``.
"""

__version__ = "0.1.0"
