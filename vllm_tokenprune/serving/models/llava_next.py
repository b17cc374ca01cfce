"""LLaVA-NeXT (LLaVA-1.6) with visual-token pruning.

An image becomes a base crop plus an anyres grid of crops; the stock model unpads the
grid and appends an ``image_newline`` embedding after every row, so its N placeholders
are base tokens + unpadded grid tokens + one newline per row. How pruning treats that:

* K = keep_count(N, ratio), N the stock placeholder count, as for every family.
* The method sees the real tokens of the whole image (base and grid crops together, the
  vision-tower features before the projector), laid out as two grids: the base crop's
  patch grid and the unpadded grid of the anyres crops. Its K rows take their stock
  positions; attention statistics of a token are those of its own crop.
* Newline markers are layout, not content: once rows lose tokens they no longer delimit
  rows, so they are dropped first. Only when K exceeds the real tokens (ratios within a
  few percent of 1) are the first newlines kept to fill the count; at K = N the stock
  sequence is returned untouched.

The stock order (unpadding, newline positions) comes from vLLM's own
``_merge_image_patch_embeddings`` run on token indices, so it is never re-derived here.
"""

from __future__ import annotations

import itertools
import math
import types
from collections.abc import Iterable

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.selection.methods.batch import to_device
from vllm_tokenprune.serving.models.common import KEEP_FIELD
from vllm_tokenprune.serving.models.llava import LlavaPruningProcessorMixin, LlavaTowerMixin
from vllm_tokenprune.serving.models.model import PruningModelMixin


class PrunedLlavaNextMultiModalProcessor(LlavaPruningProcessorMixin, LlavaNextMultiModalProcessor):
    """LLaVA-NeXT's processor, each image's placeholder run cut to its K."""


@MULTIMODAL_REGISTRY.register_processor(
    PrunedLlavaNextMultiModalProcessor,
    info=LlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class PrunedLlavaNextForConditionalGeneration(
    LlavaTowerMixin, PruningModelMixin, LlavaNextForConditionalGeneration
):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning(vllm_config, next(self.vision_tower.parameters()).device)

    def _stock_order(self, image_size: torch.Tensor, crops: int, tokens: int) -> torch.Tensor:
        """For each stock output row: its index into the flattened crop tokens, or -1 for
        an image_newline row."""
        index = torch.arange(crops * tokens, dtype=torch.float64).view(crops, tokens, 1)
        # vLLM's merge reads only .config and .image_newline; a NaN newline marks its rows.
        marker = types.SimpleNamespace(
            config=self.config, image_newline=torch.tensor([math.nan], dtype=torch.float64))
        merged = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
            marker, image_size, index, strategy="spatial_unpad")[:, 0]
        return torch.where(merged.isnan(), -1, merged).long()

    def _pruned_embeddings(self, image_input, fields: dict[str, list[int]]):
        """The K embeddings of each image: the rows its method keeps over the base crop and
        the anyres grid together, newline markers dropped first (module docstring)."""
        pixel_values = image_input["pixel_values"]
        crops_per_image = [len(p) for p in pixel_values]
        first_crop = [0, *itertools.accumulate(crops_per_image)]
        per_crop, (base_grid,) = self._crop_tokens()
        orders = [self._stock_order(size, crops, per_crop)
                  for size, crops in zip(image_input["image_sizes"], crops_per_image)]
        probes = self._requested_probes(fields, [len(order) for order in orders])
        features, stats = self._tower_features(torch.cat(list(pixel_values)), probes)
        # One projector call for the batch, as stock: whole images at K = N, kept rows else.
        device = features.device
        rows, placements, jobs = [], [], []
        for i, (feats, order) in enumerate(zip(features.split(crops_per_image), orders)):
            k = fields[KEEP_FIELD][i]
            rows.append(feats.flatten(0, 1))
            if k >= len(order):
                placements.append(None)
                continue
            # Which rows are newlines follows from the image's size: found on the host.
            stock_rows = order.tolist()
            real_rows, newline_rows = (to_device([j for j, t in enumerate(stock_rows) if (t < 0) == newline], device)
                                       for newline in (False, True))
            token = to_device([t for t in stock_rows if t >= 0], device)  # each real row's index into the crop tokens
            extra = len(real_rows) - per_crop  # the unpadded anyres grid, a newline per row
            grids = (base_grid,) + (((len(newline_rows), extra // len(newline_rows)),) if extra else ())
            crop_stats = stats[first_crop[i]:first_crop[i] + crops_per_image[i]]
            jobs.append(self._candidates(
                fields, i, rows[i][token], k=min(k, len(real_rows)), grids=grids,
                stats={p: torch.cat([crop[p] for crop in crop_stats])[token] for p in probes},
                embed=self.multi_modal_projector))
            placements.append((real_rows, newline_rows, k))
        pruned = [i for i, placement in enumerate(placements) if placement is not None]
        for i, kept in zip(pruned, self._select(jobs)):
            real_rows, newline_rows, k = placements[i]
            rows[i] = kept.values
            placements[i] = (real_rows[kept.index], newline_rows[: k - len(kept.index)])
        embeds = self.multi_modal_projector(torch.cat(rows)).split([len(r) for r in rows])
        out = []
        for size, crops, image_embeds, placement in zip(
                image_input["image_sizes"], crops_per_image, embeds, placements):
            if placement is None:
                out.append(self._merge_image_patch_embeddings(
                    size, image_embeds.view(crops, per_crop, -1), strategy="spatial_unpad"))
                continue
            kept_rows, newlines = placement
            image_embeds = torch.cat([image_embeds, self.image_newline[None].expand(len(newlines), -1)])
            out.append(image_embeds[torch.cat([kept_rows, newlines]).argsort()])
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(weights) | set(self._selector_weight_names())
