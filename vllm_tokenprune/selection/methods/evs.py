"""EVS, Efficient Video Sampling (Bagrov et al., 2025, arXiv 2510.14624): a video keeps the
tokens that changed most since the previous frame.

A token's score is its dissimilarity to the token at the same place in the previous frame,
1 - cosine similarity of their features; every token of the first frame scores 255, so the
first frame is kept whole (the processor raises K to at least one frame for it,
``policy.video_keep_count``). The clip keeps its K highest scores over all frames, so a
static scene gives its budget to the frames where something moves. Ties go to the lower
index, as a stable descending sort orders them: the rule of vLLM's own EVS
(``vllm/multimodal/video_prune/evs.py``), which keeps the same tokens at the same K.

A video's ``Tokens`` hold all its frames in order, ``grids`` one (rows, cols) per frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_tokenprune.selection.methods import Method, Rows, Tokens
from vllm_tokenprune.selection.methods.batch import padded
from vllm_tokenprune.selection.methods.topk import top_k_rows

FIRST_FRAME = 255.0  # above any dissimilarity (which is at most 2)


def dissimilarity(tokens: Tokens) -> torch.Tensor:
    """(N,) each token's 1 - cosine similarity to its place in the previous frame; the first
    frame's ``FIRST_FRAME``. In the features' dtype, as vLLM computes it."""
    frames = len(tokens.grids)
    x = tokens.features.reshape(frames, len(tokens) // frames, -1)
    changed = 1 - torch.nn.functional.cosine_similarity(x[1:], x[:-1], dim=-1)
    return torch.cat([torch.full_like(x[:1, :, 0], FIRST_FRAME), changed]).reshape(-1)


def _keep(batch: Sequence[Tokens], ks: Sequence[int]) -> list[Rows]:
    for tokens in batch:
        if len({tuple(g) for g in tokens.grids}) != 1:
            raise ValueError(f"EVS compares frames of one size; got grids {tokens.grids}")
    # float32 keeps bf16 scores' order and ties; -inf pads the shorter clips
    scores = padded([dissimilarity(tokens).float() for tokens in batch], fill=float("-inf"))
    return [tokens.take(index) for tokens, index in zip(batch, top_k_rows(scores, ks))]


evs = Method("evs", _keep, first_frame_whole=True)
