"""What every pruned model family shares: the processor side and the model side.

A request's keep ratio and method reach vLLM's multimodal processor as
``mm_processor_kwargs``. The processor sizes each image's placeholder run to
K = ``keep_count(N, ratio)`` and hands K, the method id and a per-image seed to the
model as integer batched fields. The model, after the vision tower, hands each image's
tokens to its method and places the K rows it returns (``methods.Rows``) at their stock
positions, in stock order. vLLM fixes the placeholder count before the model runs, so K
is decided once, here, and never recomputed from a float.

Methods that read the tower's attention get it from ``methods.attention.TowerProbe``,
used only for a tower call in which some image asked for such a method.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from vllm.logger import init_logger
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems, ImageSize
from vllm.multimodal.processing import PromptReplacement

from vllm_tokenprune import methods
from vllm_tokenprune.budget import (
    KEEP_RATIO_KEY,
    METHOD_KEY,
    keep_count,
    parse_keep_ratio,
    parse_method,
)

logger = init_logger(__name__)

# hf_config attribute (set with --hf-overrides) naming the selector checkpoint to load.
SELECTOR_CONFIG_KEY = "tokenprune_selector"

KEEP_FIELD = "tokenprune_keep"
METHOD_FIELD = "tokenprune_method"
SEED_FIELD = "tokenprune_seed"
PRUNE_FIELDS = (KEEP_FIELD, METHOD_FIELD, SEED_FIELD)


def selector_path(hf_config) -> str | None:
    return getattr(hf_config, SELECTOR_CONFIG_KEY, None) or None


def image_seed(pixels: torch.Tensor) -> int:
    """A seed that depends only on an image's content (for the ``random`` method)."""
    raw = pixels.detach().cpu().contiguous().view(torch.uint8)  # any dtype, bf16 included
    digest = hashlib.blake2b(raw.numpy().tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


class PruningProcessorMixin:
    """Mix into a vLLM ``BaseMultiModalProcessor`` subclass (before it in the MRO).

    A family implements ``_unpruned_tokens(image_size)`` (its stock token count N for an
    image) and ``_image_pixels(processed, i)`` (image i's pixel tensor, for the seed).
    """

    def _unpruned_tokens(self, image_size: ImageSize) -> int:
        raise NotImplementedError

    def _image_pixels(self, processed, index: int) -> torch.Tensor:
        raise NotImplementedError

    def _tower_statistics_unavailable(self) -> str | None:
        """Why the served model cannot compute tower attention statistics, or None."""
        return None

    # -- the request's choice ---------------------------------------------------------

    def _prune_choice(self, mm_kwargs: Mapping[str, object]) -> tuple[float, str]:
        """(ratio, method) from the request's kwargs; defaults: keep all, 'learned' when a
        selector is loaded, else 'norm'. Raises ValueError (a 400 for the client)."""
        raw_ratio = mm_kwargs.get(KEEP_RATIO_KEY)
        ratio = 1.0 if raw_ratio is None else parse_keep_ratio(raw_ratio, param=KEEP_RATIO_KEY)
        has_selector = selector_path(self.info.get_hf_config()) is not None
        raw_method = mm_kwargs.get(METHOD_KEY)
        if raw_method is None:
            method = "learned" if has_selector else "norm"
        else:
            method = parse_method(raw_method, param=METHOD_KEY)
        if method == "learned" and not has_selector:
            raise ValueError(
                "prune_method 'learned' needs a selector, and this server has none "
                "(start it with --selector PATH); use 'norm' or 'random'"
            )
        if methods.get(method).needs and (reason := self._tower_statistics_unavailable()):
            raise ValueError(f"prune_method {method!r} reads the vision tower's attention, which {reason}")
        return ratio, method

    @staticmethod
    def _without_prune_kwargs(mm_kwargs: Mapping[str, object]) -> dict[str, object]:
        return {k: v for k, v in mm_kwargs.items() if k not in (KEEP_RATIO_KEY, METHOD_KEY)}

    # -- vLLM processor hooks ---------------------------------------------------------

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        # The one entry every family's processor goes through (Qwen3-VL's calls the HF
        # processor itself, never ``_call_hf_processor``).
        ratio, method = self._prune_choice(hf_kwargs)
        processed = super()._apply_hf_processor_main(
            mm_items, self._without_prune_kwargs(hf_kwargs))
        items = mm_items.get("image")
        if not isinstance(items, ImageProcessorItems) or not len(items):
            return processed  # no images, or precomputed embeddings (never pruned)
        keep = [keep_count(self._unpruned_tokens(items.get_image_size(i)), ratio)
                for i in range(len(items))]
        # Always emitted (dummy profiling included), so every batch has the fields.
        processed[KEEP_FIELD] = torch.tensor(keep, dtype=torch.int64)
        processed[METHOD_FIELD] = torch.full((len(items),), methods.method_id(method))
        processed[SEED_FIELD] = torch.tensor(
            [image_seed(self._image_pixels(processed, i)) for i in range(len(items))],
            dtype=torch.int64,
        )
        return processed

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for name in PRUNE_FIELDS:
            fields[name] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(
            mm_items, self._without_prune_kwargs(hf_processor_mm_kwargs), out_mm_kwargs
        )
        return [self._pruned_update(u, out_mm_kwargs) for u in updates]

    def _pruned_update(self, update, out_mm_kwargs):
        """Shorten an image's placeholder run from N to the K its item carries."""
        if update.modality != "image" or not isinstance(update, PromptReplacement):
            return update
        full_replacement = update.replacement

        def replacement(item_idx: int):
            full = full_replacement(item_idx) if callable(full_replacement) else full_replacement
            item = out_mm_kwargs["image"][item_idx]
            if KEEP_FIELD not in item:  # precomputed embeddings: not pruned
                return full
            k = int(item[KEEP_FIELD].data)
            if not isinstance(full, list) or len(set(full)) != 1:
                raise NotImplementedError(
                    f"{type(self).__name__}: image replacement is not a plain placeholder run"
                )
            return full[:k]

        return dataclasses.replace(update, replacement=replacement)

    def apply(self, inputs, timing_ctx):
        result = super().apply(inputs, timing_ctx)
        self._record_metrics(inputs, result)
        return result

    def _record_metrics(self, inputs, result) -> None:
        from vllm_tokenprune.metrics import record_request

        placeholders = result["mm_placeholders"].get("image", [])
        if not placeholders or KEEP_RATIO_KEY not in inputs.hf_processor_mm_kwargs:
            return  # offline or dummy (profiling) inputs; metrics count served requests
        ratio, method = self._prune_choice(inputs.hf_processor_mm_kwargs)
        images = inputs.mm_data_items.get_items("image", ImageProcessorItems)
        counts = [(self._unpruned_tokens(images.get_image_size(i)), p.length)
                  for i, p in enumerate(placeholders)]
        model_name = self.info.ctx.model_config.served_model_name
        if isinstance(model_name, (list, tuple)):
            model_name = model_name[0]
        record_request(str(model_name), method, ratio, counts)


class PruningModelMixin:
    """Mix into a vLLM multimodal model class (before it in the MRO).

    ``_init_pruning`` loads the selector named in the config (validated against the
    served model); ``_keep_rows`` applies an image's method to its candidate tokens.
    """

    token_selector: nn.Module | None

    def _init_pruning(self, vllm_config, device: torch.device) -> None:
        hf_config = vllm_config.model_config.hf_config
        path = selector_path(hf_config)
        self.token_selector = None
        if path is None:
            return
        from vllm_tokenprune.selector import check_compatible, load_selector

        selector, metadata = load_selector(path)
        check_compatible(metadata, hf_config)
        self.token_selector = selector.to(device=device).eval()
        logger.info("tokenprune: loaded selector %s (trained for %s)", path,
                    metadata.get("source_model"))

    @staticmethod
    def _pop_prune_fields(kwargs: dict) -> dict[str, list[int]] | None:
        values = {name: kwargs.pop(name, None) for name in PRUNE_FIELDS}
        if any(v is None for v in values.values()):
            return None
        return {name: [int(x) for x in torch.as_tensor(v).flatten().tolist()]
                for name, v in values.items()}

    @staticmethod
    def _requested_probes(fields: dict[str, list[int]], counts: Sequence[int]) -> set[methods.Probe]:
        """The tower statistics that the images of a batch need: those of the methods of
        the images that keep fewer than their ``counts`` tokens."""
        names = {methods.method_name(m)
                 for m, k, n in zip(fields[METHOD_FIELD], fields[KEEP_FIELD], counts) if k < n}
        return set().union(*(methods.get(name).needs for name in names))

    def _keep_rows(self, fields: dict[str, list[int]], i: int, features: torch.Tensor, *,
                   grids: tuple[tuple[int, int], ...], k: int | None = None,
                   **tokens: object) -> methods.Rows:
        """Image i's candidate tokens (N, D) -> the K rows its method keeps, ascending stock
        positions; ``tokens`` fills the rest of ``methods.Tokens`` (values, embed, stats)."""
        name = methods.method_name(fields[METHOD_FIELD][i])
        k = fields[KEEP_FIELD][i] if k is None else k
        candidates = methods.Tokens(features, grids, seed=fields[SEED_FIELD][i],
                                    selector=self.token_selector, **tokens)
        with torch.inference_mode():
            return methods.select(name, candidates, k)

    def _selector_weight_names(self) -> Iterable[str]:
        """Names vLLM's loader must see as loaded (the selector loaded itself)."""
        if self.token_selector is None:
            return ()
        return {f"token_selector.{n}" for n, _ in self.token_selector.named_parameters()}

