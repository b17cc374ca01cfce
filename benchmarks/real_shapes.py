"""The limit for real model sizes, with random weights: vision-tower time, selector time,
and language-model prefill time as a function of token count.

Needs only PyTorch and transformers (no vLLM), so it runs on a bare GPU machine. Every
measurement interleaves what it compares (``tools/timing.py``):

    PYTHONPATH=. python benchmarks/real_shapes.py --device cuda --out benchmarks/results/real-shapes-h100
    PYTHONPATH=. python benchmarks/real_shapes.py --device cpu --no-lm   # towers + selector only

Towers: CLIP-L/14 at 336 px (LLaVA-1.5/NeXT; 577 tokens x 1024) and SigLIP-so400m at 384 px
(LLaVA-OneVision; 729 x 1152). Language model: a Llama-7B shape (hidden 4096, 32 layers).
From these it derives, for LLaVA-1.5 (576 image tokens + a short text prompt), the ideal
time-to-first-token speedup of each keep ratio: pruning saves prefill of the dropped tokens
and costs the selector.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection.selector import SelectorConfig, TokenSelector
from vllm_tokenprune.tools.provenance import add_allow_dirty, stamp
from vllm_tokenprune.tools.timing import interleaved, vit_tower

TOWERS = {"clip-l-336": "clip", "siglip-so400m-384": "siglip"}
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)
TEXT_TOKENS = 64  # a short chat prompt around the image
RATIOS = (1.0, 0.5, 0.25, 0.1)


@torch.inference_mode()
def measure_tower(name: str, device: str, dtype, repeats: int) -> dict:
    forward, _, dim = vit_tower(TOWERS[name], device, dtype)
    tokens = forward()
    with torch.device(device):
        selector = TokenSelector(SelectorConfig(feature_dim=dim)).eval()
    medians = interleaved({"tower": forward, "selector": lambda: selector.scores(tokens[0])}, repeats, device=device)
    t_tower, t_selector = medians["tower"], medians["selector"]
    print(f"{name}: tower {t_tower * 1e3:.1f} ms, selector {t_selector * 1e3:.2f} ms "
          f"({100 * t_selector / t_tower:.1f}% of the tower)", flush=True)
    return {"tokens": tokens.shape[1], "feature_dim": dim, "tower_s": t_tower,
            "selector_s": t_selector, "selector_fraction": t_selector / t_tower,
            "selector_params": sum(p.numel() for p in selector.parameters())}


@torch.inference_mode()
def measure_prefill(device: str, dtype, repeats: int, token_counts, layers: int) -> dict:
    from transformers import LlamaConfig, LlamaModel

    spec = dict(LLAMA_7B, num_hidden_layers=layers)
    with torch.device(device):
        model = LlamaModel(LlamaConfig(**spec)).to(dtype).eval()
    embeds = {n: torch.randn(1, n, spec["hidden_size"], device=device, dtype=dtype) for n in token_counts}
    medians = interleaved({str(n): (lambda e=e: model(inputs_embeds=e, use_cache=False)) for n, e in embeds.items()},
                          repeats, device=device)
    points = [{"tokens": n, "seconds": medians[str(n)]} for n in token_counts]
    for point in points:
        print(f"prefill {point['tokens']:5d} tokens: {point['seconds'] * 1e3:.1f} ms", flush=True)
    return {"layers": layers, "shape": spec, "points": points}


def ideal_speedups(towers: dict, prefill: dict) -> list[dict]:
    """LLaVA-1.5 with CLIP-L/336: 576 image tokens + TEXT_TOKENS text."""
    import numpy as np

    xs = [p["tokens"] for p in prefill["points"]]
    ys = [p["seconds"] for p in prefill["points"]]

    def t_prefill(n):
        return float(np.interp(n, xs, ys))

    clip = towers["clip-l-336"]
    n = clip["tokens"] - 1  # the CLS token is not fed to the projector
    full = clip["tower_s"] + t_prefill(TEXT_TOKENS + n)
    rows = []
    for r in RATIOS:
        k = keep_count(n, r)
        pruned = clip["tower_s"] + (clip["selector_s"] if r < 1 else 0) + t_prefill(TEXT_TOKENS + k)
        rows.append({"keep_ratio": r, "image_tokens": k, "ttft_s": pruned,
                     "ideal_speedup": full / pruned})
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-lm", action="store_true", help="skip the language-model prefill")
    parser.add_argument("--lm-layers", type=int, default=LLAMA_7B["num_hidden_layers"])
    parser.add_argument("--tokens", default="64,128,256,512,640,1024,2048,2944")
    parser.add_argument("--out", type=Path, default=None)
    add_allow_dirty(parser)
    args = parser.parse_args(argv)
    record = stamp(Path(__file__), argv, args.allow_dirty) if args.out else {}
    dtype = getattr(torch, args.dtype)
    report = {**record, "device": args.device, "dtype": args.dtype,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
              else "cpu", "torch": torch.__version__, "repeats": args.repeats}
    report["towers"] = {name: measure_tower(name, args.device, dtype, args.repeats) for name in TOWERS}
    if not args.no_lm:
        counts = [int(t) for t in args.tokens.split(",")]
        report["prefill"] = measure_prefill(args.device, dtype, args.repeats, counts, args.lm_layers)
        report["ideal_llava_1_5"] = ideal_speedups(report["towers"], report["prefill"])
        for row in report["ideal_llava_1_5"]:
            print(f"keep {row['keep_ratio']}: {row['image_tokens']} image tokens, ideal TTFT "
                  f"speedup {row['ideal_speedup']:.2f}x")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "real_shapes.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
