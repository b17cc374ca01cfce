"""Train a token selector on a VLM's vision features.

    vllm-tokenprune train --model M --images DIR --out selector.safetensors

Reads the images under DIR, holds out a fixed fraction, writes the tower's features to a
sharded store on disk (``store``; reused by later runs), trains selector + reconstructor
with the paper's loss on batches streamed from it (``stream``), logs a held-out
evaluation every ``eval_every`` steps to OUT.log.jsonl and plots it to OUT.curves.png,
saves a training state every ``save_every`` steps for ``--resume`` (OUT.state.pt, removed
when the checkpoint is written), reports on the held-out images how well the dropped
tokens are rebuilt after learned top-K selection vs random selection, and writes a
safetensors checkpoint carrying all of it. docs/training.md is the recipe.

Training choices beyond the paper (each for a stated reason):
- Features are standardized per dimension with the training set's statistics (stored in
  the selector), so the MSE and the rate term have the same scale for every tower.
- The reconstruction term is divided by the number of dropped tokens expected at the
  target, not the sampled number (see ``selector_loss``: the latter collapsed training).
- The rate term max(kept fraction, p) is taken per image, as serving keeps K of every
  image (see ``selector_loss``: over the batch, the budget went to some images only).
- Images keep the size the server gives them (Qwen: N varies per image); a batch is padded
  to its largest image, attention ignores the padding, and both loss terms are taken per
  image and averaged, so an image's loss does not depend on its batch or its size.
- Gumbel temperature is annealed exponentially from tau_start to tau_end. The hard sample
  does not depend on tau; tau only sharpens the straight-through gradient around the
  keep/drop boundary as the selector settles.
- Part of every batch is reconstructed from uniformly random masks of random ratio (this
  trains the reconstructor only). Without it the reconstructor sees only the selector's
  masks, and the final comparison with random selection would be biased against random.

One device: the selector and reconstructor are about 1% of a tower's size, so a training
step is cheap next to reading its features; docs/training.md says what several GPUs
would and would not buy.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection.budget import PREFIX as BUDGET_PREFIX
from vllm_tokenprune.selection.budget import SECTION as BUDGET_SECTION
from vllm_tokenprune.selection.budget import section as budget_section
from vllm_tokenprune.selection.methods.topk import topk_sorted
from vllm_tokenprune.selection.selector import (
    ATTENTION_SECTION,
    SelectorCheckpointError,
    SelectorConfig,
    SelectorMismatchError,
    TokenSelector,
    check_compatible,
    load_selector,
)
from vllm_tokenprune.training.budget import format_budget_report, train_budget
from vllm_tokenprune.training.curves import append_log, plot_curves, write_log
from vllm_tokenprune.training.evaluation import autocast, evaluate, format_report, mask_from_indices
from vllm_tokenprune.training.features import FeatureSettingsError, ImageFolderError, find_images
from vllm_tokenprune.training.options import add_options, from_args, opt, warmup_cosine
from vllm_tokenprune.training.ragged import RaggedFeatures
from vllm_tokenprune.training.reconstruction import (
    ReconstructorConfig,
    TokenReconstructor,
    dropped_mse,
    load_reconstructor,
    replace_section,
    sample_keep_mask,
    save_selector,
    selector_loss,
)
from vllm_tokenprune.training.state import ResumeError, restore_state, save_state
from vllm_tokenprune.training.store import DEFAULT_CACHE_DIR, feature_store
from vllm_tokenprune.training.stream import FeatureSet, as_feature_set, batches, mean_std, num_images

# Without --steps: 300 steps were measured to suit 50-100 images (600 overfit the
# reconstructor on 51), so that is the floor. Larger folders get EPOCHS passes instead:
# 300 steps of 32 would not show a 100,000-image folder a tenth of its images. Three passes
# is a starting point, not a measured optimum; the held-out curve (OUT.curves.png) shows
# whether more would help.
MIN_STEPS = 300
EPOCHS = 3.0
# Settings that change how a run is carried out but not what it computes: a resumed run
# may change them.
RUNTIME_FIELDS = ("threads", "cache_dir", "feature_batch_size", "feature_workers", "eval_every", "save_every")
# Settings used only once the selector is trained (the budget predictor): a resumed run may change them.
AFTER_SELECTOR_FIELDS = ("budget_tolerance", "budget_steps", "budget_images")


@dataclass
class TrainConfig:
    keep_ratio: float = opt(0.25, "target keep fraction p; pruning pressure stops there")
    steps: int | None = opt(None, f"optimizer steps (default: --epochs passes, at least {MIN_STEPS})")
    epochs: float = opt(EPOCHS, "passes over the training images when --steps is not given")
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
    eval_every: int = opt(100, "steps between held-out evaluations logged to OUT.log.jsonl (0: only at the end)")
    save_every: int = opt(500, "steps between training states saved for --resume (0: none)")
    holdout: float = opt(0.2, "fraction of images held out for evaluation")
    max_heldout: int = opt(1000, "at most this many held-out images (more only slow each evaluation; 0: no limit)")
    budget_steps: int = opt(500, "steps fitting the budget predictor of keep ratio auto (0: no predictor)")
    budget_images: int = opt(4096, "the budget predictor is fitted on at most this many training images "
                                   "(a seeded sample): its memory and time do not grow with the folder")
    budget_tolerance: float | None = opt(None, "auto: the error (over all tokens, standardized features) an "
                                               "image's kept tokens may leave; default the median training "
                                               "image's at --keep-ratio")
    seed: int = opt(0, "seed of the split, initialization, masks and data order")
    device: str = opt("cpu", "torch device for extraction and training (cuda: bfloat16 tower and autocast)")
    threads: int = opt(0, "CPU threads for torch (0: the currently idle cores, at least 1)")
    feature_batch_size: int = opt(16, "images per vision-tower forward")
    feature_workers: int = opt(2, "threads decoding and preprocessing images ahead of the tower")
    shard_images: int = opt(256, "images per feature shard on disk")
    shuffle_shards: int = opt(8, "shards whose images are shuffled together (memory: twice this many shards)")
    cache_dir: str = opt(DEFAULT_CACHE_DIR, "feature store directory")
    min_pixels: int | None = opt(None, "Qwen: the image processor's min_pixels, as the server's "
                                       "--mm-processor-kwargs (default: the checkpoint's)")
    max_pixels: int | None = opt(None, "Qwen: the image processor's max_pixels, as the server's "
                                       "--mm-processor-kwargs (default: the checkpoint's)")

    @property
    def processor_kwargs(self) -> dict[str, int]:
        """The image processor settings given, as the server takes them."""
        return {k: v for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels))
                if v is not None}


def default_steps(num_train_images: int, batch_size: int, epochs: float) -> int:
    """Steps when none are given: ``epochs`` passes over the training images, at least MIN_STEPS."""
    return max(MIN_STEPS, math.ceil(epochs * num_train_images / batch_size))


# ---------------------------------------------------------------------------------------
# Training


def _random_masks(lengths: list[int], width: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """One uniformly random mask (width,) per image of N_i = lengths[i] tokens, each with its
    own keep ratio drawn from [low, high]."""
    ratios = torch.empty(len(lengths)).uniform_(low, high, generator=gen)
    picks = [topk_sorted(torch.rand(n, generator=gen), keep_count(n, float(r))) for n, r in zip(lengths, ratios)]
    return mask_from_indices(picks, width)


def training_step(selector: TokenSelector, reconstructor: TokenReconstructor, optimizer: torch.optim.Optimizer,
                  batch: RaggedFeatures, cfg: TrainConfig, *, tau: float, gen: torch.Generator) -> dict[str, float]:
    """One optimizer step on the batch, on the models' device; returns the loss and its parts."""
    selector.train()
    reconstructor.train()
    n_random = round(len(batch) * cfg.random_mask_frac)
    padded = batch.padded()
    with autocast(padded.x.device):
        target = selector.normalize(padded.x)
        sel, t_sel = padded[n_random:], target[n_random:]
        keep = sample_keep_mask(selector, sel.x, tau, padding=sel.padding)
        loss, parts = selector_loss(reconstructor(t_sel, keep, sel.grids, sel.padding), t_sel, keep,
                                    cfg.keep_ratio, cfg.rate_weight, sel.padding)
        if n_random:
            rand = padded[:n_random]
            rand_mask = _random_masks(rand.lengths, rand.x.shape[1], 0.05, 0.75, gen).to(rand.x.device)
            t_rand = target[:n_random]
            rand_rec = dropped_mse(reconstructor(t_rand, rand_mask, rand.grids, rand.padding), t_rand, rand_mask,
                                   rand.padding)
            loss = loss + rand_rec
            parts["rand_rec"] = rand_rec.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([*selector.parameters(), *reconstructor.parameters()], 1.0)
    optimizer.step()
    return {"loss": loss.item(), **parts}


