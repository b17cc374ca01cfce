"""Tokenizers and chat templates for the checkpoints made here, with no hub access: a
byte-level BPE trained on text generated in code (deterministic: the same ids every time),
and the LLaVA-1.5 (Vicuna) and Qwen (ChatML) templates over image and video items."""

from __future__ import annotations

import itertools

_COLORS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
_SHAPES = ("square", "circle", "triangle", "star", "line", "dot")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_PLACES = ("left", "right", "top", "bottom", "center", "corner")
_PROSE = (
    "What is shown in this image? Describe the picture in detail.",
    "The image shows a small scene with a few simple shapes on a plain background.",
    "How many shapes are there? Which colour appears the most? Answer with one word.",
    "You are a helpful assistant. Please answer the question about the image.",
    "There is a cat on the table, a dog near the door and a bird in the sky.",
    "A photo of a street with cars, people, trees, houses and a blue sky above.",
    "Yes. No. Maybe. I think so. I am not sure. It is hard to tell from this picture.",
    "0 1 2 3 4 5 6 7 8 9 10 12 16 32 64 100 128 256 512 1024",
    # words of the chat templates, so prompts do not fall apart into single bytes
    "USER: What is this? ASSISTANT: It is a picture.",
    "system user assistant",
)


def _corpus() -> list[str]:
    """Fixed training text: a little prose plus every colour / shape / number / place phrase."""
    lines = list(_PROSE)
    for color, shape, number, place in itertools.product(_COLORS, _SHAPES, _NUMBERS, _PLACES):
        lines.append(f"There are {number} {color} {shape}s at the {place} of the image.")
    return lines


def make_tokenizer(vocab_size: int, max_length: int, specials: list[str], bos: str | None, eos: str,
                   pad: str, extra: dict[str, str], add_bos: bool):
    """Byte-level BPE; ``specials`` take the first ids, in order (training is deterministic).

    ``extra`` names model tokens (``image_token`` -> ``<image>``) so the processors find them
    as tokenizer attributes; ``add_bos`` makes plain encoding prepend bos, like Llama's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"the generated corpus yields {tok.get_vocab_size()} tokens, not {vocab_size}")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=extra,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


# Content items of type "image" (HF) and "image_url" (OpenAI style) both become the image
# placeholder. Every tag strips surrounding whitespace, so newlines come only from '\n'
# inside string literals (a literal newline in the template would be eaten).

_CONTENT = (
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] in ['image', 'image_url'] -%}{{- IMAGE -}}"
    "{%- elif item['type'] in ['video', 'video_url'] -%}{{- VIDEO -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
)


def vicuna_template(image: str) -> str:
    """LLaVA-1.5's conversation format: ``USER: <image>\\nquestion ASSISTANT: answer</s>``."""
    return (
        "{%- set IMAGE = '" + image + "\\n' -%}{%- set VIDEO = '' -%}"
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] != 'system' -%}{{- message['role'].upper() + ': ' -}}{%- endif -%}"
        + _CONTENT +
        "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
        "{{- ' ' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


def chatml_template(image: str, video: str, default_system: str | None) -> str:
    """Qwen's ChatML format: ``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``."""
    system = (
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{- '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' -}}"
        "{%- endif -%}"
        if default_system
        else ""
    )
    return (
        "{%- set IMAGE = '" + image + "' -%}{%- set VIDEO = '" + video + "' -%}"
        + system +
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        + _CONTENT +
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def gemma_template(image: str) -> str:
    """Gemma's turns: ``<bos><start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n``."""
    return (
        "{%- set IMAGE = '" + image + "' -%}{%- set VIDEO = '' -%}"
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}"
        + _CONTENT +
        "{{- '<end_of_turn>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
    )
