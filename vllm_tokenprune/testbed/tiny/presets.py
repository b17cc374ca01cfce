"""Model sizes of the tiny checkpoints: ``test`` (fast, for tests) and ``bench`` (prefill-bound)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """Model sizes. Family constants (patch sizes of Qwen towers, merge sizes, ...) are not here."""

    # language model (vLLM's CPU attention needs head_dim in {32, 64, 80, ...}: 128 / 4 = 32)
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    vocab_size: int = 512  # byte alphabet + special tokens + BPE merges
    max_position_embeddings: int = 4096
    # vision tower
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 128
    # CLIP / SigLIP towers: square input side and patch (168 / 14 -> 12 x 12 = 144 tokens)
    image_size: int = 168
    patch_size: int = 14
    # LLaVA-OneVision: anyres tilings up to N x N tiles (the real model: 6 x 6 of 384 px); at
    # 4 x 4 the largest images exceed anyres_max_9 and are interpolated down, as on the real model
    onevision_max_tiles: int = 4
    # Gemma 3: patches pooled k x k into one token (the real model: 4 x 4), local attention window
    gemma_pool: int = 2
    gemma_sliding_window: int = 64
    # Gemma 4: pooled tokens an image may have (its processor takes 70, 140, 280, 560, 1120)
    gemma4_soft_tokens: int = 70
    # InternVL: tiles of the tower's input per image, before the thumbnail (the real model: 12)
    internvl_max_tiles: int = 6
    # Qwen towers: token budget per image (the processor resizes into it)
    qwen_min_tokens: int = 4
    qwen_max_tokens: int = 256
    # image size whose token count `run` reports (wide, to show the anyres / dynamic layouts)
    probe_size: tuple[int, int] = (336, 252)


PRESETS = {
    "test": Preset(),
    # Prefill-bound on a CPU: a Llama LM of ~300M parameters (hidden 1536, 12 layers,
    # 24 heads / 6 KV heads) behind a cheap 2-layer CLIP tower at 336 px (576 image
    # tokens, like LLaVA-1.5), so language-model prefill dominates time-to-first-token.
    # Served in bf16 (vLLM's CPU default; fp32 is several times slower).
    "bench": Preset(
        text_hidden=1536, text_layers=12, text_heads=24, text_kv_heads=6,
        text_intermediate=4096, vision_hidden=128, vision_layers=2, vision_heads=2,
        vision_intermediate=512, image_size=336, probe_size=(336, 336),
    ),
}
