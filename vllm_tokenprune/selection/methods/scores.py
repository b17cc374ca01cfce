"""Methods that rank tokens by one score each and keep the top K: the learned selector
(image only, or reading the question), random, and feature norm. A batch is scored at once
(one selector forward for all its images, padded and masked) and ranked at once; ties
break the same way everywhere (``topk.top_k_rows``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vllm_tokenprune.selection.methods import Method, Rows, Tokens
from vllm_tokenprune.selection.methods.batch import padded, real_tokens, to_device, valid
from vllm_tokenprune.selection.methods.topk import top_k_rows


def top_k(score: Callable[[Sequence[Tokens], torch.Tensor], torch.Tensor]
          ) -> Callable[[Sequence[Tokens], Sequence[int]], list[Rows]]:
    """A method's ``keep`` that takes each image's K best-scoring tokens as they are.
    ``score(batch, mask)`` gives (B, W) floating scores for the padded batch and its mask of
    real tokens."""

    def keep(batch: Sequence[Tokens], ks: Sequence[int]) -> list[Rows]:
        mask = real_tokens(batch)
        scores = score(batch, mask).masked_fill(~mask, float("-inf"))
        return [tokens.take(index) for tokens, index in zip(batch, top_k_rows(scores, ks))]

    return keep


def _learned(batch: Sequence[Tokens], mask: torch.Tensor) -> torch.Tensor:
    selector = batch[0].selector
    if selector is None:
        raise ValueError("prune method 'learned' needs a selector; none is loaded")
    return selector.scores(padded([t.features for t in batch]), _unless_full(batch, mask))


def _learned_query(batch: Sequence[Tokens], mask: torch.Tensor) -> torch.Tensor:
    selector = batch[0].query_selector
    if selector is None:
        raise ValueError("prune method 'learned_query' needs a selector checkpoint with a question-reading "
                         "selector (`vllm-tokenprune train-query`); none is loaded")
    features = padded([t.features for t in batch])
    questions = [t.query if t.query is not None else features.new_zeros(0, selector.config.query_dim)
                 for t in batch]
    lengths = [len(q) for q in questions]
    if not any(lengths):
        return selector.scores(features, _unless_full(batch, mask))
    query_padding = None if min(lengths) == max(lengths) else ~valid(lengths, features.device)
    return selector.scores(features, _unless_full(batch, mask), query=padded(questions),
                           query_padding=query_padding)


def _unless_full(batch: Sequence[Tokens], mask: torch.Tensor) -> torch.Tensor | None:
    """The selector's padding mask; None when every image has the batch's N."""
    return None if len({len(t) for t in batch}) == 1 else ~mask


# A 32-bit integer mixer (two xor-shift-multiply rounds): each (seed, token) a uniform-looking
# draw, on any device, with no generator state; multipliers below 2**31 keep products in int64.
_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def _random(batch: Sequence[Tokens], mask: torch.Tensor) -> torch.Tensor:
    seeds = to_device([t.seed for t in batch], mask.device)[:, None]
    token = torch.arange(mask.shape[1], device=mask.device)[None, :]
    draw = _mix32(_mix32(token ^ (seeds & _MASK32)) ^ (seeds >> 32))
    return draw.double()  # exact: 32-bit integers


def _norm(batch: Sequence[Tokens], mask: torch.Tensor) -> torch.Tensor:
    # Saliency by feature magnitude: a strong training-free baseline on CLIP-like towers.
    return padded([t.features for t in batch]).float().norm(dim=-1)


learned = Method("learned", top_k(_learned), uses_selector="selector")
learned_query = Method("learned_query", top_k(_learned_query), reads_query=True, uses_selector="query")
random = Method("random", top_k(_random))
norm = Method("norm", top_k(_norm))
