"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity
for Token Pruning in MLLMs", NeurIPS 2025, arXiv 2506.10967): the most diverse set of
tokens, with diversity conditioned on the question.

Keep the K tokens whose conditional kernel L = diag(q) S diag(q) has the largest
determinant (the MAP set of a determinantal point process). S is the cosine similarity of
the tokens' features, a Gram matrix and so positive semi-definite: the determinant is the
squared volume the kept tokens span, large for tokens unlike each other. q_i = exp(alpha r_i)
is token i's quality: r_i its relevance to the question, the mean cosine similarity of its
embedding to the question's token embeddings, scaled to [0, 1] over the image. Then
log det L = 2 alpha sum(r) + log det S: alpha weighs relevance against diversity, and
alpha = theta / (2 (1 - theta)) with theta = 0.5 weighs them evenly. MAP inference is
NP-hard; the greedy rule (add the token that multiplies the determinant most) is computed
with the incremental Cholesky factor of Chen et al. ("Fast Greedy MAP Inference for
Determinantal Point Process to Improve Recommendation Diversity", NeurIPS 2018), in
O(N K (D + K)) without forming L.

Written from the papers. Deviations: relevance always comes from the served language
model's input embeddings (the projector's output against the question's word embeddings),
as no family here has a text encoder paired with its tower; with no question (Q = 0) every
token has the same quality and the rule is a plain DPP over the features. Once the kept
tokens span the features' whole space (K above the feature rank) no token adds volume, and
the rest are taken by relevance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_tokenprune.selection.methods import Method, Rows, Tokens
from vllm_tokenprune.selection.methods.batch import gather_rows, padded, real_tokens, row_dots, take_picks

THETA = 0.5
# A residual variance under this adds no volume: the kept tokens already span the token.
_SPANNED = 1e-6


def relevance(embeddings: torch.Tensor, query: torch.Tensor | None) -> torch.Tensor:
    """(N,) each token's mean cosine similarity to the question's tokens, scaled to [0, 1]
    over the image; zeros without a question (or when every token is equally relevant)."""
    n = len(embeddings)
    if query is None or len(query) == 0:
        return torch.zeros(n, device=embeddings.device)
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    words = torch.nn.functional.normalize(query.float().to(unit.device), dim=-1)
    r = (unit @ words.T).mean(dim=1)
    spread = r.max() - r.min()
    return torch.where(spread > 0, (r - r.min()) / spread, 0.0)


def greedy_dpp_batch(features: torch.Tensor, quality: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k): the picks of the greedy MAP rule under L = diag(quality) S diag(quality), S
    the cosine similarity of ``features`` (B, W, D), among each row's real tokens (``mask``),
    in pick order; a row's picks past its own K are unused. Ties go to the lower index. Once
    a row's picks span its features, the rest of its picks go by quality."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    quality = quality.float()
    b, w, _ = unit.shape
    # Row i of the Cholesky factor of L restricted to the picks, and i's residual variance
    # d2[i] = L_ii - |c_i|^2: the factor by which adding i multiplies det L of the picks.
    factor = unit.new_zeros(b, w, k)
    d2 = quality.square()
    picks = torch.empty(b, k, dtype=torch.long, device=unit.device)
    taken = ~mask  # picked, or padding
    spanned = torch.zeros(b, dtype=torch.bool, device=unit.device)
    for step in range(k):
        residual = d2.masked_fill(taken, -torch.inf)
        j = residual.argmax(dim=1)
        q_j = quality.gather(1, j[:, None])[:, 0]
        spanned |= residual.gather(1, j[:, None])[:, 0] <= _SPANNED * q_j.square()
        j = torch.where(spanned, quality.masked_fill(taken, -torch.inf).argmax(dim=1), j)
        picks[:, step] = j
        taken = taken.scatter(1, j[:, None], True)
        q_j = quality.gather(1, j[:, None])
        row = q_j * quality * row_dots(unit, gather_rows(unit, j))  # L[j, :]
        projected = row_dots(factor[:, :, :step], gather_rows(factor, j)[:, :step])
        e = (row - projected) / d2.gather(1, j[:, None]).sqrt()
        e = torch.where(spanned[:, None], 0.0, e)  # a spanned row adds no volume: its factor stays
        factor[:, :, step] = e
        d2 = d2 - e.square()
    return picks


def greedy_dpp(features: torch.Tensor, quality: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k,) the greedy MAP rule picks for one image's ``features`` (N, D)."""
    mask = torch.ones(1, len(features), dtype=torch.bool, device=features.device)
    return greedy_dpp_batch(features[None], quality[None], mask, k)[0]


def _keep(batch: Sequence[Tokens], ks: Sequence[int]) -> list[Rows]:
    alpha = THETA / (2 * (1 - THETA))
    mask = real_tokens(batch)
    quality = padded([torch.exp(alpha * relevance(t.embeddings, t.query)) for t in batch])
    picks = greedy_dpp_batch(padded([t.features for t in batch]), quality, mask, max(ks))
    return take_picks(batch, picks, ks)


cdpruner = Method("cdpruner", _keep, reads_query=True, quadratic_memory=True)
