"""Token selection methods, chosen per request by name.

The interface. A method gets a batch of images, each its ``Tokens`` and a keep count K
(fixed earlier by ``policy.keep_count`` in the processor, 1 <= K < N), and returns
each image's ``Rows``: exactly K (position, value) rows, positions strictly ascending. A
row is either a token kept as it is (its own stock position and value) or a merge of
several tokens (their mean value, at the stock position of the token that stands for
them). Model families place row j where stock position ``index[j]`` sits: the language
model sees the rows in stock order, and Qwen's M-RoPE gives each row the (t, h, w) of that
position.

What a method may read (``Tokens``): the features it scores and compares, the values its
rows carry (the same tensor, or wider: Qwen3-VL's DeepStack channels), the tokens' layout
as row-major grids, a per-image seed, the learned selector, the map to language-model
embeddings, the tower statistics it declares in ``Method.needs``, and the request's
question as language-model embeddings if it declares ``Method.reads_query``. vLLM's towers
return no attention weights, so a family computes a statistic only when an image in the
batch uses a method that declared it (``attention.TowerProbe``).

Built for the engine step (``batch.py``): a method takes all images of a tower call at
once (padded and masked where the math runs across images), never asks the host what a
device tensor holds (no ``.item()``, ``nonzero``, boolean-mask indexing or ``unique``: every
shape follows from N and K, known on the host), and merges without atomics, so repeated
runs and tensor-parallel ranks agree bit for bit.

A method's position in ``METHOD_NAMES`` is the integer id the processor hands to the
model (multimodal fields must be tensors, not strings); append, never reorder. Each name
lives in one small module of this package; importing the package imports neither torch
nor vLLM, so the HTTP layer can validate names cheaply.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

    from vllm_tokenprune.selection.selector import TokenSelector

# Every method: its name -> the module of this package that defines it (as an attribute of
# that name). A name's position is its wire id: append, never reorder.
_MODULES = {
    "learned": "scores", "random": "scores", "norm": "scores", "visionzip": "visionzip",
    "hiprune": "hiprune", "divprune": "divprune", "cls_attention": "cls_attention", "pool": "pool",
    "cdpruner": "cdpruner", "mmtok": "mmtok", "learned_query": "scores", "evs": "evs",
}
METHOD_NAMES: tuple[str, ...] = tuple(_MODULES)
# Methods that take a whole video at once (``Tokens.grids``: one grid per frame), never an
# image; every other method takes an image, or one video frame with its share of K.
VIDEO_ONLY = frozenset({"evs"})
IMAGE_METHOD_NAMES: tuple[str, ...] = tuple(name for name in METHOD_NAMES if name not in VIDEO_ONLY)
DEFAULT_VIDEO_METHOD = "evs"  # vLLM's own rule, and what needs no selector


def method_id(name: str) -> int:
    try:
        return METHOD_NAMES.index(name)
    except ValueError:
        raise ValueError(
            f"unknown prune method {name!r}; choose one of {', '.join(METHOD_NAMES)}"
        ) from None


def method_name(ident: int) -> str:
    return METHOD_NAMES[ident]


def method_mask(names: Iterable[str]) -> int:
    """Several methods as one integer (bit i: ``METHOD_NAMES[i]``), for a multimodal field."""
    return sum(1 << method_id(name) for name in set(names))


def mask_names(mask: int) -> list[str]:
    return [name for i, name in enumerate(METHOD_NAMES) if mask >> i & 1]


# --- tower statistics a method may ask for -------------------------------------------

# Attention each token receives from the [CLS] query, averaged over heads; on towers
# without a [CLS] token (SigLIP, the Qwen towers) the GLOBAL_ATTENTION below instead.
ATTENTION = "attention"
# Attention each token receives, averaged over heads and over every query of its image.
GLOBAL_ATTENTION = "global_attention"
# The layer's key vectors averaged over heads (N, head_dim): a similarity metric.
KEYS = "keys"

# The tower layer whose output the model uses (LLaVA: ``vision_feature_layer``; Qwen: the
# last full-attention block), and HiPrune's "object layer" in the middle of the tower.
LATE = "late"
MIDDLE = "middle"


class Probe(NamedTuple):
    """One per-token statistic of one tower layer's attention."""

    stat: str
    layer: str


# --- what a method gets and returns ------------------------------------------------------

