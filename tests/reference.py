"""The stock model's answer, from HF transformers in fp32: what pruned serving at keep
1.0 must reproduce token for token."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

NEW_TOKENS = 8
QUESTION = "What is shown in this image?"
# Gemma 3 attends bidirectionally within an image in transformers and on vLLM's GPU attention;
# vLLM 0.32's CPU attention has no such ranges and attends causally, as transformers does
# without token_type_ids. The reference follows the machine the tests run on.
CAUSAL_IMAGE_ATTENTION_ON_CPU = ("gemma3",)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels, so the vision tower's output matters to the answer."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def chat(images, image_item, question: str = QUESTION) -> list[dict]:
    content = [image_item(image) for image in images] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def hf_model(path):
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    model_class = getattr(transformers, config.architectures[0])
    model, info = model_class.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def stock_greedy(path, images, dtype: str, new_tokens: int = NEW_TOKENS):
    """The stock model's prompt ids and greedy tokens: transformers' in fp32; in bf16 (families
    vLLM runs only in bf16 on CPU, ``tiny.CPU_DTYPES``) vLLM's own stock architecture, since
    bf16 kernels differ between the two."""
    if dtype == "float32":
        return hf_greedy(path, images, new_tokens)[:2]
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), dtype=dtype, enforce_eager=True, max_model_len=4096, seed=0,
              limit_mm_per_prompt={"image": max(1, len(images))})
    try:
        (out,) = llm.chat(chat(images, lambda image: {"type": "image_pil", "image_pil": image}),
                          SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    return list(out.prompt_token_ids), list(out.outputs[0].token_ids)


def hf_greedy(path, images, new_tokens: int = NEW_TOKENS):
    """transformers' prompt ids, greedy tokens and their logprobs for a chat with ``images``."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model, _ = hf_model(path)
    inputs = processor.apply_chat_template(
        chat(images, lambda image: {"type": "image", "image": image}),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )
    if model.config.model_type in CAUSAL_IMAGE_ATTENTION_ON_CPU:
        inputs.pop("token_type_ids")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # vLLM's min_tokens: both mask eos the same way
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt = inputs["input_ids"][0].tolist()
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0], -1)[t].item() for step, t in zip(out.logits, tokens)]
    return prompt, tokens, logprobs
