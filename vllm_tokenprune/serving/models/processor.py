"""The processor half of every pruned family, in vLLM's API server (and wherever vLLM
processes inputs): each request's pruning decided under the operator's policy, K sized
into the prompt, the fields the model reads (``common``) attached to each image.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from collections.abc import Mapping
from contextvars import ContextVar

import torch
from vllm.exceptions import VLLMValidationError
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, VideoProcessorItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from vllm_tokenprune import families
from vllm_tokenprune.policy import (
    KEEP_RATIO_KEY,
    METHOD_KEY,
    OUR_KEYS,
    VIDEO_KEEP_RATIO_KEY,
    VIDEO_METHOD_KEY,
    AutoBudget,
    PrunePolicy,
    PruneRequestError,
    frame_shares,
    keep_count,
    markup_ids,
    parse_budget,
    question_tokens,
    resolve,
    video_keep_count,
)
from vllm_tokenprune.selection import methods
from vllm_tokenprune.serving.models.common import (
    FIELDS,
    KEEP_FIELD,
    METHOD_FIELD,
    PROBE_KEY,
    QUERY_FIELD,
    plan_value,
    selector_path,
    served_budget_predictor,
)

# How many items' N a processor remembers by item hash, for the metrics of items that
# vLLM's processor cache serves (a client may send those as a uuid alone, without pixels).
_REMEMBERED_IMAGES = 1 << 17


def item_seed(item_hash: str) -> int:
    """The ``random`` method's seed for an item: from the identity vLLM already computed
    for it (content hash, or the client's uuid), so the same image draws the same tokens."""
    digest = hashlib.blake2b(item_hash.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclasses.dataclass
class _Call:
    """One ``apply`` call's state, for the processor hooks vLLM calls inside it: the item
    hashes, so that vLLM computes them once, and the ``random`` seeds and each processed
    item's remembered N come from them. Held in a context variable because one processor
    serves the renderer's thread pool."""

    inputs: object
    hashes: object = None  # vLLM's item hashes, computed once
    # per modality, the hashes of the items the next HF call processes
    pending: dict[str, list[str]] = dataclasses.field(default_factory=dict)


class PruningRequestError(VLLMValidationError):
    """``policy.PruneRequestError`` in the type vLLM answers with a 400 naming ``parameter``:
    the form the processor raises it in."""

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
    for an image under the HF processor kwargs the request passes on, and where its row
    in ``families`` prunes videos, ``_video_tokens(processed)``: each processed video's N
    and tokens per frame.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # With the processor, at start-up: the first auto request pays no load or compile.
        path = selector_path(self.info.get_hf_config())
        self._budget_predictor = None if path is None else served_budget_predictor(path)
        self._unpruned_seen: dict[str, int] = {}  # item hash -> N, least recently used first

    def _unpruned_tokens(self, image_size: ImageSize, hf_kwargs: Mapping[str, object]) -> int:
        raise NotImplementedError

    def _video_tokens(self, processed) -> list[tuple[int, int]]:
        raise NotImplementedError

    def _tower_statistics_unavailable(self) -> str | None:
        """Why the served model cannot compute tower attention statistics, or None."""
        return None

    @functools.cached_property
    def _prunes_videos(self) -> bool:
        return families.of_model_type(self.info.get_hf_config().model_type).videos

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

    def _method(self, requested: str | None, key: str = METHOD_KEY) -> str:
        """The method an image gets: the one asked for, if this server can run it; by
        default 'learned' when a selector is loaded, else 'norm'."""
        has_selector = selector_path(self.info.get_hf_config()) is not None
        if requested is None:
            return "learned" if has_selector else "norm"
        param = "mm_processor_kwargs." + key
        uses = methods.get(requested).uses_selector
        if uses == "selector" and not has_selector:
            raise PruneRequestError(
                f"prune_method {requested!r} needs a selector, and this server has none "
                "(start it with --selector PATH); use 'norm' or 'random'", param)
        if uses == "query" and not self._has_query_selector:
            raise PruneRequestError(
                f"prune_method {requested!r} needs a selector that reads the question, and this server's "
                + ("selector has none (`vllm-tokenprune train-query` adds one)" if has_selector
                   else "has no selector (start it with --selector PATH)"), param)
        if methods.get(requested).needs and (reason := self._tower_statistics_unavailable()):
            raise PruneRequestError(
                f"prune_method {requested!r} reads the vision tower's attention, which {reason}", param)
        return requested

    def _video_method(self, requested: str | None, ratio: float) -> str | None:
        """The method a video gets (by default 'evs'), or None where this family serves
        videos whole (then a ratio under 1 is refused)."""
        if not self._prunes_videos:
            if ratio < 1.0:
                raise PruneRequestError(
                    f"{VIDEO_KEEP_RATIO_KEY} {ratio!r}: this model's videos are served whole (video pruning "
                    f"serves {families.serving_videos()})", "mm_processor_kwargs." + VIDEO_KEEP_RATIO_KEY)
            return None
        name = self._method(requested or methods.DEFAULT_VIDEO_METHOD, VIDEO_METHOD_KEY)
        if methods.get(name).needs:
            raise PruneRequestError(
                f"{VIDEO_METHOD_KEY} {name!r} reads the vision tower's attention, which is not computed for "
                "video frames", "mm_processor_kwargs." + VIDEO_METHOD_KEY)
        return name

    @functools.cached_property
    def _markup_ids(self) -> frozenset[int]:
        return markup_ids(self.info.get_tokenizer())

    def _servable(self, name: str, num_tokens: int, video: bool = False) -> bool:
        """Whether this server runs method ``name`` for an image (``video``: a video frame)
        of ``num_tokens`` tokens."""
        try:
            self._video_method(name, 1.0) if video else self._method(name)
        except PruneRequestError:
            return False
        return (video or not methods.get(name).video_only) and not self._quadratic_refused(name, num_tokens)

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
            has_videos = bool(inputs.mm_data_items.get_count("video", strict=False))
            video_method = self._video_method(request.video_method, request.video_keep_ratio) if has_videos else None
        except PruneRequestError as err:
            raise PruningRequestError(str(err), parameter=err.param) from None
        # A video's choices join the kwargs only where its videos are pruned: they enter every
        # item's hash.
        video = ({} if video_method is None else
                 {VIDEO_KEEP_RATIO_KEY: request.video_keep_ratio, VIDEO_METHOD_KEY: video_method})
        # auto travels as its canonical string: what the predictor decides follows from it and
        # the image, both in vLLM's item hash, so a cache hit holds the K a miss would compute.
        # The question too, for a method that reads one: another question is another item.
        question = ({QUERY_FIELD: question_tokens(inputs.prompt, self._markup_ids)}
                    if any(methods.get(m).reads_query for m in (method, video_method) if m) else {})
        inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={
            **request.hf_kwargs, KEEP_RATIO_KEY: str(request.keep_ratio) if auto else request.keep_ratio,
            METHOD_KEY: method, **video, **question, **({PROBE_KEY: True} if _DUMMY.get() else {})})
        call = _Call(inputs)
        token = _CALL.set(call)
        try:
            if inputs.mm_data_items.get_count("image", strict=False) or video:
                call.pending = dict(self._get_mm_hashes(inputs))  # vLLM's own, computed once
            result = super().apply(inputs, timing_ctx)
        finally:
            _CALL.reset(token)
        if request.served and not _DUMMY.get():
            self._record_metrics(inputs, result, call.hashes, None if auto else request.keep_ratio, method,
                                 video_method)
        return result

    def _check_quadratic_memory(self, inputs, request, method: str) -> None:
        """Refuse a method that holds N x N values per image for images past the operator's
        bound (at K = N no method runs, so keep 1.0 passes)."""
        images = inputs.mm_data_items.get("image")
        if (request.keep_ratio == 1.0 or not methods.get(method).quadratic_memory
                or not isinstance(images, ImageProcessorItems) or not len(images)):
            return
        # An image sent as a uuid alone is one vLLM's cache holds: checked when it was processed.
        largest = max((self._unpruned_tokens(images.get_image_size(i), request.hf_kwargs)
                       for i in range(len(images)) if images.get(i) is not None), default=0)
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
        if call is not None:  # only the missing ones are processed
            call.pending = {modality: [h for h, hit in zip(hashes, is_cached.get(modality, [])) if not hit]
                            for modality, hashes in call.pending.items()}
        return is_cached, missing

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        # The one entry every family's processor goes through (Qwen3-VL's calls the HF
        # processor itself, never ``_call_hf_processor``). ``hf_kwargs`` are canonical.
        passed_on = self._without_prune_kwargs(hf_kwargs)
        processed = super()._apply_hf_processor_main(mm_items, passed_on)
        items = mm_items.get("image")
        # No images, or precomputed embeddings (never pruned), have no plan.
        if isinstance(items, ImageProcessorItems) and len(items):
            counts = [self._unpruned_tokens(items.get_image_size(i), passed_on) for i in range(len(items))]
            keep = self._keep_counts(items, counts, hf_kwargs[KEEP_RATIO_KEY])
            self._add_plans(processed, "image", hf_kwargs, hf_kwargs[METHOD_KEY], counts, keep,
                            lambda i: [m for m in methods.METHOD_NAMES if self._servable(m, counts[i])])
        videos = mm_items.get("video")
        if VIDEO_METHOD_KEY in hf_kwargs and isinstance(videos, VideoProcessorItems) and len(videos):
            method, ratio = hf_kwargs[VIDEO_METHOD_KEY], hf_kwargs[VIDEO_KEEP_RATIO_KEY]
            shapes = self._video_tokens(processed)
            if ratio < 1.0 and self._quadratic_refused(method, max(frame for _, frame in shapes)):
                raise PruningRequestError(
                    f"{VIDEO_METHOD_KEY} {method!r} holds N x N values per frame, and this server takes it for "
                    f"frames of up to {self._policy.max_quadratic_tokens} tokens; use a smaller video or another "
                    "method", parameter="mm_processor_kwargs." + VIDEO_METHOD_KEY)
            first_whole = methods.get(method).first_frame_whole
            self._add_plans(processed, "video", hf_kwargs, method, [n for n, _ in shapes],
                            [video_keep_count(n, frame, ratio, first_whole) for n, frame in shapes],
                            lambda i: [m for m in methods.METHOD_NAMES if self._servable(m, shapes[i][1], video=True)])
        return processed

    def _add_plans(self, processed, modality: str, hf_kwargs, method: str, counts: list[int],
                   keep: list[int], probe_methods) -> None:
        """Each item's plan and question, as the fields of ``modality`` (``common.FIELDS``):
        always emitted (dummy profiling included), so every batch has them; the plan's rows
        as ``PRUNE_FIELDS`` orders the columns. The profile's probe: ``probe_methods(i)``,
        the methods this server may run on item i, at the smallest K the policy allows."""
        call = _CALL.get()
        hashes = call.pending.get(modality) if call is not None else None
        if hashes is not None and len(hashes) == len(counts):
            self._remember_unpruned(zip(hashes, counts))
        elif method == "random":
            raise RuntimeError(f"tokenprune: no item hashes for {len(counts)} {modality}s to seed 'random'")
        method_id = methods.method_id(method)
        probe = hf_kwargs.get(PROBE_KEY, False)
        plan_field, query_field = FIELDS[modality]
        processed[plan_field] = torch.tensor([
            (n, k, method_id, item_seed(hashes[i]) if method == "random" else 0,
             methods.method_mask(probe_methods(i)) if probe else 0,
             keep_count(n, self._policy.lowest_ratio) if probe else 0)
            for i, (n, k) in enumerate(zip(counts, keep))], dtype=torch.int64)
        question = hf_kwargs.get(QUERY_FIELD, []) if methods.get(method).reads_query else []
        processed[query_field] = torch.tensor([question] * len(counts), dtype=torch.int64).reshape(len(counts), -1)

    def _remember_unpruned(self, pairs) -> None:
        seen = self._unpruned_seen
        for item_hash, n in pairs:
            seen.pop(item_hash, None)
            seen[item_hash] = n
        while len(seen) > _REMEMBERED_IMAGES:
            del seen[next(iter(seen))]

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
        # The plan stays on the CPU, where the model reads it without a device sync; the
        # question's ids go to the device, to the embedding table.
        for modality, (plan, query) in FIELDS.items():
            fields[plan] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
            fields[query] = MultiModalFieldConfig.batched(modality)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(
            mm_items, self._without_prune_kwargs(hf_processor_mm_kwargs), out_mm_kwargs
        )
        return [self._pruned_update(u, out_mm_kwargs) for u in updates]

    def _pruned_update(self, update, out_mm_kwargs):
        """Shorten an item's placeholder run from N to the K its item carries; a replacement
        with text around its runs (``PromptUpdateDetails``) keeps the text (``_pruned_details``)."""
        if update.modality not in FIELDS or not isinstance(update, PromptReplacement):
            return update
        full_replacement = update.replacement
        plan_field = FIELDS[update.modality][0]

        def replacement(item_idx: int):
            full = full_replacement(item_idx) if callable(full_replacement) else full_replacement
            item = out_mm_kwargs[update.modality][item_idx]
            if plan_field not in item:  # precomputed embeddings, or a video served whole: not pruned
                return full
            k = plan_value(item[plan_field].data, KEEP_FIELD)
            if isinstance(full, list) and len(set(full)) == 1:
                return full[:k]
            if isinstance(full, PromptUpdateDetails) and isinstance(full.full, list) and full.is_embed:
                # a video's frames: the first whole where its method keeps it so
                first_whole = update.modality == "video" and methods.get(methods.method_name(
                    plan_value(item[plan_field].data, METHOD_FIELD))).first_frame_whole
                return self._pruned_details(full, k, first_whole)
            raise NotImplementedError(
                f"{type(self).__name__}: {update.modality} replacement is neither a placeholder run nor token ids "
                "with their embedding positions")

        return dataclasses.replace(update, replacement=replacement)

    @staticmethod
    def _pruned_details(full: PromptUpdateDetails, k: int, first_whole: bool = False) -> PromptUpdateDetails:
        """A replacement whose embedding positions form runs between text (markers around an
        image, separators between its crops, a video's frames between timestamps): each run
        cut to its share of K (``policy.frame_shares``; ``first_whole``: the first run whole),
        every other token kept. The model fills run by run likewise."""
        embed = full.is_embed(full.full).tolist()
        runs = [list(run) for is_embed, run in itertools.groupby(range(len(embed)), key=embed.__getitem__)
                if is_embed]
        shares = frame_shares(k, [len(r) for r in runs], first_whole)
        dropped = {j for run, share in zip(runs, shares) for j in run[share:]}
        return dataclasses.replace(full, full=[t for j, t in enumerate(full.full) if j not in dropped])

    def _record_metrics(self, inputs, result, hashes, ratio: float | None, method: str,
                        video_method: str | None) -> None:
        """``ratio`` None: the request's images were under ``auto``. N is the one remembered
        when the item was processed, or, for an image past what the processor remembers,
        counted again (an item sent without pixels is then left out of the token counts)."""
        from vllm_tokenprune.serving.metrics import record_request, record_videos

        if images := self._item_counts(inputs, result, hashes, "image"):
            record_request(self._served_name, method, ratio, images)
        if video_method is not None and (videos := self._item_counts(inputs, result, hashes, "video")):
            record_videos(self._served_name, video_method, videos)

    def _item_counts(self, inputs, result, hashes, modality: str) -> list[tuple[int | None, int]]:
        """(N, K) of each item of ``modality`` (N None where unknown)."""
        placeholders = result["mm_placeholders"].get(modality, [])
        if not placeholders:
            return []
        images = inputs.mm_data_items.get_items("image", ImageProcessorItems) if modality == "image" else None
        passed_on = self._without_prune_kwargs(inputs.hf_processor_mm_kwargs)
        seen = self._unpruned_seen
        counts = []
        for i, (item_hash, p) in enumerate(zip(hashes[modality], placeholders)):
            if (n := seen.get(item_hash)) is None and images is not None and images.get(i) is not None:
                n = self._unpruned_tokens(images.get_image_size(i), passed_on)
            counts.append((n, p.get_num_embeds()))
        self._remember_unpruned((h, n) for h, (n, _) in zip(hashes[modality], counts) if n is not None)
        return counts

    @functools.cached_property
    def _served_name(self) -> str:
        name = self.info.ctx.model_config.served_model_name
        return str(name[0] if isinstance(name, (list, tuple)) else name)


class HFProcessorTokensMixin(PruningProcessorMixin):
    """N of families whose count follows the HF processor's kwargs (Gemma 3's pan-and-scan
    crops, InternVL's tiles): vLLM's own count for an image under them."""

    def _unpruned_tokens(self, image_size: ImageSize, hf_kwargs: Mapping[str, object]) -> int:
        return self.info.get_num_image_tokens(
            image_width=image_size.width, image_height=image_size.height,
            processor=self.info.get_hf_processor(**hf_kwargs), mm_kwargs=hf_kwargs)
