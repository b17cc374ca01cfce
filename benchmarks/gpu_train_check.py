"""Training at real tower shapes, with random weights: feature-extraction and training-step
throughput, and what they imply for a folder of 10,000 images.

For each tower (CLIP-L/336 of LLaVA-1.5/NeXT, SigLIP-so400m/384 of LLaVA-OneVision, the
Qwen2.5-VL-7B tower on 448 x 448 images, i.e. 1024 patches) it times

- the tower's forward on a batch of images in ``features.tower_dtype`` (bfloat16 on CUDA),
  as ``train`` extracts features (image decoding and preprocessing, which run on CPU
  threads beside it, are not included);
- ``train.training_step`` (selector + reconstructor forward, backward, AdamW; bf16
  autocast on CUDA) on a batch of features of the shape the selector sees;
- the periodic and final held-out evaluation per image;

and writes results.json and prints a table. Needs torch and transformers and this
repository on PYTHONPATH; the modules it imports never import vLLM (tests/test_gpu_train_check.py).

    PYTHONPATH=. python benchmarks/gpu_train_check.py --out benchmarks/results/gpu-train-h200
    PYTHONPATH=. python benchmarks/gpu_train_check.py --small     # tiny shapes on CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vllm_tokenprune.tools.provenance import add_allow_dirty, stamp
from vllm_tokenprune.tools.timing import interleaved, qwen_tower, sync, vit_tower
from vllm_tokenprune.training.evaluation import evaluate
from vllm_tokenprune.training.features import tower_dtype
from vllm_tokenprune.training.ragged import RaggedFeatures
from vllm_tokenprune.training.stream import InMemoryFeatures
from vllm_tokenprune.training.train import TrainConfig, build_models, default_steps, split_indices, training_step

FOLDER = 10_000  # images in the folder the estimate is for
SMALL_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=56, patch_size=14)
SMALL_QWEN = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
                  fullatt_block_indexes=[1])


def towers(small: bool) -> dict:
    """name -> (build(device, dtype, batch) -> (forward, tokens per image, width), tokens the selector sees)."""
    vit = SMALL_VIT if small else {}
    qwen = dict(side=56, **SMALL_QWEN) if small else {}
    return {
        # LLaVA drops CLIP's [CLS] token before the projector, so the selector sees one token fewer.
        "clip-l-336": (lambda d, t, b: vit_tower("clip", d, t, b, **vit), -1),
        "siglip-so400m-384": (lambda d, t, b: vit_tower("siglip", d, t, b, **vit), 0),
        "qwen2.5-vl-7b": (lambda d, t, b: qwen_tower(d, t, batch=b, **qwen), 0),
    }


def timed(fn, steps: int, device: str, warmup: int = 2) -> float:
    """Mean seconds of fn over ``steps`` calls, after ``warmup`` (``interleaved`` runs under
    inference mode, where a training step cannot run)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def measure(name: str, args: argparse.Namespace) -> dict:
    device, dtype = args.device, tower_dtype(args.device)
    build, token_offset = towers(args.small)[name]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    forward, tokens, dim = build(device, dtype, args.extract_batch)
    tower_s = interleaved({"tower": forward}, args.rounds, device=device)["tower"]
    del forward
    tower_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    num_tokens = tokens + token_offset
    cfg = TrainConfig(device=device, batch_size=args.batch)
    selector, reconstructor, optimizer = build_models(dim, cfg)
    gen = torch.Generator().manual_seed(0)
    # as stored: the tower's dtype
    x = RaggedFeatures.stack(torch.randn(args.batch, num_tokens, dim, device=device, dtype=dtype))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step_s = timed(lambda: training_step(selector, reconstructor, optimizer, x, cfg, tau=0.5, gen=gen),
                   args.steps, device)
    train_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    held = InMemoryFeatures(RaggedFeatures.stack(torch.randn(2 * args.batch, num_tokens, dim, device=device,
                                                             dtype=dtype)))
    periodic_s = timed(lambda: evaluate(selector, reconstructor, held, ratios=(cfg.keep_ratio,),
                                        random_draws=1), 2, device, warmup=1) / 2 / args.batch
    final_s = timed(lambda: evaluate(selector, reconstructor, held), 1, device, warmup=1) / 2 / args.batch

    # What the defaults make of a FOLDER-image folder: the split, the steps, the evaluations.
    train_idx, held_idx = split_indices(FOLDER, cfg.holdout, cfg.seed, cfg.max_heldout)
    steps = default_steps(len(train_idx), cfg.batch_size, cfg.epochs)
    estimate = {
        "images": FOLDER, "train_images": len(train_idx), "heldout_images": len(held_idx), "steps": steps,
        "extract_s": FOLDER * tower_s / args.extract_batch,
        "train_s": steps * step_s,
        "eval_s": len(held_idx) * (steps // cfg.eval_every * periodic_s + final_s),
    }
    estimate["total_s"] = estimate["extract_s"] + estimate["train_s"] + estimate["eval_s"]
    return {
        "tokens": num_tokens, "feature_dim": dim, "tower_dtype": str(dtype).removeprefix("torch."),
        "extract_batch": args.extract_batch, "tower_batch_s": tower_s,
        "extract_images_per_s": args.extract_batch / tower_s,
        "train_batch": args.batch, "train_step_s": step_s, "train_images_per_s": args.batch / step_s,
        "eval_periodic_s_per_image": periodic_s, "eval_final_s_per_image": final_s,
        "disk_mb_per_image": num_tokens * dim * dtype.itemsize / 1e6,
        "peak_gpu_gib": {"tower": tower_memory, "train": train_memory},
        "estimate": estimate,
    }


def table(results: dict) -> str:
    lines = ["| tower | tokens x dim | extract img/s | train step ms | train img/s | MB/img on disk "
             f"| {FOLDER:,} images: extract / train / eval / total min |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        e = r["estimate"]
        minutes = " / ".join(f"{e[k] / 60:.1f}" for k in ("extract_s", "train_s", "eval_s", "total_s"))
        lines.append(f"| {name} | {r['tokens']} x {r['feature_dim']} | {r['extract_images_per_s']:.0f} "
                     f"| {r['train_step_s'] * 1e3:.1f} | {r['train_images_per_s']:.0f} "
                     f"| {r['disk_mb_per_image']:.2f} | {minutes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run)")
    parser.add_argument("--extract-batch", type=int, default=32, help="images per tower forward")
    parser.add_argument("--batch", type=int, default=TrainConfig.batch_size, help="images per training step")
    parser.add_argument("--rounds", type=int, default=10, help="timed tower forwards")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json")
    add_allow_dirty(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    record = stamp(Path(__file__), argv, args.allow_dirty) if args.out else {}
    if args.small:
        args.extract_batch, args.batch, args.rounds, args.steps = 2, 4, 2, 2
    torch.manual_seed(0)
    report = {**record, "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "small": args.small, "towers": {}}
    for name in towers(args.small):
        report["towers"][name] = measure(name, args)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the next tower starts from an empty cache
        print(f"{name}: done", flush=True)
    print(table(report["towers"]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
