"""Seeded random weights for a tiny checkpoint, and their names in the hub's layout."""

from __future__ import annotations

import math

import torch

# Persistent buffers that checkpoints hold, scales near 1 (Gemma 4's per-layer output scale).
_SCALE_BUFFERS = ("layer_scalar",)


def random_weights(model_class: str, config, seed: int) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights for every parameter of ``model_class(config)``, keyed as transformers names them.

    Scales keep activations O(1) at any width (std 1/sqrt(fan_in) for matrices, norms near
    1), so logits are spread out and greedy decoding is not decided by float noise.
    Norm weights and biases are random too, so a loader that skips one shows up as a
    different output, not as an identical default.
    """
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    norm_params = {
        f"{name}.{param}" if name else param
        for name, module in model.named_modules()
        if "norm" in type(module).__name__.lower()
        for param, _ in module.named_parameters(recurse=False)
    }
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, meta in model.state_dict().items():
        scale = name.endswith(_SCALE_BUFFERS)
        if name not in params and not scale:
            raise ValueError(f"{model_class} has a persistent buffer {name}; give it a value here")
        noise = torch.randn(meta.shape, generator=gen, dtype=torch.float32)
        if name in norm_params and name.endswith("weight") or scale:
            value = 1.0 + 0.1 * noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        elif meta.ndim == 3 and ".experts." in name:  # stacked linear weights: experts x out x in
            value = noise / meta.shape[-1] ** 0.5
        elif meta.ndim >= 2:
            value = noise / math.prod(meta.shape[1:]) ** 0.5  # 1 / sqrt(fan_in)
        else:
            value = noise / meta.numel() ** 0.5
        weights[name] = value.contiguous()
    return weights


def to_hub_layout(weights: dict[str, torch.Tensor], prefixes) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in weights.items():
        for old, new in prefixes:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = value
    return out
