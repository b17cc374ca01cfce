"""What every pruned model family shares: the processor side and the model side.

A request's keep ratio and method reach vLLM's multimodal processor as
``mm_processor_kwargs``. The processor sizes each image's placeholder run to
K = ``keep_count(N, ratio)`` (under ``auto``, the ratio is the image's own, predicted from
its pixels by the selector checkpoint's budget predictor) and hands K, the method id and
a per-image seed to the model as integer batched fields, and, for a method that reads the
question, the question's token ids. The model, after the vision tower, hands each image's
tokens to its method and places the K rows it returns (``methods.Rows``) at their stock
positions, in stock order. vLLM fixes the placeholder count before the model runs, so K
is decided once, here, and never recomputed from a float.

Methods that read the tower's attention get it from ``methods.attention.TowerProbe``,
used only for a tower call in which some image asked for such a method.

vLLM sizes the KV cache from the peak memory of a profile run on dummy images, whose K is
the server's default (usually all N: no method runs). So that the peak includes what
selection holds (N x N similarities, attention statistics, the selector's activations),
the dummy items also carry a probe: every method this server may run on such an image,
at the smallest K its policy allows. The model runs them on each tower chunk and drops
their rows; the dummy's own rows, and so every count vLLM derives from them, stay stock.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Annotated, NamedTuple

import torch
import torch.nn as nn
from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems, ImageSize
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from vllm_tokenprune.selection import methods
from vllm_tokenprune.serving.policy import (
    KEEP_RATIO_KEY,
    METHOD_KEY,
    OUR_KEYS,
    AutoBudget,
    PrunePolicy,
    PruneRequestError,
    keep_count,
    markup_ids,
    parse_budget,
    question_tokens,
    resolve,
    split_keep,
)

logger = init_logger(__name__)

# hf_config attribute (set with --hf-overrides) naming the selector checkpoint to load.
SELECTOR_CONFIG_KEY = "tokenprune_selector"

KEEP_FIELD = "tokenprune_keep"
METHOD_FIELD = "tokenprune_method"
SEED_FIELD = "tokenprune_seed"
# The profile's probe (module docstring): the methods as ``methods.method_mask``, and their
# K; 0 and 0 on every request.
PROBE_METHODS_FIELD = "tokenprune_probe_methods"
PROBE_KEEP_FIELD = "tokenprune_probe_keep"
PRUNE_FIELDS = (KEEP_FIELD, METHOD_FIELD, SEED_FIELD, PROBE_METHODS_FIELD, PROBE_KEEP_FIELD)
# Each image's question (``policy.question_tokens``; none unless its method reads one).
# Also the processor kwarg that carries it into vLLM's item hashes: set by the processor,
# never by a client (``policy.resolve`` refuses keys it does not know).
QUERY_FIELD = "tokenprune_query"
# The processor kwarg that marks dummy inputs, so that their items (which carry a probe)
# never share a cache entry with a request's; a client cannot send it (``policy.resolve``).
PROBE_KEY = "tokenprune_probe"


class PruningInputs(TensorSchema):
    """What the processor decided for each image, as batched fields reach the model.

    Dimensions:
        - bn: Batch size * number of images

    ``tokenprune_keep`` is K, the image's placeholder count; ``tokenprune_method`` the index
    of its method in ``methods.METHOD_NAMES``; ``tokenprune_seed`` the ``random`` method's
    seed (0 for other methods); ``tokenprune_probe_methods`` and ``tokenprune_probe_keep``
    the profile's probe (0 on requests). All int64: a float field would be cast to the model
    dtype. (``QUERY_FIELD``, each image's question of its own length, travels beside them.)
    """

    tokenprune_keep: Annotated[torch.Tensor, TensorShape("bn")]
    tokenprune_method: Annotated[torch.Tensor, TensorShape("bn")]
    tokenprune_seed: Annotated[torch.Tensor, TensorShape("bn")]
    tokenprune_probe_methods: Annotated[torch.Tensor, TensorShape("bn")]
    tokenprune_probe_keep: Annotated[torch.Tensor, TensorShape("bn")]


def selector_path(hf_config) -> str | None:
    return getattr(hf_config, SELECTOR_CONFIG_KEY, None) or None


def item_seed(item_hash: str) -> int:
    """The ``random`` method's seed for an item: from the identity vLLM already computed
    for it (content hash, or the client's uuid), so the same image draws the same tokens."""
    digest = hashlib.blake2b(item_hash.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclasses.dataclass
class _Call:
    """One ``apply`` call's state, for the processor hooks vLLM calls inside it: the item
    hashes, so that vLLM computes them once and the ``random`` seeds come from them. Held
    in a context variable because one processor serves the renderer's thread pool."""

    inputs: object
    hashes: object = None  # vLLM's item hashes, computed once
    image_hashes: list[str] | None = None  # those of the images the next HF call processes


class PruningRequestError(VLLMValidationError):
    """A refused pruning request: vLLM answers it with a 400 naming ``parameter``."""

    def __str__(self) -> str:  # the message alone; the param travels in its own field
        return Exception.__str__(self)


_CALL: ContextVar[_Call | None] = ContextVar("tokenprune_processor_call", default=None)
_DUMMY: ContextVar[bool] = ContextVar("tokenprune_dummy", default=False)


class PruningProcessorMixin:
    """Mix into a vLLM ``BaseMultiModalProcessor`` subclass (before it in the MRO).

    ``apply`` is where every request's pruning is decided, whatever route or client it
    came from: the kwargs are resolved under the operator's policy (``policy.resolve``)
    and replaced by their canonical form, so that the item hashes, which key vLLM's
    processor, encoder and prefix caches, are those of what the request gets.

    A family implements ``_unpruned_tokens(image_size, hf_kwargs)``, its stock token count N
    for an image under the HF processor kwargs the request passes on.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # With the processor, at start-up: the first auto request pays no load or compile.
        path = selector_path(self.info.get_hf_config())
        self._budget_predictor = None if path is None else _served_budget_predictor(path)

    def _unpruned_tokens(self, image_size: ImageSize, hf_kwargs: Mapping[str, object]) -> int:
        raise NotImplementedError

    def _tower_statistics_unavailable(self) -> str | None:
        """Why the served model cannot compute tower attention statistics, or None."""
        return None

    @functools.cached_property
    def _policy(self) -> PrunePolicy:
        return PrunePolicy.from_config(self.info.get_hf_config())

    @functools.cached_property
    def _has_query_selector(self) -> bool:
        path = selector_path(self.info.get_hf_config())
        if path is None:
            return False
        from vllm_tokenprune.selection.selector import load_query_selector

        return load_query_selector(path) is not None

    # -- the request's choice ---------------------------------------------------------

    def _method(self, requested: str | None) -> str:
        """The method an image gets: the one asked for, if this server can run it; by
        default 'learned' when a selector is loaded, else 'norm'."""
        has_selector = selector_path(self.info.get_hf_config()) is not None
        if requested is None:
            return "learned" if has_selector else "norm"
        param = "mm_processor_kwargs." + METHOD_KEY
        if requested == "learned" and not has_selector:
            raise PruneRequestError(
                "prune_method 'learned' needs a selector, and this server has none "
                "(start it with --selector PATH); use 'norm' or 'random'", param)
        if requested == "learned_query" and not self._has_query_selector:
            raise PruneRequestError(
                "prune_method 'learned_query' needs a selector that reads the question, and this server's "
                + ("selector has none (`vllm-tokenprune train-query` adds one)" if has_selector
                   else "has no selector (start it with --selector PATH)"), param)
        if methods.get(requested).needs and (reason := self._tower_statistics_unavailable()):
            raise PruneRequestError(
                f"prune_method {requested!r} reads the vision tower's attention, which {reason}", param)
        return requested

    @functools.cached_property
    def _markup_ids(self) -> frozenset[int]:
        return markup_ids(self.info.get_tokenizer())

    def _servable(self, name: str, num_tokens: int) -> bool:
        """Whether this server runs method ``name`` for an image of ``num_tokens`` tokens."""
        try:
            self._method(name)
        except PruneRequestError:
            return False
        return not self._quadratic_refused(name, num_tokens)

    def _quadratic_refused(self, method: str, num_tokens: int) -> bool:
        bound = self._policy.max_quadratic_tokens
        return bool(bound) and methods.get(method).quadratic_memory and num_tokens > bound

    @staticmethod
    def _without_prune_kwargs(mm_kwargs: Mapping[str, object]) -> dict[str, object]:
        return {k: v for k, v in mm_kwargs.items() if k not in OUR_KEYS and k not in (QUERY_FIELD, PROBE_KEY)}

    # -- vLLM processor hooks ---------------------------------------------------------

    def apply(self, inputs, timing_ctx):
        try:
            request = resolve(inputs.hf_processor_mm_kwargs, self._policy)
            method = self._method(request.method)
            auto = isinstance(request.keep_ratio, AutoBudget)
            if auto and self._budget_predictor is None:
                raise PruneRequestError(
                    f"keep_ratio {str(request.keep_ratio)!r} needs a budget predictor, and this server's "
                    "selector has none (`vllm-tokenprune train` writes one into the selector checkpoint); "
                    "send a number in (0, 1]", "mm_processor_kwargs." + KEEP_RATIO_KEY)
            self._check_quadratic_memory(inputs, request, method)
        except PruneRequestError as err:
            raise PruningRequestError(str(err), parameter=err.param) from None
        # auto travels as its canonical string: what the predictor decides follows from it and
        # the image, both in vLLM's item hash, so a cache hit holds the K a miss would compute.
        # The question too, for a method that reads one: another question is another item.
        question = ({QUERY_FIELD: question_tokens(inputs.prompt, self._markup_ids)}
                    if methods.get(method).reads_query else {})
        inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={
            **request.hf_kwargs, KEEP_RATIO_KEY: str(request.keep_ratio) if auto else request.keep_ratio,
            METHOD_KEY: method, **question, **({PROBE_KEY: True} if _DUMMY.get() else {})})
        call = _Call(inputs)
        if method == "random" and inputs.mm_data_items.get_count("image", strict=False):
            call.image_hashes = self._get_mm_hashes(inputs)["image"]  # the seeds' source
        token = _CALL.set(call)
        try:
            result = super().apply(inputs, timing_ctx)
        finally:
            _CALL.reset(token)
        if request.served and not _DUMMY.get():
            self._record_metrics(inputs, result, None if auto else request.keep_ratio, method)
        return result

    def _check_quadratic_memory(self, inputs, request, method: str) -> None:
        """Refuse a method that holds N x N values per image for images past the operator's
        bound (at K = N no method runs, so keep 1.0 passes)."""
        images = inputs.mm_data_items.get("image")
        if (request.keep_ratio == 1.0 or not methods.get(method).quadratic_memory
                or not isinstance(images, ImageProcessorItems) or not len(images)):
            return
        largest = max(self._unpruned_tokens(images.get_image_size(i), request.hf_kwargs) for i in range(len(images)))
        if self._quadratic_refused(method, largest):
            bound = self._policy.max_quadratic_tokens
            raise PruneRequestError(
                f"prune_method {method!r} holds N x N values per image, and this server takes it for images "
                f"of up to {bound} tokens (this request has one of {largest}); use a smaller image or another "
                "method", "mm_processor_kwargs." + METHOD_KEY)

    def get_dummy_mm_inputs(self, *args, **kwargs):
        token = _DUMMY.set(True)  # profiling and warm-up inputs: not requests, and probed
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            _DUMMY.reset(token)

    def _get_mm_hashes(self, inputs):
        call = _CALL.get()
        if call is None or call.inputs is not inputs:
            return super()._get_mm_hashes(inputs)
        if call.hashes is None:
            call.hashes = super()._get_mm_hashes(inputs)
        return call.hashes

    def _get_cache_missing_items(self, cache, mm_data_items, mm_hashes):
        is_cached, missing = super()._get_cache_missing_items(cache, mm_data_items, mm_hashes)
        call = _CALL.get()
        if call is not None and call.image_hashes is not None:  # only the missing ones are processed
            call.image_hashes = [h for h, hit in zip(mm_hashes.get("image", []), is_cached.get("image", []))
                                 if not hit]
        return is_cached, missing

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        # The one entry every family's processor goes through (Qwen3-VL's calls the HF
        # processor itself, never ``_call_hf_processor``). ``hf_kwargs`` are canonical.
        processed = super()._apply_hf_processor_main(mm_items, self._without_prune_kwargs(hf_kwargs))
        items = mm_items.get("image")
        if not isinstance(items, ImageProcessorItems) or not len(items):
            return processed  # no images, or precomputed embeddings (never pruned)
        method = hf_kwargs[METHOD_KEY]
        passed_on = self._without_prune_kwargs(hf_kwargs)
        counts = [self._unpruned_tokens(items.get_image_size(i), passed_on) for i in range(len(items))]
        keep = self._keep_counts(items, counts, hf_kwargs[KEEP_RATIO_KEY])
        call = _CALL.get()
        hashes = call.image_hashes if call is not None else None
        if method == "random" and (hashes is None or len(hashes) != len(items)):
            raise RuntimeError(f"tokenprune: no item hashes for {len(items)} images to seed 'random'")
        # Always emitted (dummy profiling included), so every batch has the fields.
        processed[KEEP_FIELD] = torch.tensor(keep, dtype=torch.int64)
        processed[METHOD_FIELD] = torch.full((len(items),), methods.method_id(method))
        processed[SEED_FIELD] = torch.tensor(
            [item_seed(h) for h in hashes] if method == "random" else [0] * len(items), dtype=torch.int64)
        question = hf_kwargs.get(QUERY_FIELD, [])
        processed[QUERY_FIELD] = torch.tensor([question] * len(items), dtype=torch.int64).reshape(len(items), -1)
        probe = hf_kwargs.get(PROBE_KEY, False)
        processed[PROBE_METHODS_FIELD] = torch.tensor(
            [methods.method_mask(m for m in methods.METHOD_NAMES if probe and self._servable(m, n)) for n in counts],
            dtype=torch.int64)
        processed[PROBE_KEEP_FIELD] = torch.tensor(
            [keep_count(n, self._policy.lowest_ratio) if probe else 0 for n in counts], dtype=torch.int64)
        return processed

    def _keep_counts(self, items: ImageProcessorItems, counts: list[int], ratio: float | str) -> list[int]:
        """Each image's K: ``keep_count`` of its N (``counts``) at the request's ratio or, under
        ``auto`` (``ratio`` its canonical string), at its predicted fraction under the policy."""
        if isinstance(ratio, str):
            budget = parse_budget(ratio, param=KEEP_RATIO_KEY)
            fractions = self._budget_predictor.fractions([items.get(i) for i in range(len(items))], counts)
            return [keep_count(n, self._policy.image_ratio(budget, f)) for n, f in zip(counts, fractions)]
        return [keep_count(n, ratio) for n in counts]

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        # K, method and seed stay on the CPU, where the model reads them without a device sync;
        # the question's ids go to the device, to the embedding table.
        for name in PRUNE_FIELDS:
            fields[name] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        fields[QUERY_FIELD] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(
            mm_items, self._without_prune_kwargs(hf_processor_mm_kwargs), out_mm_kwargs
        )
        return [self._pruned_update(u, out_mm_kwargs) for u in updates]

    def _pruned_update(self, update, out_mm_kwargs):
        """Shorten an image's placeholder run from N to the K its item carries; a replacement
        with text around its runs (``PromptUpdateDetails``) keeps the text (``_pruned_details``)."""
        if update.modality != "image" or not isinstance(update, PromptReplacement):
            return update
        full_replacement = update.replacement

        def replacement(item_idx: int):
            full = full_replacement(item_idx) if callable(full_replacement) else full_replacement
            item = out_mm_kwargs["image"][item_idx]
            if KEEP_FIELD not in item:  # precomputed embeddings: not pruned
                return full
            k = int(item[KEEP_FIELD].data)
            if isinstance(full, list) and len(set(full)) == 1:
                return full[:k]
            if isinstance(full, PromptUpdateDetails) and isinstance(full.full, list) and full.is_embed:
                return self._pruned_details(full, k)
            raise NotImplementedError(
                f"{type(self).__name__}: image replacement is neither a placeholder run nor token ids "
                "with their embedding positions")

        return dataclasses.replace(update, replacement=replacement)

    @staticmethod
    def _pruned_details(full: PromptUpdateDetails, k: int) -> PromptUpdateDetails:
        """A replacement whose embedding positions form runs between text (markers around an
        image, separators between its crops): each run cut to its share of K
        (``policy.split_keep``), every other token kept. The model fills run by run likewise."""
        embed = full.is_embed(full.full).tolist()
        runs = [list(run) for is_embed, run in itertools.groupby(range(len(embed)), key=embed.__getitem__)
                if is_embed]
        dropped = {j for run, share in zip(runs, split_keep(k, [len(r) for r in runs])) for j in run[share:]}
        return dataclasses.replace(full, full=[t for j, t in enumerate(full.full) if j not in dropped])

    def _record_metrics(self, inputs, result, ratio: float | None, method: str) -> None:
        """``ratio`` None: the request's images were under ``auto``."""
        from vllm_tokenprune.serving.metrics import record_request

        placeholders = result["mm_placeholders"].get("image", [])
        if not placeholders:
            return
        images = inputs.mm_data_items.get_items("image", ImageProcessorItems)
        passed_on = self._without_prune_kwargs(inputs.hf_processor_mm_kwargs)
        counts = [(self._unpruned_tokens(images.get_image_size(i), passed_on), p.get_num_embeds())
                  for i, p in enumerate(placeholders)]
        model_name = self.info.ctx.model_config.served_model_name
        if isinstance(model_name, (list, tuple)):
            model_name = model_name[0]
        record_request(str(model_name), method, ratio, counts)


class HFProcessorTokensMixin(PruningProcessorMixin):
    """N of families whose count follows the HF processor's kwargs (Gemma 3's pan-and-scan
    crops, InternVL's tiles): vLLM's own count for an image under them."""

    def _unpruned_tokens(self, image_size: ImageSize, hf_kwargs: Mapping[str, object]) -> int:
        return self.info.get_num_image_tokens(
            image_width=image_size.width, image_height=image_size.height,
            processor=self.info.get_hf_processor(**hf_kwargs), mm_kwargs=hf_kwargs)


def _chunks(counts: Sequence[int], budget: int) -> list[slice]:
    """Consecutive runs of ``counts`` adding up to at most ``budget``; a count past it alone."""
    found, start, total = [], 0, 0
    for i, n in enumerate(counts):
        if i > start and total + n > budget:
            found.append(slice(start, i))
            start, total = i, 0
        total += n
    return found + [slice(start, len(counts))] if counts else found


@functools.cache
def _served_budget_predictor(path: str):
    """The selector checkpoint's budget predictor, or None, with its kernel compiled: once
    per process (vLLM builds processors in several places, some per request; a server never
    swaps its checkpoint). A damaged one raises here and in the model, at start-up."""
    from vllm_tokenprune.selection.budget import load_budget_predictor

    loaded = load_budget_predictor(path)
    if loaded is None:
        return None
    loaded[0].warm_up()
    return loaded[0]


def check_budget_predictor(path: str | None, hf_config) -> None:
    """At start-up, in the model: the selector checkpoint's budget predictor loads, and a
    server whose default is ``auto`` has one."""
    has_predictor = path is not None and _served_budget_predictor(path) is not None
    if isinstance(PrunePolicy.from_config(hf_config).default_keep_ratio, AutoBudget) and not has_predictor:
        raise ValueError("the default keep ratio is auto, which needs a budget predictor, and "
                         f"{'the selector ' + path if path else 'this server (no selector)'} has none")
    if has_predictor:
        logger.info("tokenprune: the selector's budget predictor serves keep ratio 'auto'")


class NoEncoderCudaGraphsMixin:
    """For stock models that capture their tower in encoder CUDA graphs (``cudagraph_mm_encoder``):
    no graphs, because their replay bypasses ``embed_multimodal``, and so pruning."""

    def get_encoder_cudagraph_config(self):
        return dataclasses.replace(super().get_encoder_cudagraph_config(), modalities=[])


class Job(NamedTuple):
    """One image's (or crop's) selection: its method, candidate tokens and K, and the
    profile's probe, (method, K) pairs whose rows are dropped."""

    method: str
    tokens: methods.Tokens
    k: int
    probe: tuple[tuple[str, int], ...] = ()


class PruningModelMixin:
    """Mix into a vLLM multimodal model class (before it in the MRO).

    ``_init_pruning`` loads the selector named in the config (validated against the
    served model); ``_candidates`` makes an image's selection job and ``_select`` runs all
    the jobs of a tower call together.
    """

    token_selector: nn.Module | None
    query_selector: nn.Module | None  # the checkpoint's question-reading section, if any

    def _init_pruning(self, vllm_config, device: torch.device) -> None:
        hf_config = vllm_config.model_config.hf_config
        path = selector_path(hf_config)
        self.token_selector = self.query_selector = None
        scheduler = vllm_config.scheduler_config
        # The encoder budget, in tokens as an unpruned image counts them: the most vLLM
        # schedules, and profiles its tower with, in one step at keep 1.0. The scheduler
        # charges a pruned image only K, so a step may hold N / K times as many tower tokens;
        # the tower runs them in chunks of this size (``_in_tower_chunks``).
        self.tower_budget = min(scheduler.max_num_encoder_input_tokens, scheduler.encoder_cache_size)
        if path is None:
            check_budget_predictor(None, hf_config)
            return
        from vllm_tokenprune.selection.selector import (
            check_compatible,
            check_question_width,
            load_query_selector,
            load_selector,
        )

        selector, metadata = load_selector(path)
        check_compatible(metadata, hf_config)
        self.token_selector = selector.to(device=device).eval()
        logger.info("tokenprune: loaded selector %s (trained for %s)", path,
                    metadata.get("source_model"))
        check_budget_predictor(path, hf_config)
        if (found := load_query_selector(path)) is not None:
            check_question_width(found[0], hf_config)
            self.query_selector = found[0].to(device=device).eval()
            logger.info("tokenprune: the selector's question-reading section serves 'learned_query'")

    def _in_tower_chunks(self, embed: Callable[[object, dict], list[torch.Tensor]], image_input,
                         fields: dict[str, list], counts: Sequence[int],
                         rows: Mapping[str, Sequence[int]] | None = None) -> list[torch.Tensor]:
        """``embed(image_input, fields)`` over consecutive images whose ``counts`` (tokens as
        unpruned, ``tower_budget``'s unit) add up to at most the tower budget, an image past it
        alone: the tower never takes more at once than vLLM profiled, whatever K the scheduler
        charged. ``rows`` names the inputs packed flat, with each image's rows in them (Qwen's
        patches, Gemma 3's crops); every other tensor or list of one entry per image is cut
        likewise."""
        # A TypedDict, or a vLLM TensorSchema (its inputs as attributes)
        schema = not isinstance(image_input, Mapping)
        named = ({k: v for k, v in vars(image_input).items() if not k.startswith("_")} if schema
                 else image_input)
        out: list[torch.Tensor] = []
        for images in _chunks(counts, self.tower_budget):
            part = {}
            for name, value in named.items():
                if rows is not None and name in rows:
                    first = sum(rows[name][:images.start])
                    part[name] = value[first:first + sum(rows[name][images])]
                elif isinstance(value, (torch.Tensor, list, tuple)) and len(value) == len(counts):
                    part[name] = value[images]
                else:
                    part[name] = value
            out += embed(type(image_input)(validate=False, **part) if schema else part,
                         {name: value[images] for name, value in fields.items()})
        return out

    @staticmethod
    def _pop_prune_fields(kwargs: dict) -> dict[str, list] | None:
        """The batch's ``PruningInputs`` (validated), as lists per field, and under
        ``QUERY_FIELD`` each image's question ids (a 1-D tensor); None without them."""
        values = {name: kwargs.pop(name, None) for name in PRUNE_FIELDS}
        questions = kwargs.pop(QUERY_FIELD, None)
        if any(v is None for v in values.values()) or questions is None:
            return None
        inputs = PruningInputs(**{name: torch.as_tensor(v).flatten() for name, v in values.items()})
        fields = {name: [int(x) for x in getattr(inputs, name).tolist()] for name in PRUNE_FIELDS}
        fields[QUERY_FIELD] = [q.reshape(-1) for q in questions]  # a (B, L) tensor, or B tensors
        if len(fields[QUERY_FIELD]) != len(fields[KEEP_FIELD]):
            raise ValueError(f"{len(fields[QUERY_FIELD])} questions for {len(fields[KEEP_FIELD])} images")
        return fields

    @staticmethod
    def _image_methods(fields: dict[str, list[int]], i: int, num_tokens: int) -> list[str]:
        """The methods image i runs: its own, if it keeps fewer than its ``num_tokens``,
        and those of the profile's probe."""
        own = [methods.method_name(fields[METHOD_FIELD][i])] if fields[KEEP_FIELD][i] < num_tokens else []
        return own + methods.mask_names(fields[PROBE_METHODS_FIELD][i])

    @classmethod
    def _requested_probes(cls, fields: dict[str, list[int]], counts: Sequence[int]) -> set[methods.Probe]:
        """The tower statistics that the images of a batch (of ``counts`` tokens) need."""
        names = {name for i, n in enumerate(counts) for name in cls._image_methods(fields, i, n)}
        return set().union(*(methods.get(name).needs for name in names))

    def _candidates(self, fields: dict[str, list[int]], i: int, features: torch.Tensor, *,
                    grids: tuple[tuple[int, int], ...], k: int | None = None, probe_keep: int | None = None,
                    **tokens: object) -> Job:
        """Image i's candidate tokens (N, D) as a selection job; ``k`` and ``probe_keep``, a
        part's share of the image's K and probe K where a family selects per crop;
        ``tokens`` fills the rest of ``methods.Tokens`` (values, embed, stats)."""
        name = methods.method_name(fields[METHOD_FIELD][i])
        k = fields[KEEP_FIELD][i] if k is None else k
        probe_keep = fields[PROBE_KEEP_FIELD][i] if probe_keep is None else probe_keep
        probe = tuple((m, probe_keep) for m in methods.mask_names(fields[PROBE_METHODS_FIELD][i])) if probe_keep else ()
        running = [m for m, _ in probe] + ([name] if k < len(features) else [])  # at K = N no method runs
        if any(methods.get(m).reads_query for m in running):
            tokens["query"] = self.get_language_model().embed_input_ids(fields[QUERY_FIELD][i].to(features.device))
        return Job(name, methods.Tokens(features, grids, seed=fields[SEED_FIELD][i], selector=self.token_selector,
                                        query_selector=self.query_selector, **tokens), k, probe)

    @staticmethod
    def _select(jobs: Sequence[Job]) -> list[methods.Rows]:
        """The rows each job keeps, ascending stock positions: all the jobs of a tower call
        at once, each method once (``methods.select_all``)."""
        with torch.inference_mode():
            probe = [(name, job.tokens, k) for job in jobs for name, k in job.probe]
            if probe:  # the memory profile's (module docstring): run for the memory it takes
                methods.select_all(probe)
            return methods.select_all([(job.method, job.tokens, job.k) for job in jobs])

    def _selector_weight_names(self) -> Iterable[str]:
        """Names vLLM's loader must see as loaded (the selector loaded itself)."""
        return {f"{name}.{n}" for name in ("token_selector", "query_selector")
                if (module := getattr(self, name)) is not None for n, _ in module.named_parameters()}