@dataclass
class Tokens:
    """One image's N candidate tokens, in stock order."""

    features: torch.Tensor  # (N, D): what methods score and compare
    grids: tuple[tuple[int, int], ...]  # the N tokens as row-major (rows, cols) grids, in order
    seed: int  # deterministic per image content (hash of its pixels)
    values: torch.Tensor | None = None  # (N, C): what rows carry; None = the features
    selector: TokenSelector | None = None
    query_selector: TokenSelector | None = None  # the checkpoint's question-reading selector
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None  # features -> LM input; None = same
    stats: Mapping[Probe, torch.Tensor] = field(default_factory=dict)  # per token, as declared
    # (Q, H): the request's question as the language model embeds it (``Method.reads_query``);
    # None, or Q = 0, when there is none.
    query: torch.Tensor | None = None
    # A video whose prompt holds each frame's run apart (Qwen3-VL's frames sit between
    # timestamps): each frame keeps its share of K (``policy.frame_shares``), which a method
    # of whole videos then keeps; otherwise it spreads K over the clip itself.
    frames_apart: bool = False

    def __post_init__(self):
        if self.values is None:
            self.values = self.features

    def __len__(self) -> int:
        return self.features.shape[0]

    @cached_property
    def embeddings(self) -> torch.Tensor:
        """The features as the language model receives them (LLaVA: after the projector)."""
        return self.features if self.embed is None else self.embed(self.features)

    def take(self, index: torch.Tensor) -> Rows:
        """Rows of the tokens at ``index`` (ascending), unchanged."""
        return Rows(index, self.values.index_select(0, index))

    def merge(self, index: torch.Tensor, groups: torch.Tensor) -> Rows:
        """Rows at ``index`` whose values are the mean of the tokens that ``groups`` assigns
        them: ``groups[n]`` is the row token n joins, -1 for a dropped token. A row whose
        group is just its own token keeps that token's value exactly."""
        import torch

        k = len(index)
        # Dropped tokens go to a spare row K. index_put_ with accumulate sums in a fixed
        # order (index_add_ uses atomics on CUDA: its sums differ from run to run).
        rows = (torch.where(groups < 0, k, groups),)
        sums = self.values.new_zeros(k + 1, self.values.shape[1], dtype=torch.float32)
        sums.index_put_(rows, self.values.float(), accumulate=True)
        counts = sums.new_zeros(k + 1).index_put_(rows, sums.new_ones(len(groups)), accumulate=True)
        return Rows(index, (sums[:k] / counts[:k, None].clamp(min=1)).to(self.values.dtype))


class Rows(NamedTuple):
    """A method's output: K rows, ``index`` (K,) the ascending stock position each takes."""

    index: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class Method:
    name: str
    # Each image's rows, for a batch of images and their K (1 <= K < N); ``per_image`` makes
    # one from a rule for one image.
    keep: Callable[[Sequence[Tokens], Sequence[int]], list[Rows]]
    needs: frozenset[Probe] = frozenset()  # tower statistics read from ``Tokens.stats``
    # Reads ``Tokens.query``: the processor then takes the question from the prompt, and the
    # same image asked another question is another cache item.
    reads_query: bool = False
    # Holds O(N^2) values per image (N x N similarities, an N x K factor): the operator bounds
    # the images it takes (``PrunePolicy.max_quadratic_tokens``).
    quadratic_memory: bool = False
    # Scores with the server's learned selector: "selector" (``Tokens.selector``) or "query"
    # (its question-reading section, ``Tokens.query_selector``); a server without it refuses.
    uses_selector: str | None = None
    # Keeps a video's first frame whole: its K is at least one frame (``policy.video_keep_count``).
    first_frame_whole: bool = False

    @property
    def video_only(self) -> bool:
        return self.name in VIDEO_ONLY


def get(name: str) -> Method:
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return getattr(module, name)


def per_image(keep: Callable[[Tokens, int], Rows]) -> Callable[[Sequence[Tokens], Sequence[int]], list[Rows]]:
    """A method's ``keep`` from a rule that takes one image at a time."""
    return lambda batch, ks: [keep(tokens, k) for tokens, k in zip(batch, ks)]


def select_all(jobs: Sequence[tuple[str, Tokens, int]]) -> list[Rows]:
    """The rows of each (method name, tokens, K), in order: each method runs once, on all of
    its images that keep fewer than all their tokens; an image at K >= N keeps its rows
    untouched."""
    import torch

    out: list[Rows | None] = [None] * len(jobs)
    by_method: dict[str, list[int]] = {}
    for j, (name, tokens, k) in enumerate(jobs):
        if k >= len(tokens):
            out[j] = Rows(torch.arange(len(tokens), device=tokens.values.device), tokens.values)
        else:
            by_method.setdefault(name, []).append(j)
    for name, batch in by_method.items():
        rows = get(name).keep([jobs[j][1] for j in batch], [jobs[j][2] for j in batch])
        for j, found in zip(batch, rows):
            if len(found.index) != jobs[j][2]:
                raise RuntimeError(f"prune method {name!r} returned {len(found.index)} rows, not {jobs[j][2]}")
            out[j] = found
    return out


def select(name: str, tokens: Tokens, k: int) -> Rows:
    """The K rows method ``name`` keeps of one image's ``tokens``; all of them, untouched,
    at K >= N."""
    return select_all([(name, tokens, k)])[0]
