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

import torch

from vllm_tokenprune.selection.methods import Method, Rows, Tokens

# Rows of the N x N distance matrix computed at once for the first pick (memory bound).
_CHUNK_ELEMENTS = 1 << 24


def greedy_max_min(points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k,) the greedy max-min rule picks from ``points`` (N, D), in pick order.
    Ties go to the lower index."""
    unit = torch.nn.functional.normalize(points.float(), dim=-1)
    n = len(unit)
    # First pick: the largest nearest-neighbour distance, itself excluded.
    nearest = torch.empty(n, dtype=torch.float32, device=unit.device)
    step = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n, step):
        dist = 1 - unit[start:start + step] @ unit.T
        rows = torch.arange(len(dist), device=unit.device)
        dist[rows, rows + start] = torch.inf
        nearest[start:start + step] = dist.min(dim=1).values
    # Picks stay on the device: no host round trip per pick.
    picks = torch.empty(k, dtype=torch.long, device=unit.device)
    picks[0] = nearest.argmax()
    to_picks = 1 - unit @ unit[picks[0]]  # each token's distance to its nearest pick
    for i in range(1, k):
        to_picks.index_fill_(0, picks[i - 1:i], -torch.inf)  # never picked twice, even among duplicates
        picks[i] = to_picks.argmax()
        to_picks = torch.minimum(to_picks, 1 - unit @ unit[picks[i]])
    return picks


def _keep(tokens: Tokens, k: int) -> Rows:
    return tokens.take(greedy_max_min(tokens.embeddings, k).sort().values)


divprune = Method("divprune", _keep)
