"""Every question-answering variant of the testbed behind one interface, and eval sets.

    vllm-tokenprune make-eval-set --variant clutter --split test --n 400 --out DIR

Variants: ``textured`` and ``plain`` (the shapes task, ``synthetic``), ``clutter`` and
``clutter-plain`` (the clutter task, ``clutter``). A scene has ``question(kind)``,
``answer(kind)`` and ``content_patches()``; item ``index`` of a split asks question kind
``index mod len(kinds)``, so every set is balanced over its kinds.

``--shown-scale LOW,HIGH`` shows each scene at another size, as real images arrive (the
processor resizes them back to the tower's input): a square of side ``TASK_IMAGE_SIZE x s``, s
log-uniform in [LOW, HIGH] per item, resampled bicubically. The answers do not change.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_tokenprune.testbed import clutter, synthetic
from vllm_tokenprune.testbed.synthetic import SPLITS, TASK_IMAGE_SIZE, scene_seed

VARIANTS = synthetic.VARIANTS + clutter.VARIANTS


def kinds(variant: str) -> tuple[str, ...]:
    """The question kinds of ``variant``."""
    return tuple(clutter.QUESTIONS if variant in clutter.VARIANTS else synthetic.QUESTIONS)


def make_scene(variant: str, seed: int) -> Any:
    if variant in clutter.VARIANTS:
        return clutter.make_clutter_scene(variant, seed)
    return synthetic.make_scene(variant, seed)


@dataclass
class Item:
    scene: Any
    kind: str
    question: str
    answer: str


def item(variant: str, split: str, index: int, kind: str | None = None) -> Item:
    """Item ``index`` of ``split``: its scene and a question (by default the balanced one)."""
    scene = make_scene(variant, scene_seed(split, index))
    kind = kind or kinds(variant)[index % len(kinds(variant))]
    return Item(scene, kind, scene.question(kind), scene.answer(kind))


def shown(image, seed: int, scales: tuple[float, float]):
    """``image`` as it arrives at another size: a square of side TASK_IMAGE_SIZE x s, s
    log-uniform in ``scales`` (drawn from ``seed``), resampled bicubically."""
    from PIL import Image

    low, high = (math.log(s) for s in scales)
    side = max(1, round(TASK_IMAGE_SIZE * math.exp(random.Random(seed).uniform(low, high))))
    return image.resize((side, side), Image.Resampling.BICUBIC)


def write_eval_set(out_dir: str | Path, variant: str, split: str, n: int,
                   scales: tuple[float, float] | None = None) -> Path:
    """Items 0..n-1 of ``split`` as PNGs under out_dir/images, and out_dir/items.jsonl;
    with ``scales``, each scene ``shown`` at its own size.

    Each line: {"image": path relative to out_dir, "question", "answer", "kind", "variant",
    "split", "index", "content_tokens", "shown_size"} (content tokens: patches holding anything
    a question is about; shown size: the image's side in pixels). Returns the items.jsonl path.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        it = item(variant, split, i)
        image = it.scene.image if scales is None else shown(it.scene.image, scene_seed(split, i), scales)
        name = f"images/{variant}_{split}_{i:05d}.png"
        image.save(out_dir / name)
        lines.append(json.dumps({"image": name, "question": it.question, "answer": it.answer, "kind": it.kind,
                                 "variant": variant, "split": split, "index": i,
                                 "content_tokens": int(it.scene.content_patches().sum()),
                                 "shown_size": image.width}))
    path = out_dir / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# `vllm-tokenprune make-eval-set`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", choices=VARIANTS, default="textured")
    parser.add_argument("--split", choices=tuple(SPLITS), default="test")
    parser.add_argument("--n", type=int, default=500, help="items (one image each; question kinds alternate)")
    parser.add_argument("--out", type=Path, required=True, help="folder for images/ and items.jsonl")
    parser.add_argument("--shown-scale", type=_scales, metavar="LOW,HIGH",
                        help="show each scene at its own size, its side the task's times a factor drawn "
                             "log-uniformly in [LOW, HIGH] (e.g. 0.5,4), as real images arrive")


def _scales(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"need LOW,HIGH, got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"need 0 < LOW <= HIGH, got {text!r}")
    return low, high


def run(args: argparse.Namespace) -> int:
    path = write_eval_set(args.out, args.variant, args.split, args.n, args.shown_scale)
    shown_at = f", shown at {args.shown_scale[0]}-{args.shown_scale[1]}x" if args.shown_scale else ""
    print(f"wrote {args.n} {args.variant} {args.split} items{shown_at} to {path}")
    return 0
