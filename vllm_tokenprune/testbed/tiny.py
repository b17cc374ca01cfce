"""Tiny random-weight VLM checkpoints that both HF transformers and vLLM load.

``build_tiny(arch, out_dir)`` writes what a hub checkpoint of that family holds: config,
``model.safetensors`` (fp32, keys in the hub layout), generation config, tokenizer with a
chat template, processor configs. Everything is made here, with no hub access: the
tokenizer is a byte-level BPE trained on text generated in code, the weights come from
one seeded generator, so a seed gives byte-identical weights.

Never imports vLLM (the tests load these checkpoints into vLLM themselves).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_tokenprune.families import FAMILIES, by_name
from vllm_tokenprune.testbed.tokenizers import chatml_template, gemma_template, make_tokenizer, vicuna_template

ARCHES = tuple(f.name for f in FAMILIES)  # every family pruning serves, and only those
# The dtype vLLM's CPU build serves each tiny checkpoint in for tests that compare outputs: fp32
# (bf16, its default, would not match transformers), except where vLLM 0.32 has only a bf16
# CPU kernel: Qwen3.5's Gated DeltaNet layers ("CPU GDN attention requires BF16."), MoE too.
CPU_DTYPES = {"qwen3.5": "bfloat16", "qwen3.5-moe": "bfloat16"}


def cpu_dtype(arch: str) -> str:
    return CPU_DTYPES.get(arch, "float32")


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


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class _Arch:
    build: Callable  # Preset -> (config, processor)
    # transformers' state-dict prefix -> hub checkpoint prefix, first match wins
    hub_prefixes: tuple[tuple[str, str], ...]
    # any other change from transformers' names to the hub's (MoE experts)
    hub_names: Callable[[dict], dict] = dict


# LLaVA-family hub checkpoints predate transformers' `model.` nesting and keep the CLIP /
# SigLIP tower under `vision_model.` (vLLM's tower loaders expect that; transformers maps it).
_LLAVA_HUB_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)


def _text_config(p: Preset, tok, **family) -> dict:
    """The preset's text-model sizes and the tokenizer's ids, with ``family``'s own settings."""
    return {
        "vocab_size": len(tok),
        "hidden_size": p.text_hidden,
        "intermediate_size": p.text_intermediate,
        "num_hidden_layers": p.text_layers,
        "num_attention_heads": p.text_heads,
        "num_key_value_heads": p.text_kv_heads,
        "max_position_embeddings": p.max_position_embeddings,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": False,
        **family,
    }


def _llama_config(p: Preset, tok):
    from transformers import LlamaConfig

    return LlamaConfig(**_text_config(p, tok, rms_norm_eps=1e-5))


def _square_tower(p: Preset) -> dict:
    """The preset's sizes as CLIP and SigLIP vision configs name them."""
    return {
        "hidden_size": p.vision_hidden,
        "intermediate_size": p.vision_intermediate,
        "num_hidden_layers": p.vision_layers,
        "num_attention_heads": p.vision_heads,
        "image_size": p.image_size,
        "patch_size": p.patch_size,
    }


def _clip_config(p: Preset):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**_square_tower(p), projection_dim=p.text_hidden, hidden_act="quick_gelu")


def _clip_image_processor(p: Preset):
    from transformers import CLIPImageProcessor

    # CLIP's preprocessing (resize shortest edge, center crop), at the tower's input size.
    return CLIPImageProcessor(
        size={"shortest_edge": p.image_size},
        crop_size={"height": p.image_size, "width": p.image_size},
    )


def _llama_tokenizer(p: Preset):
    return make_tokenizer(p.vocab_size, p.max_position_embeddings,
        specials=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        extra={"image_token": "<image>"},
        add_bos=True,
    )


