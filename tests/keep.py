"""What the ``learned`` method keeps, for tests that hold a selector and features: the
K = keep_count(N, ratio) best tokens by the selector's scores, in stock order."""

import torch

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection.methods.topk import topk_sorted


@torch.no_grad()
def learned_keep(selector, features: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N, D) -> (K,); (B, N, D) -> (B, K)."""
    scores = selector.scores(features)
    return topk_sorted(scores, keep_count(scores.shape[-1], ratio))
