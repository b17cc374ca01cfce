"""A tiny InternVL checkpoint (the "-hf" layout transformers reads)."""

from __future__ import annotations

from vllm_tokenprune.testbed.tiny.parts import Arch, qwen_text_config, qwen_tokenizer
from vllm_tokenprune.testbed.tiny.presets import Preset
from vllm_tokenprune.testbed.tokenizers import chatml_template


def _build_internvl(p: Preset):
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    tok = qwen_tokenizer(p, {"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    tok.chat_template = chatml_template("<IMG_CONTEXT>\n", "<video>\n", default_system=None)
    side = [p.image_size, p.image_size]
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=p.vision_hidden, intermediate_size=p.vision_intermediate,
            num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
            image_size=side, patch_size=[p.patch_size, p.patch_size]),
        text_config=Qwen2Config(**qwen_text_config(p, tok, {"rope_theta": 1e6})),
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


# InternVL's "-hf" checkpoints were released with transformers' current layout.
INTERNVL = Arch(_build_internvl, ())
