"""Tiny Gemma 3 and Gemma 4 checkpoints."""

from __future__ import annotations

from vllm_tokenprune.testbed.tiny.parts import LLAVA_HUB_PREFIXES, Arch, square_tower, text_config
from vllm_tokenprune.testbed.tiny.presets import Preset
from vllm_tokenprune.testbed.tokenizers import gemma_template, make_tokenizer


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
        text_config=Gemma3TextConfig(**text_config(
            p, tok, head_dim=head_dim, query_pre_attn_scalar=head_dim, rms_norm_eps=1e-6,
            sliding_window=p.gemma_sliding_window, layer_types=["sliding_attention", "full_attention"] * (
                p.text_layers // 2))),  # local then global layers, as Gemma 3's 5:1 pattern
        vision_config=SiglipVisionConfig(**square_tower(p), vision_use_head=False),
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
        text_config=Gemma4TextConfig(**text_config(
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


# Gemma 3's hub checkpoints keep LLaVA's layout (`language_model.model.*`, `vision_tower.vision_model.*`).
GEMMA3 = Arch(_build_gemma3, LLAVA_HUB_PREFIXES)
# Gemma 4 was released with transformers' current layout.
GEMMA4 = Arch(_build_gemma4, ())
