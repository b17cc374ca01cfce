"""Methods that rank tokens by one score each and keep the top K: the learned selector
(image only, or reading the question), random, and feature norm. Ties break the same way
everywhere (``topk_sorted``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_tokenprune.selection.methods import Method, Rows, Tokens
from vllm_tokenprune.selection.methods.topk import topk_sorted


def top_k(score: Callable[[Tokens], torch.Tensor]) -> Callable[[Tokens, int], Rows]:
    """A method's ``keep`` that takes the K best-scoring tokens as they are."""
    return lambda tokens, k: tokens.take(topk_sorted(score(tokens), k))


def _learned(tokens: Tokens) -> torch.Tensor:
    if tokens.selector is None:
        raise ValueError("prune method 'learned' needs a selector; none is loaded")
    return tokens.selector.scores(tokens.features)


def _learned_query(tokens: Tokens) -> torch.Tensor:
    if tokens.query_selector is None:
        raise ValueError("prune method 'learned_query' needs a selector checkpoint with a question-reading "
                         "selector (`vllm-tokenprune train-query`); none is loaded")
    return tokens.query_selector.scores(tokens.features, query=tokens.query)


def _random(tokens: Tokens) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(tokens.seed)
    return torch.rand(len(tokens), generator=gen).to(tokens.features.device)


def _norm(tokens: Tokens) -> torch.Tensor:
    # Saliency by feature magnitude: a strong training-free baseline on CLIP-like towers.
    return tokens.features.float().norm(dim=-1)


learned = Method("learned", top_k(_learned))
learned_query = Method("learned_query", top_k(_learned_query), reads_query=True)
random = Method("random", top_k(_random))
norm = Method("norm", top_k(_norm))
