"""Gemma 4 with visual-token pruning.

Gemma 4's tower sees each image at its own aspect ratio: the processor resizes it to at most
``max_soft_tokens`` x k^2 patches (k the pooling kernel, 3 on the real model) with both sides
multiples of k patches, the tower runs on them (padded to a fixed patch count, padding
masked), and its pooler averages each k x k block of patches into one soft token, which the
embedder normalizes and projects into the language model. The prompt holds
``<|image>`` + one ``<|image|>`` per soft token + ``<image|>``; vLLM counts the soft tokens
from the image size (``_compute_num_soft_tokens``). How pruning treats that:

* The candidates are the soft tokens, one per placeholder, laid out as the pooled grid
  (rows, columns of k x k blocks, row-major, as the pooler orders them). The method scores a
  soft token by the pooler's output (before the embedder: what the selector is trained on);
  a kept row carries the stock embedding, so a kept token is exactly the stock one, and
  merging methods embed their averages with the stock embedder.
* K = keep_count(N, ratio) per image, cut from the one run between the markers, which stay.
  One image is one run (no crops or tiles), so nothing is split.
* The tower is transformers' module inside vLLM, which calls its attention function by name,
  with no vLLM attention op to probe. An image whose method reads attention statistics runs
  through the tower alone, without its padding patches (so the statistics cover its own
  patches only), while a tapped attention function (``_tapped_attention``) hands the probed
  layers' queries and keys to ``TowerProbe``; a soft token gets the mean over its k x k
  patches. The other images of the batch take the stock batched path.
* Videos (frames through the same tower) and audio are never pruned.

The language model places tokens by 1-D positions, as Gemma 3's does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gemma4.modeling_gemma4 import eager_attention_forward
from vllm.model_executor.models.gemma4_mm import (
    _SUPPORTED_SOFT_TOKENS,
    Gemma4DummyInputsBuilder,
    Gemma4ForConditionalGeneration,
    Gemma4MultiModalProcessor,
    Gemma4ProcessingInfo,
    _get_max_soft_tokens,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageSize

from vllm_tokenprune.selection import methods
from vllm_tokenprune.selection.methods.attention import TowerProbe
from vllm_tokenprune.serving.models.llava import OBJECT_LAYER_SHARE
from vllm_tokenprune.serving.models.model import NoEncoderCudaGraphsMixin, PruningModelMixin
from vllm_tokenprune.serving.models.processor import PruningProcessorMixin


class PrunedGemma4MultiModalProcessor(PruningProcessorMixin, Gemma4MultiModalProcessor):
    """Gemma 4's processor, each image's soft-token run cut to its K, markers kept."""

    def _unpruned_tokens(self, image_size: ImageSize, hf_kwargs: Mapping[str, object]) -> int:
        # The image's token budget as the stock replacement resolves it (request over server kwargs)
        budget, _ = _get_max_soft_tokens(self.info.ctx.get_merged_mm_kwargs(hf_kwargs))
        return self.info._compute_num_soft_tokens(
            image_size.width, image_size.height, max_soft_tokens=budget if budget in _SUPPORTED_SOFT_TOKENS else None)


# -- the tower's attention, tapped ------------------------------------------------------

_TAPPED = "tokenprune_tapped"
# While taps are on: the taps by attention module, and the tower's own attention function's name
_TAPS: ContextVar[tuple[dict, str | None] | None] = ContextVar("tokenprune_gemma4_taps", default=None)


class _AttentionTap(torch.nn.Module):
    """Stands for one tower layer's attention in ``TowerProbe``, which hooks it: it is called
    with the queries and keys (B, S, heads x d) the attention function gets."""

    def __init__(self, attention: torch.nn.Module) -> None:
        super().__init__()
        self.num_heads = attention.config.num_attention_heads
        self.head_size = attention.head_dim
        self.scale = attention.scaling
        self.groups = attention.num_key_value_groups

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> None:
        return None


def _tapped(module, query, key, value, attention_mask, **kwargs):
    """The attention function while taps are on: the tapped layers' queries and keys (after
    norm and rotary, B x heads x S x d) to their tap, then the function the tower had."""
    taps, original = _TAPS.get()
    if (tap := taps.get(module)) is not None:
        tap(query.transpose(1, 2).flatten(2), key.repeat_interleave(tap.groups, dim=1).transpose(1, 2).flatten(2))
    return ALL_ATTENTION_FUNCTIONS.get_interface(original, eager_attention_forward)(
        module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_TAPPED, _tapped)


@contextlib.contextmanager
def _tapped_attention(config, taps: dict[torch.nn.Module, _AttentionTap]):
    """Route the tower's attention (all layers share ``config``) through ``_tapped``."""
    original = config._attn_implementation
    token = _TAPS.set((taps, original))
    config._attn_implementation = _TAPPED
    try:
        yield
    finally:
        config._attn_implementation = original
        _TAPS.reset(token)


