"""Tiny Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and Qwen3.5-MoE checkpoints."""

from __future__ import annotations

import torch

from vllm_tokenprune.testbed.tiny.parts import Arch, qwen_text_config, qwen_tokenizer
from vllm_tokenprune.testbed.tiny.presets import Preset
from vllm_tokenprune.testbed.tokenizers import chatml_template

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


def _build_qwen2_vl_family(p: Preset, config_class: str, processor_class: str, vision: dict):
    """Qwen2-VL and Qwen2.5-VL: one tokenizer, chat template, text model and processor; the
    towers differ (``vision``: the family's own vision-config keys)."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok = qwen_tokenizer(p, _QWEN_VL_MEDIA)
    tok.chat_template = chatml_template(
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|><|video_pad|><|vision_end|>",
        default_system="You are a helpful assistant.",
    )
    head_dim = p.text_hidden // p.text_heads
    config = getattr(transformers, config_class)(
        # Both split 64 frequencies 16 / 24 / 24
        text_config=qwen_text_config(p, tok, {"rope_theta": 1e6, "mrope_section": _mrope_section(head_dim, 0.25)}),
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

    tok = qwen_tokenizer(p, _QWEN_VL_MEDIA)
    tok.chat_template = chatml_template(
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|><|video_pad|><|vision_end|>",
        default_system=None,
    )
    config = getattr(transformers, config_class)(
        text_config={**qwen_text_config(p, tok, text.pop("rope")), **text},
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


# Hub Qwen2-VL and Qwen2.5-VL checkpoints keep the LM at the top level (`model.layers.*`, `visual.*`).
_QWEN2_HUB_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))
QWEN2_VL = Arch(_build_qwen2_vl, _QWEN2_HUB_PREFIXES)
QWEN2_5_VL = Arch(_build_qwen2_5_vl, _QWEN2_HUB_PREFIXES)
# Qwen3-VL and Qwen3.5 were released with transformers' current layout (`model.language_model.*`),
# Qwen3.5-MoE with one weight per expert.
QWEN3_VL = Arch(_build_qwen3_vl, ())
QWEN3_5 = Arch(_build_qwen3_5, ())
QWEN3_5_MOE = Arch(_build_qwen3_5_moe, (), _split_experts)
