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

import torch

from vllm_tokenprune.selection.methods import Method, Rows, Tokens
from vllm_tokenprune.selection.methods.topk import topk_sorted

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
    return (r - r.min()) / spread if spread > 0 else torch.zeros_like(r)


def greedy_dpp(features: torch.Tensor, quality: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k,) the greedy MAP rule picks under L = diag(quality) S diag(quality), S the
    cosine similarity of ``features`` (N, D), in pick order. Ties go to the lower index."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    quality = quality.float()
    n = len(unit)
    # Row i of the Cholesky factor of L restricted to the picks, and i's residual variance
    # d2[i] = L_ii - |c_i|^2: the factor by which adding i multiplies det L of the picks.
    factor = torch.zeros(n, k, device=unit.device)
    d2 = quality.square().clone()
    picks = torch.empty(k, dtype=torch.long, device=unit.device)
    picked = torch.zeros(n, dtype=torch.bool, device=unit.device)
    for step in range(k):
        residual = d2.masked_fill(picked, -torch.inf)
        j = int(residual.argmax())
        if residual[j] <= _SPANNED * quality[j].square():
            rest = topk_sorted(quality.masked_fill(picked, -torch.inf), k - step)
            picks[step:] = rest[quality[rest].argsort(descending=True, stable=True)]
            break
        picks[step] = j
        picked[j] = True
        row = quality[j] * quality * (unit @ unit[j])  # L[j, :]
        e = (row - factor[:, :step] @ factor[j, :step]) / d2[j].sqrt()
        factor[:, step] = e
        d2 = d2 - e.square()
    return picks


def _keep(tokens: Tokens, k: int) -> Rows:
    alpha = THETA / (2 * (1 - THETA))
    quality = torch.exp(alpha * relevance(tokens.embeddings, tokens.query))
    return tokens.take(greedy_dpp(tokens.features, quality, k).sort().values)


cdpruner = Method("cdpruner", _keep, reads_query=True)
