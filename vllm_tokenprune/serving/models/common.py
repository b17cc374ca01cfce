"""What the processor half (``processor.py``, in the API server) and the model half
(``model.py``, in the workers) of every pruned family share: the names of the fields that
carry each image's pruning from one to the other, and the selector checkpoint they read.

A request's keep ratio and method reach vLLM's multimodal processor as
``mm_processor_kwargs``. The processor sizes each image's placeholder run to
K = ``keep_count(N, ratio)`` (under ``auto``, the ratio is the image's own, predicted from
its pixels by the selector checkpoint's budget predictor) and hands N, K, the method id
and a per-image seed to the model as one integer row per image (its plan), and, for a
method that reads the question, the question's token ids. The model, after the vision tower, hands each image's
tokens to its method and places the K rows it returns (``methods.Rows``) at their stock
positions, in stock order. vLLM fixes the placeholder count before the model runs, so K
is decided once, in the processor, and never recomputed from a float.

vLLM sizes the KV cache from the peak memory of a profile run on dummy images, whose K is
the server's default (usually all N: no method runs). So that the peak includes what
selection holds (N x N similarities, attention statistics, the selector's activations),
the dummy items also carry a probe: every method this server may run on such an image,
at the smallest K its policy allows. The model runs them on each tower chunk and drops
their rows; the dummy's own rows, and so every count vLLM derives from them, stay stock.
"""

from __future__ import annotations

import functools
from typing import Annotated

import torch
from vllm.utils.tensor_schema import TensorSchema, TensorShape

# hf_config attribute (set with --hf-overrides) naming the selector checkpoint to load.
SELECTOR_CONFIG_KEY = "tokenprune_selector"

# Each image's plan, one int64 row: the columns below, in this order. One field, not one
# per column: vLLM pays per field of every item, in its caches, serialisation and batching.
PLAN_FIELD = "tokenprune_plan"
UNPRUNED_FIELD = "unpruned"  # N, the stock token count
KEEP_FIELD = "keep"  # K
METHOD_FIELD = "method"  # ``methods.method_id``
SEED_FIELD = "seed"  # the ``random`` method's (0 for other methods)
# The profile's probe (module docstring): the methods as ``methods.method_mask``, and their
# K; 0 and 0 on every request.
PROBE_METHODS_FIELD = "probe_methods"
PROBE_KEEP_FIELD = "probe_keep"
PRUNE_FIELDS = (UNPRUNED_FIELD, KEEP_FIELD, METHOD_FIELD, SEED_FIELD, PROBE_METHODS_FIELD, PROBE_KEEP_FIELD)
# Each image's question (``policy.question_tokens``; none unless its method reads one).
# Also the processor kwarg that carries it into vLLM's item hashes: set by the processor,
# never by a client (``policy.resolve`` refuses keys it does not know).
QUERY_FIELD = "tokenprune_query"
# A video's plan and question, in the same form (a field belongs to one modality's items).
VIDEO_PLAN_FIELD = "tokenprune_video_plan"
VIDEO_QUERY_FIELD = "tokenprune_video_query"
# Each modality's (plan, question) fields.
FIELDS = {"image": (PLAN_FIELD, QUERY_FIELD), "video": (VIDEO_PLAN_FIELD, VIDEO_QUERY_FIELD)}
# The processor kwarg that marks dummy inputs, so that their items (which carry a probe)
# never share a cache entry with a request's; a client cannot send it (``policy.resolve``).
PROBE_KEY = "tokenprune_probe"


class PruningInputs(TensorSchema):
    """What the processor decided for each image, as the batched field reaches the model.

    Dimensions:
        - bn: Batch size * number of images
        - c: The plan's columns (``PRUNE_FIELDS``)

    int64: a float field would be cast to the model dtype. (``QUERY_FIELD``, each image's
    question of its own length, travels beside it.)
    """

    tokenprune_plan: Annotated[torch.Tensor, TensorShape("bn", len(PRUNE_FIELDS))]


def plan_value(row: torch.Tensor, name: str) -> int:
    """Column ``name`` of one image's plan row."""
    return int(row[PRUNE_FIELDS.index(name)])


def selector_path(hf_config) -> str | None:
    return getattr(hf_config, SELECTOR_CONFIG_KEY, None) or None


@functools.cache
def served_budget_predictor(path: str):
    """The selector checkpoint's budget predictor, or None, with its kernel compiled: once
    per process (vLLM builds processors in several places, some per request; a server never
    swaps its checkpoint). A damaged one raises here and in the model, at start-up."""
    from vllm_tokenprune.selection.budget import load_budget_predictor

    loaded = load_budget_predictor(path)
    if loaded is None:
        return None
    loaded[0].warm_up()
    return loaded[0]