def _build_llava(p: Preset):
    from transformers import LlavaConfig, LlavaProcessor

    tok = _llama_tokenizer(p)
    tok.chat_template = vicuna_template("<image>")
    tokens_per_image = (p.image_size // p.patch_size) ** 2
    config = LlavaConfig(
        vision_config=_clip_config(p),
        text_config=_llama_config(p, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",  # drop CLS
        vision_feature_layer=-2,
        image_seq_length=tokens_per_image,
        tie_word_embeddings=False,
    )
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(p),
        tokenizer=tok,
        patch_size=p.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, dropped by the "default" strategy
        chat_template=tok.chat_template,
    )
    return config, processor


def _anyres_pinpoints(side: int, grids) -> list[list[int]]:
    """Resolutions (height, width) of the anyres tilings, in multiples of the tower's input side."""
    return [[side * rows, side * cols] for rows, cols in grids]


def _build_llava_next(p: Preset):
    from transformers import LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor

    tok = _llama_tokenizer(p)
    tok.chat_template = vicuna_template("<image>")
    # LLaVA-1.6's tilings (1x2, 2x1, 2x2, 1x3, 3x1 tiles of the tower's input).
    pinpoints = _anyres_pinpoints(p.image_size, [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)])
    config = LlavaNextConfig(
        vision_config=_clip_config(p),
        text_config=_llama_config(p, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=pinpoints,
        image_seq_length=(p.image_size // p.patch_size) ** 2,  # the base tile's share
        tie_word_embeddings=False,
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": p.image_size},
        crop_size={"height": p.image_size, "width": p.image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=p.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return config, processor


def _qwen_tokenizer(p: Preset, media: dict[str, str]):
    """Qwen2's special tokens plus the model's media tokens (``media``: attribute -> token)."""
    return make_tokenizer(p.vocab_size, p.max_position_embeddings,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *media.values()],
        bos=None,  # Qwen tokenizers add no bos
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=media,
        add_bos=False,
    )


_QWEN_VL_MEDIA = {
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}


def _qwen_vision_ids(tok) -> dict[str, int]:
    ids = tok.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _qwen_size(p: Preset, patch_size: int) -> dict[str, int]:
    """The Qwen processors' pixel budget (``size``) for the preset's tokens per image."""
    pixels_per_token = (patch_size * 2) ** 2  # 2 x 2 patches merge into one token
    return {"shortest_edge": p.qwen_min_tokens * pixels_per_token, "longest_edge": p.qwen_max_tokens * pixels_per_token}


def _mrope_section(head_dim: int, t_share: float) -> list[int]:
    """Split head_dim / 2 rotary frequencies over (t, h, w), h and w equal, as Qwen does."""
    half = head_dim // 2
    hw = round(half * (1 - t_share) / 2)
    return [half - 2 * hw, hw, hw]


def _qwen_text_config(p: Preset, tok, rope: dict) -> dict:
    return _text_config(p, tok, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", **rope},
                        bos_token_id=tok.pad_token_id)


def _build_qwen2_vl_family(p: Preset, config_class: str, processor_class: str, vision: dict):
    """Qwen2-VL and Qwen2.5-VL: one tokenizer, chat template, text model and processor; the
    towers differ (``vision``: the family's own vision-config keys)."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok = _qwen_tokenizer(p, _QWEN_VL_MEDIA)
    tok.chat_template = chatml_template(
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|><|video_pad|><|vision_end|>",
        default_system="You are a helpful assistant.",
    )
    head_dim = p.text_hidden // p.text_heads
    config = getattr(transformers, config_class)(
        # Both split 64 frequencies 16 / 24 / 24
        text_config=_qwen_text_config(p, tok, {"rope_theta": 1e6, "mrope_section": _mrope_section(head_dim, 0.25)}),
        vision_config=dict(
            depth=p.vision_layers,
            num_heads=p.vision_heads,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            **vision,
        ),
        **_qwen_vision_ids(tok),
        tie_word_embeddings=False,
    )
    size = _qwen_size(p, 14)
    processor = getattr(transformers, processor_class)(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2),
        tokenizer=tok,
        chat_template=tok.chat_template,
    )
    return config, processor


def _build_qwen2_vl(p: Preset):
    return _build_qwen2_vl_family(p, "Qwen2VLConfig", "Qwen2VLProcessor", dict(
        embed_dim=p.vision_hidden,
        mlp_ratio=p.vision_intermediate // p.vision_hidden,
        hidden_size=p.text_hidden,  # the merger's output, straight into the LM
    ))


def _build_qwen2_5_vl(p: Preset):
    return _build_qwen2_vl_family(p, "Qwen2_5_VLConfig", "Qwen2_5_VLProcessor", dict(
        hidden_size=p.vision_hidden,
        intermediate_size=p.vision_intermediate,
        out_hidden_size=p.text_hidden,  # the merger projects straight into the LM
        window_size=112,  # 4 x 4 merged tokens per window, as in the real model
        fullatt_block_indexes=[p.vision_layers - 1],  # windowed layers, then a full one
        tokens_per_second=2,
    ))


def _build_qwen3_family(p: Preset, config_class: str, text: dict, vision: dict):
    """Qwen3-VL and Qwen3.5: one tokenizer, chat template, tower layout and processor; the
    language models differ (``text``, ``vision``: the family's own config keys)."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tok = _qwen_tokenizer(p, _QWEN_VL_MEDIA)
    tok.chat_template = chatml_template(
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|><|video_pad|><|vision_end|>",
        default_system=None,
    )
    config = getattr(transformers, config_class)(
        text_config={**_qwen_text_config(p, tok, text.pop("rope")), **text},
        vision_config=dict(
            depth=p.vision_layers,
            hidden_size=p.vision_hidden,
            intermediate_size=p.vision_intermediate,
            num_heads=p.vision_heads,
            out_hidden_size=p.text_hidden,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=24 * 24,  # a square grid, interpolated to each image (real: 48 x 48)
            hidden_act="gelu_pytorch_tanh",
            **vision,
        ),
        **_qwen_vision_ids(tok),
        tie_word_embeddings=False,
    )
    size = _qwen_size(p, 16)
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
              "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **common),
        video_processor=Qwen3VLVideoProcessor(size=size, **common),
        tokenizer=tok,
        chat_template=tok.chat_template,
    )
    return config, processor


def _build_qwen3_vl(p: Preset):
    head_dim = p.text_hidden // p.text_heads
    # Qwen3-VL interleaves 64 frequencies 24 / 20 / 20 over (t, h, w)
    rope = {"rope_theta": 5e6, "mrope_section": _mrope_section(head_dim, 0.375), "mrope_interleaved": True}
    return _build_qwen3_family(p, "Qwen3VLConfig", {"rope": rope, "head_dim": head_dim}, {
        "deepstack_visual_indexes": list(range(p.vision_layers - 1)),  # all but the last, like 8/16/24 of 27
    })


def _build_qwen3_5(p: Preset, config_class: str = "Qwen3_5Config", **moe):
    # Qwen3.5 rotates a quarter of each 256-wide head, its 32 frequencies interleaved 11 / 11 / 10;
    # here a quarter of 128 (vLLM's CPU attention wants head_dim 32, 64, 80, ...).
    head_dim = 128
    rope = {"rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_interleaved": True,
            "mrope_section": _mrope_section(head_dim // 4, 0.5)}
    return _build_qwen3_family(p, config_class, {
        **moe,
        "rope": rope, "head_dim": head_dim,
        # Gated DeltaNet (linear attention) layers, then a full-attention one, as in 3:1
        "layer_types": ["linear_attention", "full_attention"] * (p.text_layers // 2),
        # the real model's head widths (vLLM's CPU kernel takes no others), one head
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 1,
        "linear_num_value_heads": 1, "linear_conv_kernel_dim": 4,
        # vLLM sizes a cache block so that its attention pages match one linear-attention
        # state; wide heads, all of them KV heads, keep that block short enough for a tiny
        # prompt to fill one (48 tokens)
        "num_key_value_heads": p.text_heads,
    }, {})  # no DeepStack


def _build_qwen3_5_moe(p: Preset):
    # Every feed-forward layer routes each token to 2 of 4 experts next to a shared expert
    # (the real model: 8 of 256, 40 layers)
    return _build_qwen3_5(p, "Qwen3_5MoeConfig", num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=p.text_intermediate // 2,
                          shared_expert_intermediate_size=p.text_intermediate // 2)


def _split_experts(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub MoE layout: one weight per expert (``experts.{e}.gate_proj.weight``, ...) where
    transformers keeps them stacked (``experts.gate_up_proj``: E x 2I x H, ``experts.down_proj``:
    E x H x I); transformers and vLLM both stack them again on load."""
    out = {}
    for name, value in weights.items():
        stem, _, param = name.rpartition(".")
        if stem.endswith("experts") and param == "gate_up_proj":
            for e, gate_up in enumerate(value):
                gate, up = gate_up.chunk(2)
                out[f"{stem}.{e}.gate_proj.weight"], out[f"{stem}.{e}.up_proj.weight"] = gate, up
        elif stem.endswith("experts") and param == "down_proj":
            out.update({f"{stem}.{e}.down_proj.weight": down for e, down in enumerate(value)})
        else:
            out[name] = value
    return {name: value.contiguous() for name, value in out.items()}


def _build_llava_onevision(p: Preset):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = _qwen_tokenizer(p, {"image_token": "<image>", "video_token": "<video>"})
    tok.chat_template = chatml_template("<image>\n", "<video>\n", default_system=None)
    tiles = range(1, p.onevision_max_tiles + 1)
    pinpoints = _anyres_pinpoints(p.image_size, itertools.product(tiles, tiles))
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_square_tower(p), vision_use_head=False),  # OneVision drops the head
        text_config=Qwen2Config(**_qwen_text_config(p, tok, {"rope_theta": 1e6})),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",  # SigLIP has no CLS to drop
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    side = {"height": p.image_size, "width": p.image_size}
    siglip_norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=side, image_grid_pinpoints=pinpoints, **siglip_norm),
        video_processor=LlavaOnevisionVideoProcessor(size=side, **siglip_norm),
        tokenizer=tok,
        num_image_tokens=(p.image_size // p.patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=tok.chat_template,
    )
    return config, processor


def _build_gemma3(p: Preset):
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig

    media = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    # vLLM's Gemma 3 processor looks up "\n" to "\n\n\n\n" as single tokens, as Gemma's vocabulary has them.
    tok = make_tokenizer(p.vocab_size, p.max_position_embeddings,
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", *media.values(),
                  *("\n" * n for n in range(1, 5))],
        bos="<bos>", eos="<end_of_turn>", pad="<pad>", extra=media, add_bos=False)
    tok.chat_template = gemma_template("<start_of_image>")
    head_dim = p.text_hidden // p.text_heads
    pooled_side = p.image_size // p.patch_size // p.gemma_pool  # the real model pools 64 x 64 patches 4 x 4
    config = Gemma3Config(
        text_config=Gemma3TextConfig(**_text_config(
            p, tok, head_dim=head_dim, query_pre_attn_scalar=head_dim, rms_norm_eps=1e-6,
            sliding_window=p.gemma_sliding_window, layer_types=["sliding_attention", "full_attention"] * (
                p.text_layers // 2))),  # local then global layers, as Gemma 3's 5:1 pattern
        vision_config=SiglipVisionConfig(**_square_tower(p), vision_use_head=False),
        mm_tokens_per_image=pooled_side**2,
        boi_token_index=tok.convert_tokens_to_ids(media["boi_token"]),
        eoi_token_index=tok.convert_tokens_to_ids(media["eoi_token"]),
        image_token_index=tok.convert_tokens_to_ids(media["image_token"]),
        tie_word_embeddings=False,
    )
    # Pan-and-scan stays off, as Gemma's processor has it unless a server turns it on.
    image_processor = Gemma3ImageProcessor(
        size={"height": p.image_size, "width": p.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template,
                                image_seq_length=pooled_side**2)
    return config, processor


def _build_gemma4(p: Preset):
    from transformers import (
        Gemma4AudioFeatureExtractor,  # the processor needs one; the tiny model has no audio tower
        Gemma4Config,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4TextConfig,
        Gemma4VideoProcessor,
        Gemma4VisionConfig,
    )

    media = {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>"}
    # Gemma 4's processor wants audio tokens in any tokenizer, with or without an audio tower.
    audio = {"boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"}
    tok = make_tokenizer(p.vocab_size, p.max_position_embeddings,
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", *media.values(),
                  "<|video|>", *audio.values()],
        bos="<bos>", eos="<end_of_turn>", pad="<pad>", extra={**media, **audio}, add_bos=False)
    tok.chat_template = gemma_template(media["image_token"])
    head_dim = p.text_hidden // p.text_heads
    ids = tok.convert_tokens_to_ids
    config = Gemma4Config(
        # Local then global layers, the global ones with twice as wide heads (the real model:
        # 256 and 512), and no per-layer input embeddings (as the larger Gemma 4 models).
        text_config=Gemma4TextConfig(**_text_config(
            p, tok, head_dim=head_dim, global_head_dim=2 * head_dim, rms_norm_eps=1e-6,
            sliding_window=p.gemma_sliding_window, hidden_size_per_layer_input=0,
            layer_types=["sliding_attention", "full_attention"] * (p.text_layers // 2))),
        vision_config=Gemma4VisionConfig(
            hidden_size=p.vision_hidden, intermediate_size=p.vision_intermediate,
            num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
            num_key_value_heads=p.vision_heads, head_dim=p.vision_hidden // p.vision_heads,
            patch_size=p.patch_size, pooling_kernel_size=3, position_embedding_size=1024,  # real: 10240
            default_output_length=p.gemma4_soft_tokens),
        audio_config=None,
        boi_token_id=ids(media["boi_token"]), eoi_token_id=ids(media["eoi_token"]),
        image_token_id=ids(media["image_token"]), video_token_id=ids("<|video|>"),
        boa_token_id=ids(audio["boa_token"]), eoa_token_index=ids(audio["eoa_token"]),
        audio_token_id=ids(audio["audio_token"]), tie_word_embeddings=False,
    )
    images = {"patch_size": p.patch_size, "pooling_kernel_size": 3, "max_soft_tokens": p.gemma4_soft_tokens}
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=Gemma4ImageProcessor(**images),
        video_processor=Gemma4VideoProcessor(**images), tokenizer=tok, chat_template=tok.chat_template,
        image_seq_length=p.gemma4_soft_tokens)
    return config, processor


def _build_internvl(p: Preset):
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    tok = _qwen_tokenizer(p, {"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    tok.chat_template = chatml_template("<IMG_CONTEXT>\n", "<video>\n", default_system=None)
    side = [p.image_size, p.image_size]
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=p.vision_hidden, intermediate_size=p.vision_intermediate,
            num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
            image_size=side, patch_size=[p.patch_size, p.patch_size]),
        text_config=Qwen2Config(**_qwen_text_config(p, tok, {"rope_theta": 1e6})),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(p.image_size // p.patch_size // 2) ** 2,  # 2 x 2 patches per token (pixel shuffle)
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drop CLS
        tie_word_embeddings=False,
    )
    size = {"height": p.image_size, "width": p.image_size}
    # Tiles of the tower's input side, up to internvl_max_tiles, plus a thumbnail (the real model: 12).
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1,
                                              max_patches=p.internvl_max_tiles),
        video_processor=InternVLVideoProcessor(size=size),
        tokenizer=tok,
        image_seq_length=config.image_seq_length,
        chat_template=tok.chat_template,
    )
    return config, processor


_QWEN2_HUB_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))
_ARCHES = {
    "llava": _Arch(_build_llava, _LLAVA_HUB_PREFIXES),
    # Hub Qwen2-VL and Qwen2.5-VL checkpoints keep the LM at the top level (`model.layers.*`, `visual.*`).
    "qwen2-vl": _Arch(_build_qwen2_vl, _QWEN2_HUB_PREFIXES),
    "qwen2.5-vl": _Arch(_build_qwen2_5_vl, _QWEN2_HUB_PREFIXES),
    "llava-next": _Arch(_build_llava_next, _LLAVA_HUB_PREFIXES),
    "llava-onevision": _Arch(_build_llava_onevision, _LLAVA_HUB_PREFIXES),
    # Qwen3-VL and Qwen3.5 were released with transformers' current layout (`model.language_model.*`),
    # Qwen3.5-MoE with one weight per expert.
    "qwen3-vl": _Arch(_build_qwen3_vl, ()),
    "qwen3.5": _Arch(_build_qwen3_5, ()),
    "qwen3.5-moe": _Arch(_build_qwen3_5_moe, (), _split_experts),
    # Gemma 3's hub checkpoints keep LLaVA's layout (`language_model.model.*`, `vision_tower.vision_model.*`).
    "gemma3": _Arch(_build_gemma3, _LLAVA_HUB_PREFIXES),
    # InternVL's "-hf" checkpoints were released with transformers' current layout.
    "internvl": _Arch(_build_internvl, ()),
    # Gemma 4 was released with transformers' current layout.
    "gemma4": _Arch(_build_gemma4, ()),
}


# --------------------------------------------------------------------------- weights


# Persistent buffers that checkpoints hold, scales near 1 (Gemma 4's per-layer output scale).
_SCALE_BUFFERS = ("layer_scalar",)


def _random_weights(model_class: str, config, seed: int) -> dict[str, torch.Tensor]:
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


def _to_hub_layout(weights: dict[str, torch.Tensor], prefixes) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in weights.items():
        for old, new in prefixes:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = value
    return out


# --------------------------------------------------------------------------- public API


def build_tiny(arch: str, out_dir: Path | str, seed: int = 0, preset: str = "test") -> Path:
    """Write a tiny random-weight checkpoint of ``arch`` into ``out_dir`` and return it."""
    from transformers import GenerationConfig

    stock = by_name(arch).stock  # the transformers class
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    spec = _ARCHES[arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # The weights come from their own generator; this pins anything else that draws randomness.
    torch.manual_seed(seed)
    config, processor = spec.build(PRESETS[preset])
    config.dtype = "float32"
    # Without it vLLM resolves model_type to the headless LlavaModel and runs it as a pooler.
    config.architectures = [stock]
    weights = _random_weights(stock, config, seed)
    save_file(spec.hub_names(_to_hub_layout(weights, spec.hub_prefixes)), out / "model.safetensors",
              metadata={"format": "pt"})
    config.save_pretrained(out)
    text = config.get_text_config()
    GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    ).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def image_token_id(path: Path | str) -> int:
    """The placeholder token id of a checkpoint's images."""
    config = json.loads((Path(path) / "config.json").read_text())
    return config.get("image_token_index", config.get("image_token_id"))


def count_image_tokens(path: Path | str, size: tuple[int, int]) -> int:
    """Placeholder tokens the checkpoint's HF processor gives one image of ``size`` (width, height)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    ids = processor(text=prompt, images=[Image.new("RGB", size)], return_tensors="pt")["input_ids"]
    return int((ids == image_token_id(path)).sum())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, choices=ARCHES)
    parser.add_argument("--out", required=True, type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same bytes)")
    parser.add_argument("--preset", default="test", choices=sorted(PRESETS), help="model sizes")
    parser.add_argument("--force", action="store_true", help="delete OUT first if it is not empty")


def run(args) -> int:
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not args.force:
            print(f"error: {out} exists and is not empty; pass --force to replace it", file=sys.stderr)
            return 2
        # Replace, not merge: a leftover file of another arch would change what loads.
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    build_tiny(args.arch, out, seed=args.seed, preset=args.preset)
    w, h = PRESETS[args.preset].probe_size
    print(f"wrote tiny {args.arch} ({args.preset} preset, seed {args.seed}) to {out}")
    print(f"image tokens for a {w}x{h} image: {count_image_tokens(out, (w, h))}")
    return 0
