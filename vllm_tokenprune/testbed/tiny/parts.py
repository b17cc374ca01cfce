"""What the family builders share: the builder record, the text model and tokenizers built
from a preset, and the CLIP / SigLIP tower settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vllm_tokenprune.testbed.tiny.presets import Preset
from vllm_tokenprune.testbed.tokenizers import make_tokenizer


@dataclass(frozen=True)
class Arch:
    """A family's tiny checkpoint: how it is built and how its weights are named on the hub."""

    build: Callable  # Preset -> (config, processor)
    # transformers' state-dict prefix -> hub checkpoint prefix, first match wins
    hub_prefixes: tuple[tuple[str, str], ...]
    # any other change from transformers' names to the hub's (MoE experts)
    hub_names: Callable[[dict], dict] = dict


# LLaVA-family hub checkpoints predate transformers' `model.` nesting and keep the CLIP /
# SigLIP tower under `vision_model.` (vLLM's tower loaders expect that; transformers maps it).
LLAVA_HUB_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)


def text_config(p: Preset, tok, **family) -> dict:
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


def llama_config(p: Preset, tok):
    from transformers import LlamaConfig

    return LlamaConfig(**text_config(p, tok, rms_norm_eps=1e-5))


def square_tower(p: Preset) -> dict:
    """The preset's sizes as CLIP and SigLIP vision configs name them."""
    return {
        "hidden_size": p.vision_hidden,
        "intermediate_size": p.vision_intermediate,
        "num_hidden_layers": p.vision_layers,
        "num_attention_heads": p.vision_heads,
        "image_size": p.image_size,
        "patch_size": p.patch_size,
    }


def clip_config(p: Preset):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**square_tower(p), projection_dim=p.text_hidden, hidden_act="quick_gelu")


def clip_image_processor(p: Preset):
    from transformers import CLIPImageProcessor

    # CLIP's preprocessing (resize shortest edge, center crop), at the tower's input size.
    return CLIPImageProcessor(
        size={"shortest_edge": p.image_size},
        crop_size={"height": p.image_size, "width": p.image_size},
    )


def llama_tokenizer(p: Preset):
    return make_tokenizer(p.vocab_size, p.max_position_embeddings,
        specials=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        extra={"image_token": "<image>"},
        add_bos=True,
    )


def qwen_tokenizer(p: Preset, media: dict[str, str]):
    """Qwen2's special tokens plus the model's media tokens (``media``: attribute -> token)."""
    return make_tokenizer(p.vocab_size, p.max_position_embeddings,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *media.values()],
        bos=None,  # Qwen tokenizers add no bos
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=media,
        add_bos=False,
    )


def qwen_text_config(p: Preset, tok, rope: dict) -> dict:
    return text_config(p, tok, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", **rope},
                        bos_token_id=tok.pad_token_id)


def anyres_pinpoints(side: int, grids) -> list[list[int]]:
    """Resolutions (height, width) of the anyres tilings, in multiples of the tower's input side."""
    return [[side * rows, side * cols] for rows, cols in grids]
