"""Serving's selection at real shapes, with random weights, for a GPU: per method, its time and
peak memory on a tower call's worth of images, with CUDA's sync debugging set to raise on any
host sync; the tower at the chunk the encoder budget allows against an unchunked call; and
how often a bf16 selector keeps the tokens the float32 one keeps.

Shapes: 64 images of LLaVA-1.5's CLIP-L/336 (576 candidates of 1024 channels, the
1024 -> 4096 -> 4096 projector), and one Qwen2.5-VL-7B image of 4,096 and of 16,384 merged
tokens (3,584 channels), all at keep 0.25 with a 32-token question. Selection runs as the
server runs it (``methods.select_all`` on the whole call, the selectors in float32).

    PYTHONPATH=. python benchmarks/gpu_serving_check.py --out benchmarks/results/gpu-serving-h100
    PYTHONPATH=. python benchmarks/gpu_serving_check.py --small --device cpu --out /tmp/check  # seconds

Writes results.json and results.md. Needs torch and transformers only (never vLLM, which a
bare GPU machine lacks).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection import methods
from vllm_tokenprune.selection.selector import SelectorConfig, TokenSelector
from vllm_tokenprune.tools.provenance import add_allow_dirty, stamp
from vllm_tokenprune.tools.timing import sync, vit_tower

RATIO = 0.25
QUESTION = 32
ENCODER_BUDGET = 8192  # vLLM's default max_num_batched_tokens on a GPU


@dataclass(frozen=True)
class Case:
    name: str
    images: int
    grid: tuple[int, int]  # candidates per image, as rows x columns
    dim: int  # candidate width
    llm: int  # language model width (the question's embeddings)
    projector: bool  # LLaVA: candidates reach the LLM through a projector


def cases(small: bool) -> list[Case]:
    if small:
        return [Case("clip-l-336 x 64", 4, (4, 4), 16, 24, True), Case("qwen2.5-vl-7b 4096", 1, (8, 8), 16, 16, False)]
    return [Case("clip-l-336 x 64", 64, (24, 24), 1024, 4096, True),
            Case("qwen2.5-vl-7b 4096", 1, (64, 64), 3584, 3584, False),
            Case("qwen2.5-vl-7b 16384", 1, (128, 128), 3584, 3584, False)]


def make_jobs(case: Case, name: str, device: str, dtype, selectors) -> list[tuple[str, methods.Tokens, int]]:
    gen = torch.Generator().manual_seed(0)
    n = case.grid[0] * case.grid[1]

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    projector = selectors["projector"]
    jobs = []
    for image in range(case.images):
        stats = {p: (rand(n, 64).float() if p.stat == methods.KEYS else rand(n).float().softmax(0))
                 for p in methods.get(name).needs}
        tokens = methods.Tokens(rand(n, case.dim), (case.grid,), seed=image, selector=selectors["selector"],
                                query_selector=selectors["reader"], embed=projector, stats=stats,
                                query=rand(QUESTION, case.llm) if methods.get(name).reads_query else None)
        jobs.append((name, tokens, keep_count(n, RATIO)))
    return jobs


def selectors_for(case: Case, device: str, dtype) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        found = {"selector": TokenSelector(SelectorConfig(feature_dim=case.dim)).eval(),
                 "reader": TokenSelector(SelectorConfig(feature_dim=case.dim, query_dim=case.llm)).eval(),
                 "projector": torch.nn.Sequential(torch.nn.Linear(case.dim, case.llm), torch.nn.GELU(),
                                                  torch.nn.Linear(case.llm, case.llm)).to(dtype)
                 if case.projector else None}
    return found


def measured(run, device: str, rounds: int) -> dict:
    """Median seconds over ``rounds`` runs after one warm-up, peak memory above what was
    allocated before, and on CUDA whether any run synced with the host (sync debug mode)."""
    cuda = device.startswith("cuda")
    with torch.inference_mode():
        run()
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        syncs, times = "none" if cuda else "not checked (cpu)", []
        for _ in range(rounds):
            start = time.perf_counter()
            if cuda:
                torch.cuda.set_sync_debug_mode("error")
            try:
                run()
            except RuntimeError as err:  # a sync, under the debug mode
                syncs = str(err).splitlines()[0]
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
            sync(device)
            times.append(time.perf_counter() - start)
    out = {"seconds": sorted(times)[len(times) // 2], "syncs": syncs}
    if device.startswith("cuda"):
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def selection(case: Case, device: str, dtype, rounds: int) -> dict:
    selectors = selectors_for(case, device, dtype)
    report = {}
    for name in methods.IMAGE_METHOD_NAMES:
        jobs = make_jobs(case, name, device, dtype, selectors)
        try:
            report[name] = measured(lambda jobs=jobs: methods.select_all(jobs), device, rounds)
        except torch.OutOfMemoryError as err:
            report[name] = {"error": str(err).splitlines()[0]}
        print(f"  {case.name:22s} {name:14s} {report[name]}", flush=True)
    return report


def agreement(case: Case, device: str, dtype) -> float:
    """Mean share of the float32 selector's kept tokens that a bf16 copy keeps too."""
    selectors = selectors_for(case, device, dtype)
    low = {**selectors, "selector": copy.deepcopy(selectors["selector"]).to(torch.bfloat16)}
    with torch.inference_mode():
        full = methods.select_all(make_jobs(case, "learned", device, dtype, selectors))
        half = methods.select_all(make_jobs(case, "learned", device, dtype, low))
    shares = [len(set(a.index.tolist()) & set(b.index.tolist())) / len(a.index) for a, b in zip(full, half)]
    return sum(shares) / len(shares)


