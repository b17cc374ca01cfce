"""HiPrune (Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical
Attention in Vision-Language Models", arXiv 2508.00553, its method section).

The tower's middle layers attend to objects, its deep layers to tokens carrying global
information. Anchor tokens: the tokens receiving the most attention (from all queries,
heads averaged) in a middle "object" layer. Buffer tokens: the anchors' neighbours above,
below, left and right, for spatial continuity. Register tokens: the tokens receiving the
most attention in the layer whose output the model uses, filling the rest of K. Anchors
and buffers take about a fraction alpha = 0.1 of K (K * alpha / 5 anchors, each with up to
four buffers), the paper's default. Object layer (chosen by the model family): the paper's
9th of CLIP-L's 24 layers and 16th of Qwen2.5-VL's 32 blocks.

Neighbours stay inside an image's grid (the released code steps +-1 across row ends).
"""

from __future__ import annotations

import math

from vllm_tokenprune.selection.methods import GLOBAL_ATTENTION, LATE, MIDDLE, Method, Probe, Rows, Tokens, per_image
from vllm_tokenprune.selection.methods.grid import with_neighbours
from vllm_tokenprune.selection.methods.topk import topk_sorted

OBJECT = Probe(GLOBAL_ATTENTION, MIDDLE)
DEEP = Probe(GLOBAL_ATTENTION, LATE)
ALPHA = 0.1


def _keep(tokens: Tokens, k: int) -> Rows:
    anchor_count = math.floor(k * ALPHA / 5 + 0.5)
    deep = tokens.stats[DEEP].float()
    if not anchor_count:
        return tokens.take(topk_sorted(deep, k))
    # Anchors and buffers (at most 5 * anchors <= K tokens) rank first, registers after them
    # by deep-layer attention: one top-K whose size never depends on the data.
    local = with_neighbours(topk_sorted(tokens.stats[OBJECT], anchor_count), tokens.grids)
    return tokens.take(topk_sorted(deep.masked_fill(local, math.inf), k))


hiprune = Method("hiprune", per_image(_keep), needs=frozenset({OBJECT, DEEP}))
