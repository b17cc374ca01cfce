"""InternVL (transformers' layout, ``InternVLForConditionalGeneration``) with visual-token pruning.

An image becomes tiles of the tower's input size (a grid close to its aspect ratio) plus a
thumbnail of the whole image when there is more than one tile. The tower drops its [CLS]
token, a pixel shuffle folds each 2 x 2 patch group into one token (four times as wide),
and the projector maps those into the language model. The prompt holds them all in one run:
``<img>`` + one ``<IMG_CONTEXT>`` per token of every tile + ``</img>``. How pruning treats that:

* K = keep_count(N, ratio) over the whole image, all tiles and the thumbnail together
  (docs/methods.md says why not per tile): nothing separates the tiles in the prompt, so
  the kept tokens of all tiles fill the one run in stock order, between the stock markers.
* The method scores a token by its pixel-shuffled tower features (the projector's input,
  what the selector is trained on), laid out as one grid per tile; attention statistics
  are the mean over the token's 2 x 2 patches. A kept row carries the stock embedding, so
  a kept token is exactly the stock one and merging methods average stock embeddings.
* Videos (a run per frame, with text between) are never pruned.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.selection import methods
from vllm_tokenprune.selection.methods.attention import TowerProbe
from vllm_tokenprune.serving.models.llava import OBJECT_LAYER_SHARE
from vllm_tokenprune.serving.models.model import PruningModelMixin
from vllm_tokenprune.serving.models.processor import HFProcessorTokensMixin


class PrunedInternVLMultiModalProcessor(HFProcessorTokensMixin, InternS1MultiModalProcessor):
    """InternVL's processor, each image's run of context tokens cut to its K, markers kept."""


@MULTIMODAL_REGISTRY.register_processor(
    PrunedInternVLMultiModalProcessor,
    info=InternS1ProcessingInfo,
    dummy_inputs=InternS1DummyInputsBuilder,
)
class PrunedInternVLForConditionalGeneration(PruningModelMixin, InternS1ForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning(vllm_config, next(self.vision_tower.parameters()).device)

    def _shuffled(self, per_patch: torch.Tensor) -> torch.Tensor:
        """Tower outputs without [CLS] (tiles, patches, C) -> per token (tiles, tokens, 4C),
        by the stock pixel shuffle."""
        side = int(per_patch.shape[1] ** 0.5)
        grid = per_patch.reshape(len(per_patch), side, side, -1)
        shuffled = self.pixel_shuffle(grid, scale_factor=self.downsample_ratio)
        return shuffled.reshape(len(per_patch), -1, shuffled.shape[-1])

    def _tower_features(self, pixel_values: torch.Tensor, probes: set[methods.Probe]
                        ) -> tuple[torch.Tensor, list[dict[methods.Probe, torch.Tensor]]]:
        """Each tile's tokens as the projector receives them (tiles, tokens, D), and per tile
        the statistics of ``probes`` per token (none without probes)."""
        if not probes:
            return self._shuffled(self.vision_tower(pixel_values=pixel_values)[:, 1:]), [{}] * len(pixel_values)
        layers = self.vision_tower.encoder.layer
        middle = max(0, round(len(layers) * OBJECT_LAYER_SHARE) - 1)
        ops = {methods.LATE: layers[-1].attention.attn, methods.MIDDLE: layers[middle].attention.attn}
        probe = TowerProbe(ops, probes, has_cls=True, total_heads=self.config.vision_config.num_attention_heads)
        with probe:
            hidden = self.vision_tower(pixel_values=pixel_values)
        stats = []
        for tile in probe.results():
            # Statistics as channels through the shuffle, whose 4C channels are the 2 x 2
            # patches' C each: their mean is the token's.
            stats.append({p: self._shuffled(v[1:].reshape(1, len(v) - 1, -1).float())[0]
                          .unflatten(-1, (4, -1)).mean(-2).reshape(-1, *v.shape[1:]) for p, v in tile.items()})
        return self._shuffled(hidden[:, 1:]), stats

    def _pruned_embeddings(self, image_input, fields: dict[str, list[int]]) -> list[torch.Tensor]:
        """The K embeddings of each image: the rows its method keeps over all its tiles."""
        tiles_per_image = image_input["num_patches"].tolist()
        per_tile = self.num_image_token
        side = int(per_tile**0.5)
        probes = self._requested_probes(fields, [t * per_tile for t in tiles_per_image])
        features, stats = self._tower_features(image_input["pixel_values"], probes)
        stock = self.multi_modal_projector(features)  # every tile, as stock
        jobs = []
        for i, (first, tiles) in enumerate(zip(itertools.accumulate([0, *tiles_per_image]), tiles_per_image)):
            image = slice(first, first + tiles)
            jobs.append(self._candidates(
                fields, i, features[image].flatten(0, 1), grids=((side, side),) * tiles,
                stats={p: torch.cat([tile[p] for tile in stats[image]]) for p in probes},
                values=stock[image].flatten(0, 1), embed=self.multi_modal_projector))
        return [rows.values for rows in self._select(jobs)]

    def embed_multimodal(self, **kwargs: object):
        fields = self._pop_prune_fields(kwargs)
        out: list[torch.Tensor] = []
        for modality, mm_input in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "images" and fields is not None and mm_input["type"] == "pixel_values":
                tiles = mm_input["num_patches"].tolist()  # kept on the CPU by vLLM
                out += self._in_tower_chunks(self._pruned_embeddings, mm_input, fields,
                                             [t * self.num_image_token for t in tiles], {"pixel_values": tiles})
            else:  # videos and precomputed embeddings: never pruned
                out += self._process_vision_input(mm_input)
        return tuple(out)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(weights) | set(self._selector_weight_names())
