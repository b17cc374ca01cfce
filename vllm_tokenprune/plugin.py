"""vLLM plugin entry point (group ``vllm.general_plugins``).

vLLM calls ``register()`` once in every process it starts (API server, engine core,
workers, the model-inspection subprocess), so it must be cheap and safe to call again.
Models are registered by ``"module:Class"`` strings: vLLM imports a module only when a
model with that architecture is loaded, and importing this package never imports vLLM.
"""

from __future__ import annotations

# Stock architecture -> the pruned architecture that serves it. Select one with
# --hf-overrides '{"architectures": ["<pruned>"]}' (``vllm-tokenprune serve`` does).
PRUNED_ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": "PrunedLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "PrunedLlavaNextForConditionalGeneration",
}

# Pruned architecture -> "module:Class".
PRUNED_MODELS: dict[str, str] = {
    "PrunedLlavaForConditionalGeneration":
        "vllm_tokenprune.models.llava:PrunedLlavaForConditionalGeneration",
    "PrunedLlavaNextForConditionalGeneration":
        "vllm_tokenprune.models.llava_next:PrunedLlavaNextForConditionalGeneration",
}


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in PRUNED_MODELS.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
