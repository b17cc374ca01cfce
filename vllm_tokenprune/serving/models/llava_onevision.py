"""LLaVA-OneVision with visual-token pruning.

An image becomes a base crop plus an anyres grid of crops, as in LLaVA-NeXT. The stock model
projects every crop, unpads the grid, and when the grid holds more than ``anyres_max_9``
allows (nine base crops' worth, with 10% slack) interpolates it bilinearly down; then it
appends an ``image_newline`` embedding after every row. Its N placeholders are base tokens +
(interpolated) grid tokens + one newline per row. How pruning treats that:

* K = keep_count(N, ratio) over the whole image, all crops together (docs/methods.md says
  why not per crop), as for LLaVA-NeXT.
* The candidates are the stock rows themselves. A method scores a row by the tower features
  it comes from (the projector's input, what the selector is trained on), put through the
  same unpadding and interpolation as the stock rows by vLLM's own merge; attention
  statistics likewise. A row carries its stock embedding, so a kept token is exactly the
  stock one, interpolated or not, and merged rows (``visionzip``, ``pool``) average stock
  embeddings, as the language model receives them. DivPrune measures diversity after the
  projector on the candidates' features, which equals the stock rows where nothing is
  interpolated.
* Newline markers are dropped first, and kept only to fill K when K exceeds the real rows;
  at K = N the stock sequence is returned untouched (see ``llava_next.py``).
* A video is one run: each frame's tower tokens projected and pooled 2 x 2 (bilinear), frame
  after frame, then one ``image_newline``. K = ``video_keep_count`` of that run, the newline
  included: the newline stays (when K > 1) and the method keeps K - 1 of the frames' rows. Its
  candidates are the stock rows, scored by the tower features pooled as the stock model pools
  the rows (vLLM's own ``apply_pooling``, on the features): a distribution the selector, trained
  on unpooled image features, has not seen. Positions are 1-D: nothing to place.
"""

from __future__ import annotations

import itertools
import math
import types
from collections.abc import Iterable

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.selection.methods.batch import to_device
from vllm_tokenprune.serving.models.common import KEEP_FIELD, UNPRUNED_FIELD
from vllm_tokenprune.serving.models.llava import LlavaPruningProcessorMixin, LlavaTowerMixin
from vllm_tokenprune.serving.models.model import Clip, PruningModelMixin


