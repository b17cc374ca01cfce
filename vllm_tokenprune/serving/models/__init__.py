"""One module per model family: its pruning processor and its pruned model class, built
on the two halves every family shares, ``processor`` (in the API server) and ``model`` (in
the workers), and the fields between them (``common``).

These modules import vLLM; only vLLM imports them (through the plugin's registry strings).
"""
