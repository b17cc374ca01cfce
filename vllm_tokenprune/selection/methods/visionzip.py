"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision
Language Models", CVPR 2025, arXiv 2412.04467: "Dominant Token Selection" and
"Contextual Tokens Merging").

Dominant tokens: the tokens the [CLS] token attends to most in the layer whose output the
model uses (heads averaged; towers without a [CLS] token rank by the attention each token
receives from all queries). Contextual tokens: the remaining tokens are split into targets,
sampled uniformly over them, and the rest, each merged into the target whose key (that
layer's keys, heads averaged) is most similar; a contextual token is the mean of its target
and the tokens merged into it, placed at the target's position. K splits as in the paper's
settings, 54 dominant + 10 contextual of 64 (108 + 20 of 128, 162 + 30 of 192).

The released code adds the mean of the merged tokens to the target instead of averaging
the group; this follows the paper's description (a merged token is an average).
"""

from __future__ import annotations

import math

import torch

from vllm_tokenprune.selection.methods import ATTENTION, KEYS, LATE, Method, Probe, Rows, Tokens, per_image
from vllm_tokenprune.selection.methods.topk import topk_sorted

SCORE = Probe(ATTENTION, LATE)
SIMILARITY = Probe(KEYS, LATE)
CONTEXTUAL_SHARE = 10 / 64


def split(k: int) -> tuple[int, int]:
    """(dominant, contextual) counts for K: 64 -> (54, 10)."""
    contextual = math.floor(k * CONTEXTUAL_SHARE + 0.5)
    return k - contextual, contextual


def _keep(tokens: Tokens, k: int) -> Rows:
    dominant_count, contextual_count = split(k)
    dominant = topk_sorted(tokens.stats[SCORE], dominant_count)
    if contextual_count == 0:
        return tokens.take(dominant)
    n, device = len(tokens), dominant.device
    # The N - dominant others in stock order, targets every len(rest) // c of them from the
    # first (len(rest) >= c since K < N): by stable sorts of masks, so no size is data's.
    rest = _unmarked(dominant, n)
    targets_at = torch.arange(contextual_count, device=device) * ((n - dominant_count) // contextual_count)
    targets, merged = rest[targets_at], rest[_unmarked(targets_at, len(rest))]
    keys = torch.nn.functional.normalize(tokens.stats[SIMILARITY].float(), dim=-1)
    nearest = (keys[merged] @ keys[targets].T).argmax(dim=1)

    index, order = torch.cat([dominant, targets]).sort()
    row_of = torch.empty_like(order)
    row_of[order] = torch.arange(k, device=device)  # row of dominant[i] / targets[j]
    groups = torch.full((n,), -1, dtype=torch.long, device=device)
    groups[dominant] = row_of[:dominant_count]
    groups[targets] = row_of[dominant_count:]
    groups[merged] = row_of[dominant_count + nearest]
    return tokens.merge(index, groups)


def _unmarked(marked: torch.Tensor, n: int) -> torch.Tensor:
    """The n - len(marked) indices below n not in ``marked`` (distinct), ascending."""
    flags = torch.zeros(n, dtype=torch.uint8, device=marked.device).index_fill_(0, marked, 1)
    return flags.sort(stable=True).indices[:n - len(marked)]


visionzip = Method("visionzip", per_image(_keep), needs=frozenset({SCORE, SIMILARITY}))
