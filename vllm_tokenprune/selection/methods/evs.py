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
Where the prompt holds each frame's run apart (``Tokens.frames_apart``: Qwen3-VL's frames sit
between timestamps), each frame keeps its own highest scores, its share of K instead
(``policy.frame_shares``: the first frame whole, the rest shared evenly over the others).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_tokenprune.policy import frame_shares
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
    spread = [j for j, tokens in enumerate(batch) if not tokens.frames_apart]
    apart = [j for j, tokens in enumerate(batch) if tokens.frames_apart]
    out: list[Rows | None] = [None] * len(batch)
    if spread:
        # float32 keeps bf16 scores' order and ties; -inf pads the shorter clips
        scores = padded([dissimilarity(batch[j]).float() for j in spread], fill=float("-inf"))
        for j, index in zip(spread, top_k_rows(scores, [ks[j] for j in spread])):
            out[j] = batch[j].take(index)
    if apart:
        # each frame its own share: every frame of every clip one row of one ranking
        frames = [dissimilarity(batch[j]).float().reshape(len(batch[j].grids), -1) for j in apart]
        shares = [frame_shares(ks[j], [f.shape[1]] * len(f), first_frame_whole=True) for j, f in zip(apart, frames)]
        tops = iter(top_k_rows(padded([row for f in frames for row in f], fill=float("-inf")),
                               [s for clip in shares for s in clip]))
        for j, f in zip(apart, frames):
            out[j] = batch[j].take(torch.cat([next(tops) + i * f.shape[1] for i in range(len(f))]))
    return out


evs = Method("evs", _keep, first_frame_whole=True)