def build_models(dim: int, cfg: TrainConfig) -> tuple[TokenSelector, TokenReconstructor, torch.optim.Optimizer]:
    """Selector and reconstructor for features of width ``dim``, on ``cfg.device``, and their optimizer."""
    device = torch.device(cfg.device)
    selector = TokenSelector(SelectorConfig(dim, width=cfg.width, num_layers=cfg.layers)).to(device)
    reconstructor = TokenReconstructor(
        ReconstructorConfig(dim, width=cfg.recon_width, num_layers=cfg.recon_layers)).to(device)
    optimizer = torch.optim.AdamW([*selector.parameters(), *reconstructor.parameters()], lr=cfg.lr,
                                  betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    return selector, reconstructor, optimizer


def train_selector(
    features: RaggedFeatures | FeatureSet,
    config: TrainConfig,
    *,
    eval_features: RaggedFeatures | FeatureSet | None = None,
    progress: bool = True,
    log: Callable[[str], None] = tqdm.write,
    log_path: Path | None = None,
    state_path: Path | None = None,
    resume: bool = False,
) -> tuple[TokenSelector, TokenReconstructor, dict[str, Any]]:
    """Train on image features (any N per image): in memory, or a feature set streamed shard
    by shard; returns (selector, reconstructor, report).

    eval_features, if given, are held-out images for periodic and final evaluation. Each
    logged row is appended to ``log_path``; the training state is saved to ``state_path``
    every ``save_every`` steps, and with ``resume`` training continues from it if it exists.
    """
    train_set = as_feature_set(features)
    eval_set = as_feature_set(eval_features) if eval_features is not None else None
    n, dim = num_images(train_set), train_set.feature_dim
    cfg = replace(config, steps=config.steps or default_steps(n, config.batch_size, config.epochs))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)

    selector, reconstructor, optimizer = build_models(dim, cfg)
    selector.set_normalization(*mean_std(train_set))
    modules = {"selector": selector, "reconstructor": reconstructor}
    fingerprint = {**{k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS + AFTER_SELECTOR_FIELDS},
                   "features": train_set.key}

    start, done = 0, {"history": [], "window": {}, "seconds": 0.0}
    if resume and state_path is not None and state_path.is_file():
        start, done = restore_state(state_path, modules=modules, optimizer=optimizer, generator=gen,
                                    fingerprint=fingerprint)
        log(f"resumed from {state_path} at step {start}")
    elif resume:
        log(f"no training state at {state_path}: starting at step 0")
    history, window = done["history"], done["window"]  # window: sums since the last row
    if log_path is not None:
        write_log(log_path, history)

    start_time = time.time() - done["seconds"]
    bar = tqdm(total=cfg.steps * cfg.batch_size, initial=start * cfg.batch_size, desc="train", unit="img",
               disable=not progress)
    stream = batches(train_set, cfg.batch_size, shuffle_shards=cfg.shuffle_shards, seed=cfg.seed, skip=start)
    with closing(stream), bar:
        for step in range(start, cfg.steps):
            batch = next(stream).to(device, non_blocking=True)
            # schedules: linear warmup then cosine to lr/10; exponential temperature anneal
            lr = warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, cfg.steps - 1))
            parts = training_step(selector, reconstructor, optimizer, batch, cfg, tau=tau, gen=gen)
            for key, value in {**parts, "steps": 1}.items():
                window[key] = window.get(key, 0) + value
            bar.update(cfg.batch_size)
            bar.set_postfix(loss=f"{parts['loss']:.3f}", rec=f"{parts['rec']:.3f}", kept=f"{parts['kept']:.2f}")

            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step == cfg.steps - 1:
                row = {"step": step + 1, "lr": lr, "tau": tau,
                       **{k: v / window["steps"] for k, v in window.items() if k != "steps"}}
                if eval_set is not None:
                    at_p = evaluate(selector, reconstructor, eval_set, ratios=(cfg.keep_ratio,), random_draws=1)
                    row.update({f"eval_{k}": v for k, v in at_p[str(cfg.keep_ratio)].items() if k != "k"})
                row["seconds"] = round(time.time() - start_time, 1)
                history.append(row)
                window = {}
                if log_path is not None:
                    append_log(log_path, row)
                log(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            if state_path is not None and cfg.save_every and (step + 1) % cfg.save_every == 0:
                save_state(state_path, step=step + 1, modules=modules, optimizer=optimizer, generator=gen,
                           fingerprint=fingerprint, history=history, window=window,
                           seconds=time.time() - start_time)

    train_seconds = time.time() - start_time
    held_out = eval_set is not None
    results = evaluate(selector, reconstructor, eval_set if held_out else train_set, seed=cfg.seed)
    report = {
        "steps": cfg.steps,
        "resumed_at": start,
        "train_seconds": round(train_seconds, 1),
        "history": history,
        "eval_images": "held-out" if held_out else "train (no held-out images)",
        "eval": results,
    }
    selector.eval()
    reconstructor.eval()
    return selector.cpu(), reconstructor.cpu(), report


def split_indices(n: int, holdout: float, seed: int, max_held: int | None = None) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) split; at least one image on each side when holdout > 0,
    and at most ``max_held`` held out."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if holdout == 0.0:
        return list(range(n)), []
    if n < 2:
        raise ImageFolderError(f"need at least 2 images to hold some out, found {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = min(n - 1, max(1, round(n * holdout)), max_held or n)
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
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT.state.pt (saved every --save-every steps) if it exists")
    parser.add_argument("--budget-only", action="store_true",
                        help="refit only the budget predictor of the selector at OUT, on these images (another "
                             "--budget-tolerance, or a checkpoint whose predictor this version cannot read); "
                             "its selector and reconstructor stay")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_options(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    return train_on_folder(args.model, args.images, args.out, from_args(TrainConfig, args),
                           progress=not args.no_progress, resume=args.resume, budget_only=args.budget_only)


def _budget(selector, reconstructor, train_store, held_store, train_paths, held_paths, cfg: TrainConfig):
    """The budget predictor's checkpoint section, or None (reported) when an image changed
    or vanished since its features were read."""
    try:
        predictor, report = train_budget(
            selector, reconstructor, train_store, train_paths, keep_ratio=cfg.keep_ratio,
            tolerance=cfg.budget_tolerance, steps=cfg.budget_steps, seed=cfg.seed, images=cfg.budget_images,
            held_set=held_store,
            held_paths=held_paths)
    except ImageFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    print(format_budget_report(report))
    return budget_section(predictor, report)


def _trained_selector(model: str, out: Path):
    """``--budget-only``: the selector and reconstructor at ``out``, checked against the
    model before any feature is extracted; None (reported) when they cannot serve."""
    from transformers import AutoConfig

    try:
        selector, meta = load_selector(out)
        reconstructor = load_reconstructor(out)
        check_compatible(meta, AutoConfig.from_pretrained(model))
    except (OSError, SelectorCheckpointError, SelectorMismatchError) as e:
        print(f"error: --budget-only needs a selector for this model at {out}: {e}", file=sys.stderr)
        return None
    if ATTENTION_SECTION in meta:  # its predictor's target is not the rebuild error
        print(f"error: the selector at {out} was fitted to the model's attention; refit its budget predictor "
              f"with `vllm-tokenprune train-query MODEL --selector {out} --data ITEMS --budget-only`",
              file=sys.stderr)
        return None
    return selector, reconstructor


def _token_range(num_tokens: list[int]) -> str:
    low, high = num_tokens
    return str(low) if low == high else f"{low}-{high}"


def train_on_folder(model: str, images: Path, out: Path, cfg: TrainConfig, *, progress: bool = True,
                    resume: bool = False, budget_only: bool = False) -> int:
    """``vllm-tokenprune train``: features of the folder's images, a selector trained on
    them and evaluated on the held-out ones, written to ``out`` with its log and curves
    beside it (``budget_only``: the budget predictor of the selector at ``out`` refitted).
    Returns an exit code."""
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads or idle_cpu_threads())
    out = Path(out)
    trained = _trained_selector(model, out) if budget_only else None
    if budget_only and trained is None:
        return 2
    try:
        paths = find_images(images)
        train_idx, held_idx = split_indices(len(paths), cfg.holdout, cfg.seed, cfg.max_heldout)
        stores = [feature_store(model, [paths[i] for i in idx], cache_dir=cfg.cache_dir,
                                shard_images=cfg.shard_images, batch_size=cfg.feature_batch_size,
                                device=cfg.device, workers=cfg.feature_workers, progress=progress,
                                processor_kwargs=cfg.processor_kwargs)
                  for idx in (train_idx, held_idx) if idx]
    except (ImageFolderError, FeatureSettingsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train_store = stores[0][0]
    held_store = stores[1][0] if held_idx else None
    info = train_store.info
    print(
        f"{len(paths)} images ({len(train_idx)} train, {len(held_idx)} held out); features "
        f"({_token_range(info['num_tokens'])}, {info['feature_dim']}) per image, "
        f"{'from cache' if all(cached for _, cached in stores) else 'extracted'} ({train_store.root.parent})"
    )
    if budget_only:
        budget = _budget(*trained, train_store, held_store, [paths[i] for i in train_idx],
                         [paths[i] for i in held_idx], cfg)
        if budget is None:
            return 2
        replace_section(out, BUDGET_SECTION, BUDGET_PREFIX, budget)
        print(f"wrote {out} (budget predictor refitted)")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path, log_path = out.with_suffix(".state.pt"), out.with_suffix(".log.jsonl")
    try:
        selector, reconstructor, report = train_selector(
            train_store, cfg, eval_features=held_store, progress=progress,
            log=tqdm.write if progress else print, log_path=log_path, state_path=state_path, resume=resume,
        )
    except ResumeError as e:
        print(f"error: {e}; remove it to start over", file=sys.stderr)
        return 2
    print(format_report(report["eval"], f"reconstruction MSE of dropped tokens on {report['eval_images']} images"))
    budget = None
    if cfg.budget_steps:
        budget = _budget(selector, reconstructor, train_store, held_store, [paths[i] for i in train_idx],
                         [paths[i] for i in held_idx], cfg)
        if budget is None:
            return 2

    cfg = replace(cfg, steps=report["steps"])
    metadata = {
        "source_model": info["source_model"],
        "feature_layer": info["feature_layer"],
        "vision_signature": info["vision_signature"],
        "num_tokens": info["num_tokens"],
        "image_pixels": info["image_pixels"],
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
    save_selector(out, selector, reconstructor=reconstructor, budget=budget, metadata=metadata)
    curves = out.with_suffix(".curves.png")
    plot_curves(report["history"], curves, cfg.keep_ratio)
    state_path.unlink(missing_ok=True)  # the run is complete: nothing left to resume
    print(f"wrote {out}, {log_path.name}, {curves.name}")
    return 0
