"""Tiny LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision checkpoints."""

from __future__ import annotations

import itertools

from vllm_tokenprune.testbed.tiny.parts import (
    LLAVA_HUB_PREFIXES,
    Arch,
    anyres_pinpoints,
    clip_config,
    clip_image_processor,
    llama_config,
    llama_tokenizer,
    qwen_text_config,
    qwen_tokenizer,
    square_tower,
)
from vllm_tokenprune.testbed.tiny.presets import Preset
from vllm_tokenprune.testbed.tokenizers import chatml_template, vicuna_template


def _build_llava(p: Preset):
    from transformers import LlavaConfig, LlavaProcessor

    tok = llama_tokenizer(p)
    tok.chat_template = vicuna_template("<image>")
    tokens_per_image = (p.image_size // p.patch_size) ** 2
    config = LlavaConfig(
        vision_config=clip_config(p),
        text_config=llama_config(p, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",  # drop CLS
        vision_feature_layer=-2,
        image_seq_length=tokens_per_image,
        tie_word_embeddings=False,
    )
    processor = LlavaProcessor(
        image_processor=clip_image_processor(p),
        tokenizer=tok,
        patch_size=p.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, dropped by the "default" strategy
        chat_template=tok.chat_template,
    )
    return config, processor


def _build_llava_next(p: Preset):
    from transformers import LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor

    tok = llama_tokenizer(p)
    tok.chat_template = vicuna_template("<image>")
    # LLaVA-1.6's tilings (1x2, 2x1, 2x2, 1x3, 3x1 tiles of the tower's input).
    pinpoints = anyres_pinpoints(p.image_size, [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)])
    config = LlavaNextConfig(
        vision_config=clip_config(p),
        text_config=llama_config(p, tok),
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


def _build_llava_onevision(p: Preset):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = qwen_tokenizer(p, {"image_token": "<image>", "video_token": "<video>"})
    tok.chat_template = chatml_template("<image>\n", "<video>\n", default_system=None)
    tiles = range(1, p.onevision_max_tiles + 1)
    pinpoints = anyres_pinpoints(p.image_size, itertools.product(tiles, tiles))
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**square_tower(p), vision_use_head=False),  # OneVision drops the head
        text_config=Qwen2Config(**qwen_text_config(p, tok, {"rope_theta": 1e6})),
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


LLAVA = Arch(_build_llava, LLAVA_HUB_PREFIXES)
LLAVA_NEXT = Arch(_build_llava_next, LLAVA_HUB_PREFIXES)
LLAVA_ONEVISION = Arch(_build_llava_onevision, LLAVA_HUB_PREFIXES)
