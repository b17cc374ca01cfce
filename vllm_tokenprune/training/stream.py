"""Features read one shard at a time: training batches in a seeded order, evaluation chunks,
and the per-dimension statistics, so memory follows the shard and batch sizes, never the
folder's.

A feature set is a sequence of shards (``FeatureSet``): a ``training.store.FeatureStore``
on disk, or one tensor in memory (``InMemoryFeatures``). Training order: each epoch the
shards are shuffled and taken ``shuffle_shards`` at a time (a round); a round's images
are read together and visited in a random permutation. Every round's order is derived
from (seed, epoch, round) alone, so

- any batch's position is known without reading data: resuming at step s skips s batches
  by arithmetic, and continues exactly as the uninterrupted run;
- when every shard fits in one round, the order is one permutation of all images per
  epoch, whatever the shard sizes: a store and the same features in memory give the same
  batches (tests/test_train.py).
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, chain, count
from typing import Protocol

import torch

from vllm_tokenprune.training.ragged import RaggedFeatures


class FeatureSet(Protocol):
    """Image features (``RaggedFeatures``: any N per image, D fixed) held in shards."""

    key: str  # names the features: a resumed run must train on the same
    shard_sizes: list[int]  # images per shard
    shard_tokens: list[int]  # tokens per shard (T of its RaggedFeatures)
    feature_dim: int  # D

    def load(self, shard: int) -> RaggedFeatures:
        """Shard ``shard``'s features on the CPU."""

    def sums(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """``token_sums`` over every image."""


@dataclass
class InMemoryFeatures:
    """Features in memory as a feature set of one shard."""

    features: RaggedFeatures

    @property
    def key(self) -> str:
        return f"in memory ({len(self.features)} images, {tuple(self.features.tokens.shape)} tokens)"

    @property
    def shard_sizes(self) -> list[int]:
        return [len(self.features)]

    @property
    def shard_tokens(self) -> list[int]:
        return [len(self.features.tokens)]

    @property
    def feature_dim(self) -> int:
        return self.features.feature_dim

    def load(self, shard: int) -> RaggedFeatures:
        return self.features

    def sums(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        return token_sums(self.features)


def as_feature_set(features: RaggedFeatures | FeatureSet) -> FeatureSet:
    return InMemoryFeatures(features) if isinstance(features, RaggedFeatures) else features


def num_images(features: FeatureSet) -> int:
    return sum(features.shard_sizes)


# ---------------------------------------------------------------------------------------
# Per-dimension statistics


def token_sums(features: RaggedFeatures) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(number of tokens, sum, sum of squares) over every image's tokens, per dimension.

    float64: the variance is taken as a difference of these sums, which in float64 keeps
    about 8 digits even where a dimension's mean is 10,000 times its spread.
    """
    x = features.tokens.double()
    return x.shape[0], x.sum(dim=0), x.pow(2).sum(dim=0)


def mean_std(features: FeatureSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and (unbiased) standard deviation over every token, float32."""
    n, total, squares = features.sums()
    mean = total / n
    var = (squares - n * mean.pow(2)) / max(n - 1, 1)
    return mean.float(), var.clamp(min=0).sqrt().float()


# ---------------------------------------------------------------------------------------
# Reading ahead


def ahead(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn(item) for each item, in order, computed up to ``workers`` items ahead in threads
    (0: in the caller's thread). ``items`` may be endless."""
    if workers == 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------------------------------
# Training batches


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=7).digest(), "little")


def _plan(sizes: list[int], shuffle_shards: int, seed: int) -> Iterator[tuple[tuple[int, ...], int]]:
    """Endless rounds: (the round's shard ids in stored order, seed of its image order)."""
    for epoch in count():
        order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(_seed(seed, epoch)))
        for r, start in enumerate(range(0, len(sizes), shuffle_shards)):
            # In stored order, so that a round holding every shard is the whole set in its own order.
            yield tuple(sorted(order[start:start + shuffle_shards].tolist())), _seed(seed, epoch, r)


def read_round(features: FeatureSet, ids: tuple[int, ...]) -> RaggedFeatures:
    """Shards ``ids`` as one RaggedFeatures, each copied into place as soon as it is read:
    reading a round holds the round and one shard, where concatenating all its shards at the
    end would hold the round twice."""
    if len(ids) == 1:
        return features.load(ids[0])
    tokens, grids, at = None, [], 0
    for i in ids:
        shard = features.load(i)
        if tokens is None:  # the stored dtype, known once a shard is read
            tokens = shard.tokens.new_empty(sum(features.shard_tokens[j] for j in ids), shard.feature_dim)
        tokens[at:at + len(shard.tokens)] = shard.tokens
        at += len(shard.tokens)
        grids.append(shard.grids)
        del shard  # before the next one is read
    return RaggedFeatures(tokens, torch.cat(grids))


def batches(features: FeatureSet, batch_size: int, *, shuffle_shards: int, seed: int,
            skip: int = 0) -> Iterator[RaggedFeatures]:
    """Endless training batches of ``batch_size`` images on the CPU, the first ``skip`` left out.

    Holds at most two rounds (the one being visited and the next, read ahead in a thread)
    and one shard being read into place: (2 x shuffle_shards + 1) x shard size images.
    """
    sizes = features.shard_sizes
    plan = _plan(sizes, shuffle_shards, seed)
    skip_rows = skip * batch_size
    ids, round_seed = next(plan)
    while skip_rows >= (rows := sum(sizes[i] for i in ids)):  # skipped rounds are never read
        skip_rows -= rows
        ids, round_seed = next(plan)

    # A round that is read again (every shard fits in one) is read once.
    @lru_cache(maxsize=1)
    def read(ids: tuple[int, ...]) -> RaggedFeatures:
        return read_round(features, ids)

    parts, held = [], 0
    rounds = ahead(lambda r: (read(r[0]), r[1]), chain([(ids, round_seed)], plan), workers=1)
    for data, round_seed in rounds:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(round_seed))[skip_rows:]
        skip_rows = 0
        start = 0
        while start < len(order):
            take = min(batch_size - held, len(order) - start)
            parts.append(data[order[start:start + take]])
            held += take
            start += take
            if held == batch_size:
                yield RaggedFeatures.cat(parts)
                parts, held = [], 0


def chunks(features: FeatureSet, size: int, images: Iterable[int] | None = None) -> Iterator[RaggedFeatures]:
    """Every image once (or only those at the stored positions ``images``), in stored order,
    in chunks of at most ``size`` images (evaluation). Shards holding none of ``images`` are
    not read."""
    picks: dict[int, list[int] | None] = dict.fromkeys(range(len(features.shard_sizes)))  # None: all
    if images is not None:
        starts, picks = [0, *accumulate(features.shard_sizes)], {}  # shard -> its picked images, shard-local
        for i in sorted(set(images)):
            shard = bisect_right(starts, i) - 1
            picks.setdefault(shard, []).append(i - starts[shard])
    for shard, data in zip(picks, ahead(features.load, picks, workers=1)):
        if picks[shard] is not None:
            data = data[picks[shard]]
        for start in range(0, len(data), size):
            yield data[start:start + size]
