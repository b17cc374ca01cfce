"""Selection as the engine step runs it: all images of a tower call in one batch, no op that
would make a GPU wait for the host, the same answer twice and whatever the batch (fast)."""

from __future__ import annotations

import pytest
import torch
from syncs import HostSyncs
from test_methods import random_tokens

from vllm_tokenprune.selection import methods
from vllm_tokenprune.selection.methods import METHOD_NAMES
from vllm_tokenprune.selection.selector import SelectorConfig, TokenSelector

# Images of several sizes, some of several grids (a [CLS]-like 1 x 1 grid, a base crop and
# an anyres grid), as the families hand them over; for a method that takes whole videos,
# clips of several frame sizes and lengths.
GRIDS = [[(4, 4)], [(1, 1), (3, 4)], [(5, 6)], [(2, 2), (3, 5)], [(1, 7)], [(6, 6)]]
CLIPS = [[(3, 3)] * 4, [(2, 5)] * 2, [(4, 4)] * 3, [(1, 6)] * 5, [(2, 2)] * 7]


def _selectors() -> dict[str, TokenSelector]:
    """One server's selectors, shared by every image."""
    torch.manual_seed(1)
    return {"selector": TokenSelector(SelectorConfig(feature_dim=8)).eval(),
            "query_selector": TokenSelector(SelectorConfig(feature_dim=8, query_dim=8)).eval()}


def _batch(name: str, count: int, seed: int = 0) -> list[methods.Tokens]:
    selectors = _selectors()
    grids = CLIPS if methods.get(name).video_only else GRIDS
    batch = [random_tokens(grids[i % len(grids)], seed=seed + i, **selectors) for i in range(count)]
    for i, tokens in enumerate(batch):  # questions of several lengths, one image with none
        tokens.query = None if i % 4 == 3 else tokens.query[: 1 + i % 3]
    return batch


def _run(name: str, batch: list[methods.Tokens], ks: list[int]) -> list[methods.Rows]:
    with torch.inference_mode():
        return methods.select_all([(name, tokens, k) for tokens, k in zip(batch, ks)])


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_no_method_makes_the_device_wait_whatever_the_batch_and_k(name):
    for count in (1, 16):
        batch = _batch(name, count)
        for ks in ([1] * count, [len(t) - 1 for t in batch], [1 + i % (len(t) - 1) for i, t in enumerate(batch)]):
            with HostSyncs() as syncs:
                rows = _run(name, batch, ks)
            assert syncs.total == 0, (name, count, dict(syncs.seen))
            assert [len(r.index) for r in rows] == ks


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_a_batch_keeps_what_each_image_keeps_alone_and_the_same_twice(name):
    batch = _batch(name, 12, seed=5)
    ks = [max(1, len(t) * (1 + i % 3) // 4) for i, t in enumerate(batch)]
    together, again = _run(name, batch, ks), _run(name, batch, ks)
    for tokens, k, rows, repeat in zip(batch, ks, together, again):
        assert torch.equal(rows.index, repeat.index) and torch.equal(rows.values, repeat.values), name
        (alone,) = _run(name, [tokens], [k])
        assert torch.equal(rows.index, alone.index), (name, k)
        assert torch.allclose(rows.values, alone.values, atol=1e-6), (name, k)


def test_merges_sum_in_a_fixed_order_without_atomics():
    """VisionZip and pool average tokens into rows: with index_put_'s accumulation, which
    CUDA runs in a fixed order (index_add_'s atomics do not), and exactly for a lone token."""
    tokens = random_tokens([(4, 4)])
    groups = torch.tensor([0, 0, -1, 1] * 4)
    with HostSyncs() as syncs:
        rows = tokens.merge(torch.tensor([0, 3]), groups)
    assert syncs.total == 0
    assert torch.allclose(rows.values[0], tokens.values[groups == 0].mean(dim=0))
    single = tokens.merge(torch.tensor([5]), torch.tensor([-1] * 5 + [0] + [-1] * 10))
    assert torch.equal(single.values[0], tokens.values[5])


def test_the_counter_sees_what_would_sync():
    x = torch.arange(6.0)
    with HostSyncs() as syncs:
        int(x.sum())
        x[x > 2].sum()
        x.nonzero()
        x.unique()
    assert syncs.total == 4, dict(syncs.seen)
