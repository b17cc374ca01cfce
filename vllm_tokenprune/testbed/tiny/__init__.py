"""Tiny random-weight VLM checkpoints that both HF transformers and vLLM load.

``build_tiny(arch, out_dir)`` writes what a hub checkpoint of that family holds: config,
``model.safetensors`` (fp32, keys in the hub layout), generation config, tokenizer with a
chat template, processor configs. Everything is made here, with no hub access: the
tokenizer is a byte-level BPE trained on text generated in code, the weights come from
one seeded generator, so a seed gives byte-identical weights.

``presets`` holds the model sizes, ``parts`` what the builders share, ``weights`` the seeded
weights and their hub names; ``llava``, ``qwen``, ``gemma`` and ``internvl`` build each family,
which its row in ``families`` names.

Never imports vLLM (the tests load these checkpoints into vLLM themselves).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_tokenprune.families import FAMILIES, by_name
from vllm_tokenprune.testbed.tiny.parts import Arch
from vllm_tokenprune.testbed.tiny.presets import PRESETS
from vllm_tokenprune.testbed.tiny.weights import random_weights, to_hub_layout

ARCHES = tuple(f.name for f in FAMILIES)  # every family pruning serves, and only those
# The dtype vLLM's CPU build serves each tiny checkpoint in for tests that compare outputs: fp32
# (bf16, its default, would not match transformers), except where vLLM 0.32 has only a bf16
# CPU kernel: Qwen3.5's Gated DeltaNet layers ("CPU GDN attention requires BF16."), MoE too.
CPU_DTYPES = {"qwen3.5": "bfloat16", "qwen3.5-moe": "bfloat16"}


def cpu_dtype(arch: str) -> str:
    return CPU_DTYPES.get(arch, "float32")


def _builder(arch: str) -> Arch:
    """The builder its family's row names."""
    module, name = by_name(arch).tiny_builder.split(":")
    return getattr(importlib.import_module(module), name)


def build_tiny(arch: str, out_dir: Path | str, seed: int = 0, preset: str = "test") -> Path:
    """Write a tiny random-weight checkpoint of ``arch`` into ``out_dir`` and return it."""
    from transformers import GenerationConfig

    stock = by_name(arch).stock  # the transformers class
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    spec = _builder(arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # The weights come from their own generator; this pins anything else that draws randomness.
    torch.manual_seed(seed)
    config, processor = spec.build(PRESETS[preset])
    config.dtype = "float32"
    # Without it vLLM resolves model_type to the headless LlavaModel and runs it as a pooler.
    config.architectures = [stock]
    weights = random_weights(stock, config, seed)
    save_file(spec.hub_names(to_hub_layout(weights, spec.hub_prefixes)), out / "model.safetensors",
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
