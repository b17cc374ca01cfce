"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models", CVPR 2025, arXiv 2503.02175: the MMDP formulation and its greedy
solution).

Pruning as a Max-Min Diversity Problem: keep the K tokens whose smallest pairwise
distance is largest, distance = 1 - cosine similarity of the tokens as the language model
receives them (after LLaVA's projector). The problem is NP-hard; the paper solves it
greedily: first the token farthest from its nearest neighbour, then, K - 1 times, the token
whose distance to the nearest already-kept token is largest. Written from the paper; the
reference code's licence (CC BY-NC 4.0) keeps it out of this package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_tokenprune.selection.methods import Method, Rows, Tokens
from vllm_tokenprune.selection.methods.batch import gather_rows, padded, real_tokens, row_dots, take_picks

# Elements of the distance matrices computed at once for the first pick (memory bound).
_CHUNK_ELEMENTS = 1 << 24


def greedy_max_min_batch(points: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k): the picks of the greedy max-min rule in each row of ``points`` (B, W, D), in
    pick order, among its real tokens (``mask``, B x W). Ties go to the lower index. The k
    steps run on the device for all rows at once; a row's picks past its own K are unused."""
    unit = torch.nn.functional.normalize(points.float(), dim=-1)
    b, w, _ = unit.shape
    # First pick: the largest nearest-neighbour distance among real tokens, itself excluded.
    nearest = torch.empty(b, w, dtype=torch.float32, device=unit.device)
    step = max(1, _CHUNK_ELEMENTS // (b * w))
    for start in range(0, w, step):
        dist = 1 - unit[:, start:start + step] @ unit.transpose(1, 2)  # (B, rows, W)
        rows = torch.arange(dist.shape[1], device=unit.device)
        dist[:, rows, rows + start] = torch.inf
        nearest[:, start:start + step] = dist.masked_fill(~mask[:, None, :], torch.inf).min(dim=2).values
    picks = torch.empty(b, k, dtype=torch.long, device=unit.device)
    picks[:, 0] = nearest.masked_fill(~mask, -torch.inf).argmax(dim=1)
    # Each token's distance to its nearest pick; padding never wins.
    to_picks = (1 - row_dots(unit, gather_rows(unit, picks[:, 0]))).masked_fill(~mask, -torch.inf)
    for i in range(1, k):
        to_picks.scatter_(1, picks[:, i - 1:i], -torch.inf)  # never picked twice, even among duplicates
        picks[:, i] = to_picks.argmax(dim=1)
        to_picks = torch.minimum(to_picks, 1 - row_dots(unit, gather_rows(unit, picks[:, i])))
    return picks


def greedy_max_min(points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k,) the greedy max-min rule picks from ``points`` (N, D), in pick order."""
    return greedy_max_min_batch(points[None], torch.ones(1, len(points), dtype=torch.bool,
                                                         device=points.device), k)[0]


def _keep(batch: Sequence[Tokens], ks: Sequence[int]) -> list[Rows]:
    mask = real_tokens(batch)
    picks = greedy_max_min_batch(padded([t.embeddings for t in batch]), mask, max(ks))
    return take_picks(batch, picks, ks)


divprune = Method("divprune", _keep)
