"""The question-reading methods against their definitions on small inputs, by brute force:
CDPruner's greedy MAP rule for a conditional DPP, MMTok's greedy coverage."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_methods import random_tokens

from vllm_tokenprune.selection import methods
from vllm_tokenprune.selection.methods import METHOD_NAMES, Tokens
from vllm_tokenprune.selection.methods.cdpruner import THETA, greedy_dpp, relevance
from vllm_tokenprune.selection.methods.mmtok import LAMBDA, coverage_matrix, greedy_coverage
from vllm_tokenprune.selection.selector import SelectorConfig, TokenSelector

QUERY_METHODS = [name for name in METHOD_NAMES if methods.get(name).reads_query]


def test_the_question_reading_methods_declare_it():
    assert {"cdpruner", "mmtok", "learned_query"} <= set(QUERY_METHODS)


def _kernel(features: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    return quality.double()[:, None] * (unit @ unit.T) * quality.double()[None, :]


def test_dpp_each_pick_multiplies_the_determinant_most():
    gen = torch.Generator().manual_seed(0)
    features, quality = torch.randn(9, 12, generator=gen), torch.rand(9, generator=gen) + 0.5
    kernel = _kernel(features, quality)
    picks = greedy_dpp(features, quality, 6).tolist()
    for step in range(6):
        chosen = picks[:step]
        dets = {j: torch.det(kernel[chosen + [j]][:, chosen + [j]]).item() for j in range(9) if j not in chosen}
        assert picks[step] == max(dets, key=dets.get), step


def test_dpp_finds_the_largest_determinant_where_greedy_is_exact():
    """K = 1 and K = N - 1 have few enough subsets to check every one."""
    gen = torch.Generator().manual_seed(1)
    features, quality = torch.randn(7, 10, generator=gen), torch.rand(7, generator=gen) + 0.5
    kernel = _kernel(features, quality)
    for k in (1, 2):
        best = max(itertools.combinations(range(7), k),
                   key=lambda s: torch.det(kernel[list(s)][:, list(s)]).item())
        assert sorted(greedy_dpp(features, quality, k).tolist()) == sorted(best)


def test_dpp_past_the_feature_rank_takes_the_rest_by_relevance():
    features = torch.eye(3).repeat(2, 1)  # 6 tokens in a 3-dimensional space
    quality = torch.tensor([1.0, 1.1, 1.2, 1.5, 1.4, 1.3])
    picks = greedy_dpp(features, quality, 5).tolist()
    assert sorted(picks[:3]) == [3, 4, 5]  # one per direction, the better of each pair
    assert picks[3:] == [2, 1]  # then by quality


def test_cdpruner_relevance_is_the_mean_cosine_to_the_question_scaled_to_unit_range():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    query = torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # both words point along the first axis
    r = relevance(embeddings, query)
    assert torch.allclose(r, torch.tensor([1.0, 0.0, math.sqrt(0.5)]), atol=1e-6)
    assert torch.equal(relevance(embeddings, None), torch.zeros(3))
    assert torch.equal(relevance(embeddings, torch.empty(0, 2)), torch.zeros(3))
    assert 0 < THETA < 1


def _coverage(sim: torch.Tensor, weights: torch.Tensor, chosen) -> float:
    if not chosen:
        return 0.0
    return float((weights * sim[:, list(chosen)].max(dim=1).values).sum())


def test_coverage_each_pick_has_the_largest_marginal_gain():
    tokens = random_tokens([(3, 3)], seed=2)
    sim, weights = coverage_matrix(tokens)
    picks = greedy_coverage(sim, weights, 8).tolist()
    for step in range(8):
        chosen = picks[:step]
        gain = {j: _coverage(sim, weights, chosen + [j]) for j in range(9) if j not in chosen}
        top = max(gain.values())
        assert gain[picks[step]] >= top - 1e-6, step
        assert picks[step] == min(j for j, g in gain.items() if g >= top - 1e-6)  # ties: lower index


def test_coverage_reaches_the_greedy_guarantee_of_the_best_subset():
    for seed in range(5):
        tokens = random_tokens([(2, 4)], seed=seed)
        sim, weights = coverage_matrix(tokens)
        for k in (1, 2, 3):
            best = max(_coverage(sim, weights, s) for s in itertools.combinations(range(8), k))
            assert _coverage(sim, weights, greedy_coverage(sim, weights, k).tolist()) >= (1 - 1 / math.e) * best


def test_coverage_weighs_the_question_and_the_image_as_defined():
    tokens = random_tokens([(2, 3)], seed=3)
    sim, weights = coverage_matrix(tokens)
    q, n = len(tokens.query), len(tokens)
    assert sim.shape == (q + n, n) and sim.min() >= 0 and sim.max() <= 1
    assert torch.allclose(weights[:q].sum(), torch.tensor(1.0))
    assert torch.allclose(weights[q:].sum(), torch.tensor(LAMBDA))
    without = Tokens(tokens.features, tokens.grids, seed=0)
    assert coverage_matrix(without)[0].shape == (n, n)


@pytest.mark.parametrize("method", ["cdpruner", "mmtok"])
def test_among_equally_diverse_tokens_the_question_decides(method):
    """Four orthogonal tokens: any one is as diverse and covers the image as well as another."""
    features = torch.eye(4)
    for asked in range(4):
        query = torch.eye(4)[asked:asked + 1]
        rows = methods.select(method, Tokens(features, ((2, 2),), seed=0, query=query), 1)
        assert rows.index.tolist() == [asked]


def test_the_model_hands_a_question_reading_method_the_embedded_question():
    from types import SimpleNamespace

    from vllm_tokenprune.serving.models.common import (
        KEEP_FIELD,
        METHOD_FIELD,
        PROBE_KEEP_FIELD,
        PROBE_METHODS_FIELD,
        QUERY_FIELD,
        SEED_FIELD,
    )
    from vllm_tokenprune.serving.models.model import PruningModelMixin

    words = torch.nn.Embedding(8, 4)
    words.weight.data = torch.eye(4).repeat(2, 1)  # word w points along axis w % 4
    torch.manual_seed(0)
    reader = TokenSelector(SelectorConfig(feature_dim=4, query_dim=4)).eval()

    class Model(PruningModelMixin):
        token_selector = None
        query_selector = reader

        def get_language_model(self):
            return SimpleNamespace(embed_input_ids=words)

    def kept(method, question, k=1):
        fields = {KEEP_FIELD: [k], METHOD_FIELD: [methods.method_id(method)], SEED_FIELD: [0],
                  PROBE_METHODS_FIELD: [0], PROBE_KEEP_FIELD: [0], QUERY_FIELD: [torch.tensor(question)]}
        with torch.no_grad():
            model = Model()
            return model._select([model._candidates(fields, 0, torch.eye(4), grids=((2, 2),))])[0].index.tolist()

    for method in ("cdpruner", "mmtok"):
        assert kept(method, [1]) == [1] and kept(method, [6, 2]) == [2], method
    # The learned reader scores the image with the embedded question.
    with torch.no_grad():
        expected = reader.scores(torch.eye(4), query=words(torch.tensor([6, 2]))).topk(2).indices.sort().values
    assert kept("learned_query", [6, 2], k=2) == expected.tolist()
    # Other methods never see it.
    assert kept("norm", [1]) == kept("norm", [2])


def test_the_question_is_the_prompts_words_last_ones_first_to_go():
    from vllm_tokenprune.policy import QUESTION_TOKENS, question_tokens

    markup = {0, 1}  # a placeholder and a template marker
    assert question_tokens([1, 0, 0, 5, 6, 1, 7], markup) == [5, 6, 7]
    long = list(range(2, 2 + QUESTION_TOKENS + 10))
    assert question_tokens(long, markup) == long[-QUESTION_TOKENS:]
    assert question_tokens([0, 1], markup) == []
