"""Train a token selector on a VLM's vision features.

    vllm-tokenprune train --model M --images DIR --out selector.safetensors

Reads the images under DIR, holds out a fixed fraction, extracts the tower's features
(cached on disk), trains selector + reconstructor with the paper's loss, reports on the
held-out images how well the dropped tokens are rebuilt after learned top-K selection vs
random selection, and writes a safetensors checkpoint carrying all of it.

Training choices beyond the paper (each for a stated reason):
- Features are standardized per dimension with the training set's statistics (stored in
  the selector), so the MSE and the rate term have the same scale for every tower.
- The reconstruction term is divided by the number of dropped tokens expected at the
  target, not the sampled number (see ``selector_loss``: the latter collapsed training).
- The rate term max(kept fraction, p) is taken per image, as serving keeps K of every
  image (see ``selector_loss``: over the batch, the budget went to some images only).
- Gumbel temperature is annealed exponentially from tau_start to tau_end. The hard sample
  does not depend on tau; tau only sharpens the straight-through gradient around the
  keep/drop boundary as the selector settles.
- Part of every batch is reconstructed from uniformly random masks of random ratio (this
  trains the reconstructor only). Without it the reconstructor sees only the selector's
  masks, and the final comparison with random selection would be biased against random.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vllm_tokenprune.selection.methods.topk import topk_sorted
from vllm_tokenprune.selection.selector import SelectorConfig, TokenSelector
from vllm_tokenprune.serving.policy import keep_count
from vllm_tokenprune.training.features import DEFAULT_CACHE_DIR, ImageFolderError, cached_features, find_images
from vllm_tokenprune.training.options import add_options, from_args, opt, warmup_cosine
from vllm_tokenprune.training.reconstruction import (
    ReconstructorConfig,
    TokenReconstructor,
    dropped_mse,
    sample_keep_mask,
    save_selector,
    selector_loss,
)

EVAL_RATIOS = (0.1, 0.25, 0.5)
RANDOM_DRAWS = 5  # random selections averaged per image in the final comparison


@dataclass
class TrainConfig:
    keep_ratio: float = opt(0.25, "target keep fraction p; pruning pressure stops there")
    steps: int = opt(300, "optimizer steps; suits 50-100 images (600 overfit the reconstructor on 51)")
    batch_size: int = opt(32, "images per step")
    lr: float = opt(2e-3, "AdamW peak learning rate (linear warmup, cosine decay to lr/10)")
    warmup_steps: int = opt(30, "learning-rate warmup steps")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    width: int | None = opt(None, "selector width (default min(256, feature dim))")
    layers: int = opt(3, "selector Transformer layers")
    recon_width: int | None = opt(None, "reconstructor width (default min(256, feature dim))")
    recon_layers: int = opt(2, "reconstructor Transformer layers")
    rate_weight: float = opt(1.0, "weight of the rate term max(kept fraction, p)")
    tau_start: float = opt(1.0, "Gumbel-Softmax temperature at the start")
    tau_end: float = opt(0.3, "Gumbel-Softmax temperature at the end (exponential anneal)")
    random_mask_frac: float = opt(0.5, "share of each batch rebuilt from random masks (reconstructor only)")
    eval_every: int = opt(100, "steps between evaluations (0: only at the end)")
    holdout: float = opt(0.2, "fraction of images held out for evaluation")
    seed: int = opt(0, "seed of the split, initialization, masks")
    device: str = opt("cpu", "torch device for extraction and training")
    threads: int = opt(0, "CPU threads for torch (0: the currently idle cores, at least 1)")
    feature_batch_size: int = opt(16, "images per vision-tower forward")
    cache_dir: str = opt(DEFAULT_CACHE_DIR, "feature cache directory")


# ---------------------------------------------------------------------------------------
# Masks and evaluation


def _mask_from_indices(indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    mask = torch.zeros(indices.shape[0], num_tokens, device=indices.device)
    return mask.scatter_(1, indices, 1.0)


def _random_masks(batch: int, num_tokens: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """One uniformly random mask per row, each with its own keep ratio drawn from [low, high]."""
    ratios = torch.empty(batch).uniform_(low, high, generator=gen)
    ks = [keep_count(num_tokens, float(r)) for r in ratios]
    return torch.stack([
        _mask_from_indices(topk_sorted(torch.rand(num_tokens, generator=gen), k)[None], num_tokens)[0]
        for k in ks
    ])


@torch.no_grad()
def evaluate(
    selector: TokenSelector,
    reconstructor: TokenReconstructor,
    features: torch.Tensor,
    grid: list[int] | None,
    ratios=EVAL_RATIOS,
    random_draws: int = RANDOM_DRAWS,
    seed: int = 0,
    chunk: int = 64,
) -> dict[str, dict[str, float]]:
    """MSE over dropped (normalized) tokens after learned top-K vs random K, per keep ratio."""
    selector.eval()
    reconstructor.eval()
    gen = torch.Generator().manual_seed(seed)
    n, num_tokens, _ = features.shape
    results = {}
    for ratio in ratios:
        k = keep_count(num_tokens, ratio)
        learned = random = 0.0
        for start in range(0, n, chunk):
            x = features[start:start + chunk]
            target = selector.normalize(x)
            mask = _mask_from_indices(topk_sorted(selector.scores(x), k), num_tokens)
            # Every image drops N - K tokens, so chunk means weighted by chunk size are exact.
            learned += dropped_mse(reconstructor(target, mask, grid), target, mask).item() * len(x)
            for _ in range(random_draws):
                noise = torch.rand(len(x), num_tokens, generator=gen).to(x.device)
                mask = _mask_from_indices(topk_sorted(noise, k), num_tokens)
                random += dropped_mse(reconstructor(target, mask, grid), target, mask).item() * len(x) / random_draws
        results[str(ratio)] = {"k": k, "learned": learned / n, "random": random / n}
    return results


def format_report(results: dict[str, dict[str, float]], title: str) -> str:
    lines = [title, "keep  K     learned  random  learned/random"]
    for ratio, r in results.items():
        lines.append(f"{float(ratio):<5} {r['k']:<5} {r['learned']:.4f}   {r['random']:.4f}  "
                     f"{r['learned'] / r['random']:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Training


def train_selector(
    features: torch.Tensor,
    config: TrainConfig,
    *,
    grid: list[int] | None = None,
    eval_features: torch.Tensor | None = None,
    progress: bool = True,
    log: Callable[[str], None] = tqdm.write,
) -> tuple[TokenSelector, TokenReconstructor, dict[str, Any]]:
    """Train on features (n, N, D); returns (selector, reconstructor, report).

    grid is the token grid [rows, cols] (position encoding of the reconstructor);
    eval_features, if given, are held-out images for periodic and final evaluation.
    """
    cfg = config
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    n, num_tokens, dim = features.shape

    selector = TokenSelector(SelectorConfig(dim, width=cfg.width, num_layers=cfg.layers))
    flat = features.reshape(-1, dim)
    selector.set_normalization(flat.mean(dim=0), flat.std(dim=0))
    reconstructor = TokenReconstructor(ReconstructorConfig(dim, width=cfg.recon_width, num_layers=cfg.recon_layers))
    selector.to(device)
    reconstructor.to(device)
    params = [*selector.parameters(), *reconstructor.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)

    train_x = features.to(device)
    eval_x = eval_features.to(device) if eval_features is not None else None
    n_random = round(cfg.batch_size * cfg.random_mask_frac)
    history = []
    start_time = time.time()
    bar = tqdm(range(cfg.steps), desc="train", unit="step", disable=not progress)
    for step in bar:
        # schedules: linear warmup then cosine to lr/10; exponential temperature anneal
        lr = warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, cfg.steps - 1))

        selector.train()
        reconstructor.train()
        x = train_x[torch.randint(n, (cfg.batch_size,), generator=gen).to(device)]
        target = selector.normalize(x)
        x_sel, t_sel = x[n_random:], target[n_random:]
        keep = sample_keep_mask(selector, x_sel, tau)
        loss, parts = selector_loss(
            reconstructor(t_sel, keep, grid), t_sel, keep, cfg.keep_ratio, cfg.rate_weight
        )
        if n_random:
            rand_mask = _random_masks(n_random, num_tokens, 0.05, 0.75, gen).to(device)
            t_rand = target[:n_random]
            rand_rec = dropped_mse(reconstructor(t_rand, rand_mask, grid), t_rand, rand_mask)
            loss = loss + rand_rec
            parts["rand_rec"] = rand_rec.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", rec=f"{parts['rec']:.3f}", kept=f"{parts['kept']:.2f}")

        last = step == cfg.steps - 1
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            row = {"step": step + 1, "loss": loss.item(), "tau": tau, **parts}
            if eval_x is not None:
                at_p = evaluate(selector, reconstructor, eval_x, grid, ratios=(cfg.keep_ratio,), random_draws=1)
                row.update({f"eval_{k}": v for k, v in at_p[str(cfg.keep_ratio)].items() if k != "k"})
            history.append(row)
            log(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    train_seconds = time.time() - start_time
    held_out = eval_x is not None
    results = evaluate(selector, reconstructor, eval_x if held_out else train_x, grid, seed=cfg.seed)
    report = {
        "train_seconds": round(train_seconds, 1),
        "history": history,
        "eval_images": "held-out" if held_out else "train (no held-out images)",
        "eval": results,
    }
    selector.eval()
    reconstructor.eval()
    return selector.cpu(), reconstructor.cpu(), report


def split_indices(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) split; at least one image on each side when holdout > 0."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if holdout == 0.0:
        return list(range(n)), []
    if n < 2:
        raise ImageFolderError(f"need at least 2 images to hold some out, found {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = min(n - 1, max(1, round(n * holdout)))
    return sorted(perm[n_held:]), sorted(perm[:n_held])


def idle_cpu_threads() -> int:
    """Cores this process may use minus the 1-minute load, at least 1.

    Oversubscribed OpenMP threads spin: with other jobs on a 2-core machine a training step
    took 0.14 s on 1 thread and 0.5-0.9 s on 2.
    """
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, cores - round(os.getloadavg()[0])))


# ---------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="VLM checkpoint folder or hub id")
    parser.add_argument("--images", required=True, type=Path, help="folder of training images (recursive)")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint to write (.safetensors)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_options(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    return train_on_folder(args.model, args.images, args.out, from_args(TrainConfig, args),
                           progress=not args.no_progress)


def train_on_folder(model: str, images: Path, out: Path, cfg: TrainConfig, *, progress: bool = True) -> int:
    """``vllm-tokenprune train``: features of the folder's images, a selector trained on
    them and evaluated on the held-out ones, written to ``out``. Returns an exit code."""
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads or idle_cpu_threads())
    try:
        paths = find_images(images)
        train_idx, held_idx = split_indices(len(paths), cfg.holdout, cfg.seed)
        features, info, from_cache = cached_features(
            model, paths, cache_dir=cfg.cache_dir, batch_size=cfg.feature_batch_size,
            device=cfg.device, progress=progress,
        )
    except ImageFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{len(paths)} images ({len(train_idx)} train, {len(held_idx)} held out); features "
        f"{tuple(features.shape)} {'from cache' if from_cache else 'extracted'}"
    )
    selector, reconstructor, report = train_selector(
        features[train_idx], cfg, grid=info["grid"],
        eval_features=features[held_idx] if held_idx else None, progress=progress,
        log=tqdm.write if progress else print,
    )
    print(format_report(report["eval"], f"reconstruction MSE of dropped tokens on {report['eval_images']} images"))

    metadata = {
        "source_model": info["source_model"],
        "feature_layer": info["feature_layer"],
        "vision_signature": info["vision_signature"],
        "num_tokens": info["num_tokens"],
        "grid": info["grid"],
        "training": {
            "target_keep_ratio": cfg.keep_ratio,
            "steps": cfg.steps,
            "config": asdict(cfg),
            "num_train_images": len(train_idx),
            "num_heldout_images": len(held_idx),
            "train_seconds": report["train_seconds"],
            "history": report["history"],
        },
        "eval": {"images": report["eval_images"], "metric": "MSE over dropped normalized tokens",
                 "results": report["eval"]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_selector(out, selector, reconstructor=reconstructor, metadata=metadata)
    print(f"wrote {out}")
    return 0
