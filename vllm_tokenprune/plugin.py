"""vLLM plugin entry point (group ``vllm.general_plugins``).

vLLM calls ``register()`` once in every process it starts (API server, engine core,
workers, the model-inspection subprocess), so it must be cheap and safe to call again.
"""

from __future__ import annotations

# Pruned architecture name -> "module:Class". Registered lazily: vLLM imports the module
# only when a model with that architecture is loaded.
PRUNED_MODELS: dict[str, str] = {}


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in PRUNED_MODELS.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
