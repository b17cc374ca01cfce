"""Timing parts of the work against each other, and the vision towers at real model shapes.

The host's slow stretches (and a GPU's clock changes) hit whatever runs at that moment,
so parts compared with each other are timed in interleaved rounds, one call of each per
round, and reported as medians. Used by ``bench`` (the checkpoint's own tower and
selector), ``tools/costs.py`` (each method next to the tower) and
``benchmarks/real_shapes.py`` (tower, selector and prefill at real sizes). Needs torch and
transformers only: it runs on a bare GPU machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(parts: Mapping[str, Callable[[], object]], rounds: int, *, device: str = "cpu",
                prepare: Callable[[], object] | None = None, every: Mapping[str, int] | None = None,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds of each part over ``rounds`` interleaved rounds, in the order given.

    ``prepare`` runs untimed before each round (a fresh input, say); a part named in
    ``every`` runs only every n-th round (a slow tower next to fast methods). Each part
    runs ``warmup`` times first, untimed.
    """
    every = every or {}
    times: dict[str, list[float]] = {name: [] for name in parts}
    with torch.inference_mode():
        for _ in range(warmup):
            if prepare:
                prepare()
            for fn in parts.values():
                fn()
        sync(device)
        for r in range(rounds):
            if prepare:
                prepare()
            for name, fn in parts.items():
                if r % every.get(name, 1):
                    continue
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# Vision towers of served models, with random weights (timings do not depend on them).
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14)
QWEN2_5_VL_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                     fullatt_block_indexes=[7, 15, 23, 31])


def vit_tower(kind: str, device, dtype, batch: int = 1, **overrides) -> tuple[Callable[[], torch.Tensor], int, int]:
    """A CLIP ("clip") or SigLIP ("siglip") tower on ``batch`` random images: (forward, tokens, width).
    ``overrides`` change its config (vLLM builds LLaVA-1.5's CLIP only up to layer 23 of 24)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    spec = {**(CLIP_L_336 if kind == "clip" else SIGLIP_SO400M_384), **overrides}
    config_cls, model_cls = ((CLIPVisionConfig, CLIPVisionModel) if kind == "clip"
                             else (SiglipVisionConfig, SiglipVisionModel))
    with torch.device(device):
        model = model_cls(config_cls(**spec)).to(dtype).eval()
    pixels = torch.randn(batch, 3, spec["image_size"], spec["image_size"], device=device, dtype=dtype)
    side = spec["image_size"] // spec["patch_size"]
    tokens = side * side + (kind == "clip")  # CLIP adds a [CLS] token
    return (lambda: model(pixels).last_hidden_state), tokens, spec["hidden_size"]


def qwen_tower(device, dtype, side: int = 448, batch: int = 1,
               **overrides) -> tuple[Callable[[], torch.Tensor], int, int]:
    """Qwen2.5-VL-7B's tower on ``batch`` random ``side`` x ``side`` images: (forward, merged
    tokens per image, width). ``overrides`` change its config."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = Qwen2_5_VLVisionConfig(**{**QWEN2_5_VL_7B, **overrides})
    with torch.device(device):
        model = Qwen2_5_VisionTransformerPretrainedModel(config).to(dtype).eval()
    patches = side // config.patch_size
    grid = torch.tensor([[1, patches, patches]] * batch, device=device)
    channels = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    pixels = torch.randn(batch * patches * patches, channels, device=device, dtype=dtype)
    merged = patches * patches // config.spatial_merge_size ** 2
    return (lambda: model(pixels, grid_thw=grid).pooler_output), merged, config.out_hidden_size
