"""Training the budget predictor behind ``X-Keep-Ratio: auto`` (``selection.budget``).

Two targets, one per way the selector was trained; the predictor and its fit are the same.

**A selector fitted to the model's attention** (``train-query --image-only``,
``train_share_budget``): its softmax over an image's tokens is fitted to the share of the
model's attention each token gets, so the tokens it rates above an even share (weight >
1/N) are the ones the model reads more than the rest. That count is the paper's rule of
keeping the tokens with a positive keep logit, with the level a softmax leaves free set
at the even share. The target is the count with a margin for the predictor's own error,
``(1 + margin) * count + extra`` tokens.

**A reconstruction-trained selector** (``train``, ``train_budget``): the smallest kept
fraction from which the trained reconstructor rebuilds the image's features to within a
tolerance. For each image and each ratio r of a grid (0.05, 0.10, ..., 1), the selector
keeps its top K = keep_count(N, r) tokens and the reconstructor rebuilds the rest; the
image's error at r is the squared error of its rebuilt tokens averaged over all N tokens
(kept ones count zero), in the selector's standardized feature units, so it is the share
of the features' variance the kept tokens leave unexplained. It falls to 0 at r = 1. The
target is the first r where it is within the tolerance, interpolated linearly between the
grid points around it. The tolerance defaults to the median training image's error at the
run's ``--keep-ratio``, so the median image keeps about that ratio and the others more or
less as their content asks.

Why not the positive-logit fraction for this selector: with this project's per-image rate
term max(kept_i, p) the selector is pushed to p on every image (below p only the
reconstruction term acts, and it always favours keeping), so that fraction measures the
training target p more than the image. Every run reports its spread and its correlation
with the tolerance target (``logit_fraction``), and docs/methods.md has the numbers
measured here.

The targets of the training images come from a reconstructor trained on them and so run
a little low; the held-out images' targets are computed alike and the report is on them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection.budget import BudgetConfig, BudgetPredictor, cell_features, thumbnail
from vllm_tokenprune.selection.methods.topk import topk_sorted
from vllm_tokenprune.selection.selector import TokenSelector
from vllm_tokenprune.training.evaluation import autocast, mask_from_indices
from vllm_tokenprune.training.features import ImageFolderError
from vllm_tokenprune.training.options import warmup_cosine
from vllm_tokenprune.training.reconstruction import TokenReconstructor, image_dropped_mse
from vllm_tokenprune.training.stream import FeatureSet, chunks

RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # the grid targets are read off
BATCH_SIZE = 64
LR = 3e-3


@torch.no_grad()
def error_curves(selector: TokenSelector, reconstructor: TokenReconstructor, features: FeatureSet,
                 chunk: int = 64, images: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image (every one, or those at the sorted stored positions ``images``), in stored
    order: its error at each ratio of RATIOS (B, R) (module docstring), its token count N
    (B,) and the fraction of its tokens with a positive keep logit (B,)."""
    selector.eval()
    reconstructor.eval()
    device = selector.feature_mean.device
    errors, lengths, positive = [], [], []
    for part in chunks(features, chunk, images):
        batch = part.to(device).padded()
        n = torch.tensor(batch.lengths)
        with autocast(device):
            target = selector.normalize(batch.x)
            scores = selector.scores(batch.x, batch.padding)
            rows = []
            for ratio in RATIOS:
                ks = [keep_count(length, ratio) for length in batch.lengths]
                keep = mask_from_indices(topk_sorted(scores, ks), batch.x.shape[1])
                mse = image_dropped_mse(reconstructor(target, keep, batch.grids, batch.padding), target, keep,
                                        batch.padding).float().cpu()
                rows.append(mse * (n - torch.tensor(ks)) / n)  # over all N tokens; 0 at K = N
        errors.append(torch.stack(rows, dim=1))
        lengths.append(n)
        positive.append((scores > 0).sum(dim=1).cpu() / n)
    return torch.cat(errors), torch.cat(lengths), torch.cat(positive)