def patch_grids(position_ids: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """(rows, columns) of each image's real patches, from their (x, y) positions (-1: the
    padding that follows them): one read of the device for all the images."""
    corners = torch.stack([p.reshape(-1, 2).max(dim=0).values for p in position_ids]).tolist()
    return [(y + 1, x + 1) for x, y in corners]


@MULTIMODAL_REGISTRY.register_processor(
    PrunedGemma4MultiModalProcessor,
    info=Gemma4ProcessingInfo,
    dummy_inputs=Gemma4DummyInputsBuilder,
)
class PrunedGemma4ForConditionalGeneration(NoEncoderCudaGraphsMixin, PruningModelMixin, Gemma4ForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning(vllm_config, next(self.vision_tower.parameters()).device)

    def _embed(self, soft_tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_vision(inputs_embeds=soft_tokens.unsqueeze(0)).squeeze(0)

    def _stock_images(self, image_input) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stock path's embeddings of each image and its soft tokens, read where they
        enter the embedder."""
        seen: list[torch.Tensor] = []
        hook = self.embed_vision.register_forward_pre_hook(
            lambda _, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True)
        try:
            stock = self._process_image_input(image_input)
        finally:
            hook.remove()
        return stock, list(seen[0].squeeze(0).split([len(e) for e in stock]))

    def _probed_images(self, image_input, probes: set[methods.Probe], patches: Sequence[tuple[int, int]]):
        """``_stock_images`` with each image's ``probes`` per soft token: the image alone,
        without its padding patches (it has ``patches``' real ones), under ``TowerProbe``
        (module docstring)."""
        layers = self.vision_tower.encoder.layers
        middle = max(0, round(len(layers) * OBJECT_LAYER_SHARE) - 1)
        taps = {layers[-1].self_attn: _AttentionTap(layers[-1].self_attn),
                layers[middle].self_attn: _AttentionTap(layers[middle].self_attn)}
        ops = {methods.LATE: taps[layers[-1].self_attn], methods.MIDDLE: taps[layers[middle].self_attn]}
        kernel = self.config.vision_config.pooling_kernel_size
        stock, soft_tokens, stats = [], [], []
        for pixels, positions, (patch_rows, patch_cols) in zip(
                image_input["pixel_values"], image_input["pixel_position_ids"], patches):
            real = slice(0, patch_rows * patch_cols)
            alone = {"pixel_values": [pixels[real]], "pixel_position_ids": [positions[real]]}
            probe = TowerProbe(ops, probes, has_cls=False, total_heads=self.config.vision_config.num_attention_heads)
            with probe, _tapped_attention(layers[-1].self_attn.config, taps):
                (embeds,), (tokens,) = self._stock_images(alone)
            rows, cols = patch_rows // kernel, patch_cols // kernel
            # each patch's statistic to its soft token: block (y // k, x // k), row-major
            block = (positions[real, 1] // kernel) * cols + positions[real, 0] // kernel
            # (summed in a fixed order: index_add_'s atomics differ from run to run on CUDA)
            stats.append({p: torch.zeros(rows * cols, *v.shape[1:], device=v.device).index_put_(
                (block,), v.float(), accumulate=True) / kernel**2 for p, v in probe.results()[0].items()})
            stock.append(embeds)
            soft_tokens.append(tokens)
        return stock, soft_tokens, stats

    def _pruned_embeddings(self, image_input, fields: dict[str, list]) -> list[torch.Tensor]:
        """The K embeddings of each image, in stock order. Images whose method reads attention
        statistics run alone under the probe (``_probed_images``); the others take the stock
        batched path, so an image kept whole is the stock one whatever it is batched with.
        (The processor caps an image's blocks at its budget, so its grid holds exactly its
        soft tokens.)"""
        kernel = self.config.vision_config.pooling_kernel_size
        patches = patch_grids(image_input["pixel_position_ids"])
        grids = [(rows // kernel, cols // kernel) for rows, cols in patches]
        counts = [rows * cols for rows, cols in grids]
        probed = [i for i, n in enumerate(counts)
                  if any(methods.get(name).needs for name in self._image_methods(fields, i, n))]
        rest = [i for i in range(len(counts)) if i not in probed]

        def images(indices: list[int]) -> dict[str, list[torch.Tensor]]:
            return {name: [image_input[name][i] for i in indices] for name in ("pixel_values", "pixel_position_ids")}

        found = {}
        if rest:
            found.update(zip(rest, zip(*self._stock_images(images(rest)), [{}] * len(rest))))
        if probed:
            found.update(zip(probed, zip(*self._probed_images(images(probed), self._requested_probes(fields, counts),
                                                              [patches[i] for i in probed]))))
        return [rows.values for rows in self._select([
            self._candidates(fields, i, found[i][1], grids=(grid,), values=found[i][0], embed=self._embed,
                             stats=found[i][2]) for i, grid in enumerate(grids)])]

    def _tower_counts(self, image_input) -> list[int]:
        """Each image's soft tokens at most: its patches (padding included) over the pooling."""
        return [len(p) // self.config.vision_config.pooling_kernel_size**2 for p in image_input["pixel_values"]]

    def embed_multimodal(self, **kwargs: object):
        fields = self._pop_prune_fields(kwargs)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        if fields is None or inputs.get("image") is None:
            return super().embed_multimodal(**kwargs)
        stock = {"video": self._process_video_input, "audio": self._process_audio_input}
        out: list[torch.Tensor] = []
        for modality, mm_input in inputs.items():  # the order vLLM passed them in
            if mm_input is not None:
                out += (self._in_tower_chunks(self._pruned_embeddings, mm_input, fields, self._tower_counts(mm_input))
                        if modality == "image" else stock[modality](mm_input))
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(weights) | set(self._selector_weight_names())
