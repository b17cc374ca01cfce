"""Learned visual-token pruning for vision-language models served by vLLM.

Importing this package never imports vLLM: the vLLM plugin (``plugin.register``) names
its classes by ``"module:Class"`` strings and vLLM imports them when it needs them.
"""

__version__ = "0.1.0"