def at_ratios(errors: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Each image's error (B, R) read at its own fraction (B,), linearly between grid points."""
    return torch.tensor([np.interp(f, RATIOS, row) for f, row in zip(fractions.tolist(), errors.tolist())])


def tolerance_targets(errors: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Per image (B,): the smallest fraction whose error is within ``tolerance``, linear
    between the grid points around it (the first grid point when that one already is)."""
    targets = []
    for row in errors.tolist():
        j = next(i for i, e in enumerate(row) if e <= tolerance or i == len(row) - 1)
        if j == 0:
            targets.append(RATIOS[0])
            continue
        high, low = row[j - 1], row[j]  # errors at RATIOS[j - 1] (above tolerance) and RATIOS[j]
        share = (high - tolerance) / (high - low) if high > low else 1.0
        targets.append(RATIOS[j - 1] + share * (RATIOS[j] - RATIOS[j - 1]))
    return torch.tensor(targets)


def thumbnails(paths: list[Path]) -> np.ndarray:
    """The predictor's thumbnail of each image file (B, S, S, 3), uint8."""
    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                out.append(thumbnail(image))
        except OSError as e:
            raise ImageFolderError(f"cannot read image {path}: {e}") from e
    return np.stack(out)


def predict(predictor: BudgetPredictor, images: np.ndarray, num_tokens: torch.Tensor) -> torch.Tensor:
    """Fractions (B,) for uint8 thumbnails (B, S, S, 3), through the training forward."""
    with torch.no_grad():
        return torch.sigmoid(predictor(torch.from_numpy(cell_features(images)), num_tokens))


def fit_predictor(images: np.ndarray, num_tokens: torch.Tensor, targets: torch.Tensor, *, steps: int,
                  seed: int) -> BudgetPredictor:
    """A predictor fitted to ``targets`` (B,) from uint8 thumbnails (B, S, S, 3) and token
    counts (B,): squared error of the predicted fraction, AdamW, warmup then cosine decay,
    random horizontal flips (a mirrored image needs as many tokens)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    logs = num_tokens.double().log()
    predictor = BudgetPredictor(BudgetConfig(log_tokens=[float(logs.min()), float(logs.max())]))
    features = torch.stack([torch.from_numpy(cell_features(images)),
                            torch.from_numpy(cell_features(images[:, :, ::-1]))], dim=1)  # (B, 2, cells, F)
    cells = features[:, 0].reshape(-1, features.shape[-1])
    predictor.feature_low.copy_(cells.min(0).values)
    predictor.feature_high.copy_(cells.max(0).values)
    predictor.feature_mean.copy_(cells.mean(0))
    predictor.feature_std.copy_(cells.std(0).clamp_min(1e-4))
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=LR, weight_decay=1e-4)
    predictor.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, steps, LR, min(30, steps // 10))
        idx = torch.randint(len(images), (min(BATCH_SIZE, len(images)),), generator=gen)
        flip = (torch.rand(len(idx), generator=gen) < 0.5).long()
        loss = (torch.sigmoid(predictor(features[idx, flip], num_tokens[idx])) - targets[idx]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return predictor.eval()


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation, None where either side does not vary."""
    if len(a) < 2 or float(a.std()) == 0.0 or float(b.std()) == 0.0:
        return None
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def _summary(values: torch.Tensor) -> dict[str, float]:
    return {"mean": float(values.mean()), "std": float(values.std()) if len(values) > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max())}


def _fit_and_report(target: dict[str, Any], train: tuple, held: tuple | None, *, steps: int, seed: int,
                    judge=None) -> tuple[BudgetPredictor, dict[str, Any]]:
    """Fit the predictor to ``train`` (thumbnails, token counts, target fractions) and
    report how it does on ``held`` (the same, or None: on ``train``); ``judge(predicted,
    targets)`` adds what a target kind measures beyond the fit."""
    predictor = fit_predictor(*train, steps=steps, seed=seed)
    images, lengths, targets = held or train
    predicted = predict(predictor, images, lengths)
    report = {
        "target": {**target, "steps": steps},
        "eval": {
            "images": "held-out" if held else "train (no held-out images)",
            "target_fraction": _summary(targets),
            "predicted_fraction": _summary(predicted),
            "mean_abs_error": float((predicted - targets).abs().mean()),
            "correlation": _correlation(predicted, targets),
            **(judge(predicted, targets) if judge else {}),
        },
    }
    if not math.isfinite(report["eval"]["mean_abs_error"]):
        raise ValueError(f"budget predictor training diverged: {report['eval']}")
    return predictor, report


def fit_sample(num_images: int, limit: int, seed: int) -> list[int]:
    """The training images the predictor is fitted on: all, or a seeded uniform sample of
    ``limit`` (sorted positions). It bounds the fit's memory (a thumbnail and its statistics
    per image) and its 20 reconstructor passes per image whatever the folder's size; 500
    steps of 64 draw each of 4,096 images about 8 times."""
    if num_images <= limit:
        return list(range(num_images))
    return sorted(torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:limit].tolist())