def tower(small: bool, device: str, dtype, rounds: int) -> dict:
    """CLIP-L/336 on the images one chunk of the encoder budget holds, and on the images a
    step at keep 0.25 would hold unchunked (the scheduler charges K = N / 4 each)."""
    overrides = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     image_size=56, patch_size=14) if small else dict(num_hidden_layers=23)
    tokens = (overrides["image_size"] // overrides["patch_size"]) ** 2 if small else 576
    budget = 4 * tokens if small else ENCODER_BUDGET
    report = {}
    for label, images in (("chunk", budget // tokens), ("unchunked at keep 0.25", budget // keep_count(tokens, RATIO))):
        forward, _, _ = vit_tower("clip", device, dtype, batch=images, **overrides)
        report[label] = {"images": images, **measured(forward, device, rounds)}
        print(f"  tower {label:24s} {report[label]}", flush=True)
    return report


def table(report: dict) -> str:
    shapes = "tiny shapes (--small)" if report["small"] else "real shapes, random weights"
    lines = [f"# Serving check on {report['device']} ({report['dtype']}, torch {report['torch']}; {shapes})", "",
             "Selection per tower call, keep 0.25 (median seconds; peak memory above the inputs; host syncs "
             "under `torch.cuda.set_sync_debug_mode('error')`):", "",
             "| case | method | ms | peak MiB | syncs |", "| --- | --- | --- | --- | --- |"]
    for case, rows in report["selection"].items():
        for name, row in rows.items():
            if "error" in row:
                lines.append(f"| {case} | {name} | - | - | {row['error']} |")
                continue
            peak = f"{row['peak_mib']:.0f}" if "peak_mib" in row else "-"
            lines.append(f"| {case} | {name} | {row['seconds'] * 1e3:.2f} | {peak} | {row['syncs']} |")
    lines += ["", "Tower (CLIP-L/336, 23 layers):", "", "| call | images | ms | peak MiB |",
              "| --- | --- | --- | --- |"]
    for label, row in report["tower"].items():
        peak = f"{row['peak_mib']:.0f}" if "peak_mib" in row else "-"
        lines.append(f"| {label} | {row['images']} | {row['seconds'] * 1e3:.1f} | {peak} |")
    lines += ["", "Kept tokens a bf16 selector shares with the float32 one (random weights): "
              + ", ".join(f"{case} {share:.3f}" for case, share in report["bf16_agreement"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", help="the served model's dtype (features, projector)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU test of the script)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    add_allow_dirty(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    record = stamp(Path(__file__), argv, args.allow_dirty) if args.out else {}
    dtype = getattr(torch, args.dtype)
    report = {**record, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
              "dtype": args.dtype, "torch": torch.__version__, "small": args.small, "ratio": RATIO, "selection": {},
              "bf16_agreement": {}}
    for case in cases(args.small):
        report["selection"][case.name] = selection(case, args.device, dtype, args.rounds)
        report["bf16_agreement"][case.name] = agreement(case, args.device, dtype)
    report["tower"] = tower(args.small, args.device, dtype, args.rounds)
    text = table(report)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
