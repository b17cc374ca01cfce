"""MMTok (Dong et al., "MMTok: Multimodal Coverage Maximization for Efficient Inference of
VLMs", arXiv 2508.18264): the tokens that best cover both the question and the image.

Token selection as maximum coverage. A kept set S covers a question token t as well as its
most similar kept token does, and likewise every image token u:

    f(S) = mean_t max_{v in S} sim(t, v) + LAMBDA * mean_u max_{v in S} sim(u, v)

text-to-image similarity in the language model's input space (the question's word
embeddings against the image's embeddings), image-to-image similarity in the features.
Both terms are facility-location functions, monotone and submodular, so the greedy rule
(add the token of largest marginal gain) keeps at least 1 - 1/e of the best f for its K.
Gains are updated only where a pick raised a row's coverage (the rows of question and
image tokens it now covers best), so later picks, which change few rows, cost little.

Written from the paper. Deviations: similarities are cosines mapped to [0, 1] (a facility
location needs non-negative similarities to be monotone), each term is a mean so that the
two share one scale whatever the question's length, and LAMBDA = 1 weighs them evenly;
the paper's optional agent (a small VLM that writes a caption to widen the question) is
not used. With no question (Q = 0) only the image term is left.
"""

from __future__ import annotations

import torch

from vllm_tokenprune.selection.methods import Method, Rows, Tokens

LAMBDA = 1.0


def _similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of rows of ``a`` to rows of ``b``, mapped to [0, 1]."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float().to(a.device), dim=-1)
    return (1 + a @ b.T) / 2


def coverage_matrix(tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """What each candidate covers: (R, N) similarity of every covered row (question tokens,
    then image tokens) to every candidate, and (R,) each row's weight in f."""
    image = _similarity(tokens.features, tokens.features)
    n = len(tokens)
    weights = torch.full((n,), LAMBDA / n, device=image.device)
    if tokens.query is None or len(tokens.query) == 0:
        return image, weights
    text = _similarity(tokens.query, tokens.embeddings)
    return (torch.cat([text, image]),
            torch.cat([torch.full((len(text),), 1 / len(text), device=image.device), weights]))


def greedy_coverage(sim: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k,) the greedy rule picks for f(S) = sum_r weights[r] max_{v in S} sim[r, v],
    in pick order. Ties go to the lower index."""
    covered = torch.zeros(len(sim), device=sim.device)
    gains = (weights[:, None] * sim).sum(dim=0)  # f({v}) - f({}) for every v
    picks = torch.empty(k, dtype=torch.long, device=sim.device)
    picked = torch.zeros(sim.shape[1], dtype=torch.bool, device=sim.device)
    for step in range(k):
        j = int(gains.masked_fill(picked, -torch.inf).argmax())
        picks[step] = j
        picked[j] = True
        raised = sim[:, j] > covered
        rows, old, new = sim[raised], covered[raised, None], sim[raised, j, None]
        gains -= (weights[raised, None] * ((rows - old).clamp(min=0) - (rows - new).clamp(min=0))).sum(dim=0)
        covered[raised] = sim[raised, j]
    return picks


def _keep(tokens: Tokens, k: int) -> Rows:
    sim, weights = coverage_matrix(tokens)
    return tokens.take(greedy_coverage(sim, weights, k).sort().values)


mmtok = Method("mmtok", _keep, reads_query=True)