def train_budget(selector: TokenSelector, reconstructor: TokenReconstructor, train_set: FeatureSet,
                 train_paths: list[Path], *, keep_ratio: float, tolerance: float | None, steps: int, seed: int,
                 images: int, held_set: FeatureSet | None = None, held_paths: list[Path] | None = None
                 ) -> tuple[BudgetPredictor, dict[str, Any]]:
    """The budget predictor for a trained selector and reconstructor (the reconstruction
    tolerance target), fitted on at most ``images`` training images (``fit_sample``), and
    what its checkpoint section records: the target, the tolerance, and how the predictions
    and the positive-logit fractions compare with the targets (held-out images when given)."""
    sample = fit_sample(len(train_paths), images, seed)
    errors, lengths, positive = error_curves(selector, reconstructor, train_set, images=sample)
    train_paths = [train_paths[i] for i in sample]
    chosen = tolerance is None
    if chosen:
        tolerance = float(at_ratios(errors, torch.full((len(errors),), keep_ratio)).median())
    if not math.isfinite(tolerance):
        raise ValueError(f"budget predictor: the tolerance is {tolerance}")
    train = (thumbnails(train_paths), lengths, tolerance_targets(errors, tolerance))
    held = None
    if held_set is not None and held_paths:
        errors, lengths, positive = error_curves(selector, reconstructor, held_set)
        held = (thumbnails(held_paths), lengths, tolerance_targets(errors, tolerance))

    def judge(predicted, targets):
        mean_fraction = torch.full_like(predicted, float(predicted.mean()))
        return {  # at the same mean fraction: adaptive K per image against one ratio for all
            "error_at_predicted": float(at_ratios(errors, predicted).mean()),
            "error_at_mean_fraction": float(at_ratios(errors, mean_fraction).mean()),
            "logit_fraction": {**_summary(positive), "correlation_with_target": _correlation(positive, targets)},
        }

    target = {"kind": "reconstruction tolerance",
              "metric": "squared error of the rebuilt tokens over all N, standardized features",
              "tolerance": tolerance, "median_error_at_keep_ratio": keep_ratio if chosen else None,
              "ratios": list(RATIOS), "train_images": len(sample)}
    return _fit_and_report(target, train, held, steps=steps, seed=seed, judge=judge)


def above_even_share(scores: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """(B,) how many of each image's tokens the selector rates above an even share: softmax
    weight over the image's own tokens > 1/N. ``padding`` (B, L) marks tokens past N."""
    weights = torch.softmax(scores.float().masked_fill(padding, -math.inf), dim=1)
    n = (~padding).sum(dim=1, keepdim=True)
    return (weights * n > 1).sum(dim=1)


def share_targets(counts: torch.Tensor, lengths: torch.Tensor, *, margin: float, extra: float) -> torch.Tensor:
    """Per image, the fraction ``min(1, ((1 + margin) * count + extra) / N)``: the count
    with room for the predictor's own error (``docs/methods.md``)."""
    return (((1 + margin) * counts.double() + extra) / lengths.double()).clamp(max=1.0).float()


def train_share_budget(train: tuple[np.ndarray, torch.Tensor, torch.Tensor],
                       held: tuple[np.ndarray, torch.Tensor, torch.Tensor] | None, *, margin: float, extra: float,
                       steps: int, seed: int) -> tuple[BudgetPredictor, dict[str, Any]]:
    """The budget predictor of a selector fitted to the model's attention: per image
    (thumbnails, token counts N, ``above_even_share`` counts), its target is that count
    with a margin (``share_targets``); the report adds how often the predicted K holds
    the count itself."""

    def as_targets(part):
        images, lengths, counts = part
        return images, lengths, share_targets(counts, lengths, margin=margin, extra=extra)

    _, lengths, counts = held or train

    def judge(predicted, targets):
        kept = torch.tensor([keep_count(int(n), float(f)) for n, f in zip(lengths, predicted)])
        return {"count_fraction": _summary(counts.double() / lengths.double()),
                "count_covered": float((kept >= counts).double().mean())}

    target = {"kind": "above an even share",
              "metric": "tokens whose selector softmax weight exceeds 1/N, times (1 + margin), plus extra",
              "margin": margin, "extra": extra}
    return _fit_and_report(target, as_targets(train), held and as_targets(held), steps=steps, seed=seed,
                           judge=judge)


def format_budget_report(report: dict[str, Any]) -> str:
    e, t = report["eval"], report["target"]
    corr = "n/a" if e["correlation"] is None else f"{e['correlation']:.2f}"
    goal = f"tolerance {t['tolerance']:.4g}" if "tolerance" in t else f"margin {t['margin']:g}, extra {t['extra']:g}"
    line = (f"budget predictor ({e['images']} images): target fraction {e['target_fraction']['mean']:.3f} "
            f"+- {e['target_fraction']['std']:.3f} ({t['kind']}, {goal}); predicted "
            f"{e['predicted_fraction']['mean']:.3f} +- {e['predicted_fraction']['std']:.3f}, mean abs error "
            f"{e['mean_abs_error']:.3f}, correlation {corr}")
    if "error_at_predicted" in e:
        line += (f"; error at predicted K {e['error_at_predicted']:.4f} vs {e['error_at_mean_fraction']:.4f} at one "
                 f"ratio of the same mean; positive-logit fraction {e['logit_fraction']['mean']:.3f} "
                 f"+- {e['logit_fraction']['std']:.3f}")
    if "count_covered" in e:
        line += (f"; tokens above an even share {e['count_fraction']['mean']:.3f} +- "
                 f"{e['count_fraction']['std']:.3f} of N, all of them within the predicted K on "
                 f"{100 * e['count_covered']:.1f}% of the images")
    return line
