"""The ranking every method shares: the k best scores, in stock order, ties to the lower
index, so that the same scores always keep the same tokens."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from vllm_tokenprune.selection.methods.batch import to_device


def topk_sorted(scores: torch.Tensor, k: int | Sequence[int]) -> torch.Tensor | list[torch.Tensor]:
    """Indices of the k highest scores, returned in ascending (spatial) order.

    Ties go to the lower index (a stable descending sort; torch.topk promises no order
    among equal values), so the selection is deterministic. scores (N,) with int k ->
    (k,); (B, N) with int k -> (B, k); (B, N) with one k per row -> list of (k_b,).
    """
    if torch.is_tensor(k) and k.dim() == 0:
        k = int(k)
    if scores.dim() == 2 and not isinstance(k, numbers.Integral):
        ks = [int(v) for v in k]
        if len(ks) != scores.shape[0]:
            raise ValueError(f"got {len(ks)} values of k for {scores.shape[0]} rows")
        if not all(1 <= kk <= scores.shape[1] for kk in ks):
            raise ValueError(f"every k must be in [1, {scores.shape[1]}], got {ks}")
        return top_k_rows(scores, ks)
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be (N,) or (B, N), got shape {tuple(scores.shape)}")
    k, n = int(k), scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def top_k_rows(scores: torch.Tensor, ks: Sequence[int]) -> list[torch.Tensor]:
    """Per row of ``scores`` (B, W; -inf at padding), the indices of its k highest scores in
    ascending order, ties to the lower index: one sort for the batch, no device read."""
    width = scores.shape[1]
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :max(ks)]
    taken = torch.arange(best.shape[1], device=scores.device)[None, :] < to_device(ks, scores.device)[:, None]
    ascending = torch.where(taken, best, width).sort(dim=1).values
    return [ascending[b, :k] for b, k in enumerate(ks)]