class PrunedLlavaOnevisionMultiModalProcessor(LlavaPruningProcessorMixin, LlavaOnevisionMultiModalProcessor):
    """LLaVA-OneVision's processor, each image's and each video's placeholder run cut to its K."""

    def _video_tokens(self, processed) -> list[tuple[int, int]]:
        # The "frame" a method that keeps the first frame whole needs: its tokens and the
        # video's newline, which the model keeps besides them.
        out = []
        for frames in processed["pixel_values_videos"]:
            n = self.info.get_num_video_tokens(image_width=0, image_height=0, num_frames=len(frames))
            out.append((n, (n - 1) // len(frames) + 1))
        return out


@MULTIMODAL_REGISTRY.register_processor(
    PrunedLlavaOnevisionMultiModalProcessor,
    info=LlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class PrunedLlavaOnevisionForConditionalGeneration(
    LlavaTowerMixin, PruningModelMixin, LlavaOnevisionForConditionalGeneration
):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning(vllm_config, next(self.vision_tower.parameters()).device)

    def embed_multimodal(self, **kwargs: object):
        fields = self._pop_prune_fields(kwargs)
        video_fields = self._pop_prune_fields(kwargs, "video")
        out: list[torch.Tensor] = []
        for modality, mm_input in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "video" and video_fields is not None:  # N a video, the encoder budget's unit
                out += self._in_tower_chunks(self._pruned_videos, mm_input, video_fields,
                                             video_fields[UNPRUNED_FIELD])
            elif modality == "video":
                out += self._process_video_pixels(mm_input)
            elif fields is None or mm_input["type"] != "pixel_values":
                out += self._process_image_input(mm_input)  # precomputed embeddings: never pruned
            else:
                out += self._in_tower_chunks(self._pruned_embeddings, mm_input, fields, *self._tower_counts(mm_input))
        return tuple(out)

    def _merged(self, image_size: torch.Tensor, crops: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        """vLLM's own unpadding, interpolation and newline rows applied to per-token channels
        ``crops`` (crops, tokens, C), with ``newline`` (C,) as the newline row."""
        # The merge reads only .config and, for an image of one crop, .image_newline.
        owner = types.SimpleNamespace(config=self.config, image_newline=newline)
        return LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings(
            owner, image_size, crops, image_newline=newline, strategy="spatial_unpad")

    def _pruned_embeddings(self, image_input, fields: dict[str, list[int]]) -> list[torch.Tensor]:
        """The K embeddings of each image: the stock rows its method keeps over the base crop
        and the anyres grid together, newline markers dropped first (module docstring)."""
        pixel_values, sizes = image_input["pixel_values"], image_input["image_sizes"]
        crops_per_image = [len(p) for p in pixel_values]
        first_crop = [0, *itertools.accumulate(crops_per_image)]
        per_crop, (base_grid,) = self._crop_tokens()
        nan = torch.tensor([math.nan])
        newlines = [self._merged(size, torch.zeros(crops, per_crop, 1), nan)[:, 0].isnan()
                    for size, crops in zip(sizes, crops_per_image)]
        probes = sorted(self._requested_probes(fields, [len(rows) for rows in newlines]))
        features, stats = self._tower_features(torch.cat(list(pixel_values)), set(probes))
        projected = self.multi_modal_projector(features)  # every crop, as stock
        device = features.device
        out, jobs, placements = [], [], []
        for i, (size, is_newline) in enumerate(zip(sizes, newlines)):
            crops = slice(first_crop[i], first_crop[i + 1])
            stock = self._merge_image_patch_embeddings(
                size, projected[crops], image_newline=self.image_newline, strategy="spatial_unpad")
            out.append(stock)
            k = fields[KEEP_FIELD][i]
            if k >= len(stock):
                continue
            # Features and statistics side by side as channels, through the stock merge.
            parts = [features[crops].float()] + [
                torch.stack([crop[p] for crop in stats[crops]]).float().reshape(crops_per_image[i], per_crop, -1)
                for p in probes]
            widths = [part.shape[-1] for part in parts]
            merged = self._merged(size, torch.cat(parts, dim=-1), torch.full((sum(widths),), math.nan, device=device))
            # Which rows are newlines follows from the image's size: found on the host.
            flags = is_newline.tolist()
            real_rows, newline_rows = (to_device([j for j, f in enumerate(flags) if f == newline], device)
                                       for newline in (False, True))
            row_features, *row_stats = merged[real_rows].split(widths, dim=-1)
            extra = len(real_rows) - per_crop  # the grid's rows, each ended by a newline
            grids = (base_grid,) + (((len(newline_rows), extra // len(newline_rows)),) if extra else ())
            jobs.append(self._candidates(
                fields, i, row_features.to(features.dtype), k=min(k, len(real_rows)), grids=grids,
                stats={p: s.squeeze(-1) if stats[crops.start][p].dim() == 1 else s
                       for p, s in zip(probes, row_stats)},
                values=stock[real_rows], embed=self.multi_modal_projector))
            placements.append((i, k, real_rows, newline_rows))
        for (i, k, real_rows, newline_rows), kept in zip(placements, self._select(jobs)):
            filler = newline_rows[: k - len(kept.index)]
            rows = torch.cat([kept.values, out[i][filler]])
            out[i] = rows[torch.cat([real_rows[kept.index], filler]).argsort()]
        return out

    def _pruned_videos(self, video_input, fields: dict[str, list[int]]) -> list[torch.Tensor]:
        """Each video's K rows: the frames' pooled stock rows its method keeps, then the newline
        (module docstring)."""
        videos = list(video_input["pixel_values_videos"])
        features = self._image_pixels_to_features(self.vision_tower, torch.cat(videos))  # as the stock video path
        rows = self.apply_pooling(self.multi_modal_projector(features))  # the stock rows, per frame
        pooled = self.apply_pooling(features)  # the features, pooled alike: what methods score
        side = math.isqrt(rows.shape[1])
        first = [0, *itertools.accumulate(len(v) for v in videos)]
        clips = [Clip(pooled[first[i]:first[i + 1]].flatten(0, 1), rows[first[i]:first[i + 1]].flatten(0, 1),
                      (side, side), len(v)) for i, v in enumerate(videos)]
        ks = fields[KEEP_FIELD]
        kept = self._select_videos(fields, clips, keep=[k - 1 if k > 1 else 1 for k in ks])
        return [torch.cat([r.values, self.image_newline[None]]) if k > 1 else r.values for r, k in zip(kept, ks)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(weights) | set(self._selector_weight_names())
