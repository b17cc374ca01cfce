"""One module per model family: its pruning processor and its pruned model class.

These modules import vLLM; only vLLM imports them (through the plugin's registry strings).
"""
