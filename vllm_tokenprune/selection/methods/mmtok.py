"""MMTok (Dong et al., "MMTok: Multimodal Coverage Maximization for Efficient Inference of
VLMs", arXiv 2508.18264): the tokens that best cover both the question and the image.

Token selection as maximum coverage. A kept set S covers a question token t as well as its
most similar kept token does, and likewise every image token u:

    f(S) = mean_t max_{v in S} sim(t, v) + LAMBDA * mean_u max_{v in S} sim(u, v)

text-to-image similarity in the language model's input space (the question's word
embeddings against the image's embeddings), image-to-image similarity in the features.
Both terms are facility-location functions, monotone and submodular, so the greedy rule
(add the token of largest marginal gain) keeps at least 1 - 1/e of the best f for its K.
The picks of a batch's images run together on the device, padded: a step updates every
candidate's gain from the rows whose coverage the pick raised.

Written from the paper. Deviations: similarities are cosines mapped to [0, 1] (a facility
location needs non-negative similarities to be monotone), each term is a mean so that the
two share one scale whatever the question's length, and LAMBDA = 1 weighs them evenly;
the paper's optional agent (a small VLM that writes a caption to widen the question) is
not used. With no question (Q = 0) only the image term is left.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_tokenprune.selection.methods import Method, Rows, Tokens
from vllm_tokenprune.selection.methods.batch import padded, real_tokens, take_picks

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


def greedy_coverage_batch(sim: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k): the picks of the greedy rule for f(S) = sum_r weights[r] max_{v in S} sim[r, v]
    in each row of the batch (``sim`` B x R x W, ``weights`` B x R, zero at padding), among its
    real candidates (``mask``, B x W), in pick order; a row's picks past its own K are unused.
    Ties go to the lower index."""
    b, r, _ = sim.shape
    covered = sim.new_zeros(b, r)
    gains = (weights[:, :, None] * sim).sum(dim=1)  # f({v}) - f({}) for every v
    picks = torch.empty(b, k, dtype=torch.long, device=sim.device)
    taken = ~mask
    for step in range(k):
        j = gains.masked_fill(taken, -torch.inf).argmax(dim=1)
        picks[:, step] = j
        taken = taken.scatter(1, j[:, None], True)
        raised = torch.maximum(covered, sim.gather(2, j[:, None, None].expand(b, r, 1))[..., 0])
        # Each candidate's gain falls by what the pick now covers of it, row by row:
        # (s - c)+ - (s - raised)+ = (min(s, raised) - c)+, weighted and summed over rows.
        lost = (torch.minimum(sim, raised[:, :, None]) - covered[:, :, None]).clamp_(min=0)
        gains -= (weights[:, None, :] @ lost)[:, 0]
        covered = raised
    return picks


def greedy_coverage(sim: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k,) the greedy rule picks for one image's ``sim`` (R, N) and ``weights`` (R,)."""
    mask = torch.ones(1, sim.shape[1], dtype=torch.bool, device=sim.device)
    return greedy_coverage_batch(sim[None], weights[None], mask, k)[0]


def _keep(batch: Sequence[Tokens], ks: Sequence[int]) -> list[Rows]:
    matrices = [coverage_matrix(t) for t in batch]
    # (R_b, N_b) each -> (B, R, W): padding rows and candidates have zero similarity and weight.
    sim = matrices[0][0].new_zeros(len(batch), max(len(m) for m, _ in matrices), max(len(t) for t in batch))
    for b, (m, _) in enumerate(matrices):
        sim[b, :m.shape[0], :m.shape[1]] = m
    weights = padded([w for _, w in matrices])
    mask = real_tokens(batch)
    picks = greedy_coverage_batch(sim, weights, mask, max(ks))
    return take_picks(batch, picks, ks)


mmtok = Method("mmtok", _keep, reads_query=True, quadratic_memory=True)
