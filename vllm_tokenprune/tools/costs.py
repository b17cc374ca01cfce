"""What each method costs per image next to the vision tower, at real model shapes with
random weights (torch + transformers only, no vLLM; timings do not depend on the weights).

    python -m vllm_tokenprune.tools.costs [--device cpu] [--threads 1] [--images B] [--out costs.json]

Shapes: LLaVA-1.5-7B (CLIP-L/14 at 336 px up to its vision_feature_layer, 23 of 24 layers,
as vLLM builds it; 576 candidates of 1024 channels; the 1024 -> 4096 -> 4096 projector) and
Qwen2.5-VL-7B (its 32-block tower on a 448 x 448 image: 1024 patches, 256 merged tokens of
3584 channels), both at keep 0.25, with a question of 32 tokens for the methods that read
one. A method's time is what serving runs for it: the tower statistics it declares, computed
from one layer's queries and keys (``methods.attention``, on tensors of the layer's shapes),
plus ``methods.select_all`` over ``--images`` images (the selectors in float32, as served);
with more than one image, also each image in a call of its own, to show what batching saves.
Methods and towers are timed in interleaved rounds; medians per image are reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection import methods
from vllm_tokenprune.selection.methods.attention import statistics
from vllm_tokenprune.selection.selector import SelectorConfig, TokenSelector
from vllm_tokenprune.tools.provenance import add_allow_dirty, stamp
from vllm_tokenprune.tools.timing import interleaved, qwen_tower, vit_tower


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int  # candidates per image
    grid: tuple[int, int]
    dim: int  # candidate feature width
    sequence: int  # attention sequence of the probed layers
    heads: int
    head_dim: int
    has_cls: bool
    merge: int  # tower patches per candidate


QUESTION_TOKENS = 32
LLAVA = Shape("LLaVA-1.5-7B, CLIP-L/336", 576, (24, 24), 1024, 577, 16, 64, True, 1)
QWEN = Shape("Qwen2.5-VL-7B, 448 x 448", 256, (16, 16), 3584, 1024, 16, 80, False, 4)


def method_runs(shape: Shape, device, dtype, names=methods.IMAGE_METHOD_NAMES, images: int = 1) -> dict[str, callable]:
    """Per method, the statistics + selection of ``images`` images at keep 0.25, as serving runs
    them: all in one ``methods.select_all`` call, the selectors in float32. With more than one
    image, also ``NAME one by one``: the same images selected one call each."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    features = [rand(shape.tokens, shape.dim) for _ in range(images)]
    q, k = rand(1, shape.sequence, shape.heads, shape.head_dim), rand(1, shape.sequence, shape.heads, shape.head_dim)
    with torch.device(device):
        selector = TokenSelector(SelectorConfig(feature_dim=shape.dim)).eval()
        width = shape.dim if shape.merge > 1 else 4096  # the language model's
        reader = TokenSelector(SelectorConfig(feature_dim=shape.dim, query_dim=width)).eval()
        projector = torch.nn.Sequential(torch.nn.Linear(shape.dim, 4096), torch.nn.GELU(),
                                        torch.nn.Linear(4096, 4096)).to(dtype) if shape.merge == 1 else None
    question = rand(QUESTION_TOKENS, width)
    k_keep = keep_count(shape.tokens, 0.25)

    def job(name: str, image: int):
        method = methods.get(name)
        found = {}
        for layer in {p.layer for p in method.needs}:  # one layer's statistics at a time
            wanted = {p.stat for p in method.needs if p.layer == layer}
            for stat, value in statistics(q, k, shape.head_dim ** -0.5, wanted, has_cls=shape.has_cls).items():
                value = value[0, 1:] if shape.has_cls else value[0]
                found[methods.Probe(stat, layer)] = value.reshape(shape.tokens, shape.merge, -1).mean(1).squeeze(-1)
        tokens = methods.Tokens(features[image], (shape.grid,), seed=image, selector=selector, query_selector=reader,
                                embed=projector, stats=found, query=question if method.reads_query else None)
        return name, tokens, k_keep

    runs = {name: (lambda name=name: methods.select_all([job(name, i) for i in range(images)])) for name in names}
    if images > 1:
        runs.update({f"{name} one by one": (lambda name=name: [methods.select_all([job(name, i)])
                                                               for i in range(images)]) for name in names})
    return runs


def measure(shape: Shape, tower, device: str, dtype, rounds: int, tower_every: int,
            names=methods.IMAGE_METHOD_NAMES, images: int = 1) -> dict:
    medians = interleaved({"tower": tower, **method_runs(shape, device, dtype, names, images)}, rounds,
                          device=device, every={"tower": tower_every})
    tower_s = medians.pop("tower")
    report = {"shape": shape.name, "tower_s": tower_s, "tower_runs": -(-rounds // tower_every), "rounds": rounds,
              "images": images,
              "methods": {name: {"seconds": t / images, "of_tower": t / images / tower_s}
                          for name, t in medians.items()}}
    print(f"{shape.name}: tower {tower_s * 1e3:.0f} ms per image (median of {report['tower_runs']}); "
          f"methods per image, {images} image(s) a call")
    for name, row in report["methods"].items():
        print(f"  {name:26s} {row['seconds'] * 1e3:8.2f} ms  {100 * row['of_tower']:6.2f}% of the tower")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds of every method")
    parser.add_argument("--tower-every", type=int, default=3, help="time the tower every N rounds")
    parser.add_argument("--methods", nargs="+", default=list(methods.IMAGE_METHOD_NAMES),
                        choices=methods.IMAGE_METHOD_NAMES, help="the methods to time (default: all image methods)")
    parser.add_argument("--images", type=int, default=1,
                        help="images per selection call; above 1, each method also one image a call")
    parser.add_argument("--out", type=Path, default=None)
    add_allow_dirty(parser)
    args = parser.parse_args(argv)
    record = stamp("python -m vllm_tokenprune.tools.costs", argv, args.allow_dirty)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    report = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "torch": torch.__version__, **record,
              # LLaVA-1.5's CLIP as vLLM builds it: up to its vision_feature_layer, 23 of 24 layers
              "results": [measure(LLAVA, vit_tower("clip", args.device, dtype, num_hidden_layers=23)[0],
                                  args.device, dtype, args.rounds, args.tower_every, args.methods, args.images),
                          measure(QWEN, qwen_tower(args.device, dtype)[0], args.device, dtype, args.rounds,
                                  args.tower_every, args.methods, args.images)]}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
