"""LLaVA-1.5 with visual-token pruning.

The selector scores the tower features the projector would receive (the
``vision_feature_layer`` output, CLS dropped under the "default" strategy), as in the
paper; the kept K rows, in original order, go through the projector into the K
placeholders the processor reserved.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageSize

from vllm_tokenprune.models.common import PruningModelMixin, PruningProcessorMixin


class PrunedLlavaMultiModalProcessor(PruningProcessorMixin, LlavaMultiModalProcessor):
    def _unpruned_tokens(self, image_size: ImageSize) -> int:
        return self.info.get_num_image_tokens(
            image_width=image_size.width, image_height=image_size.height
        )

    def _image_pixels(self, processed, index: int) -> torch.Tensor:
        return processed["pixel_values"][index]


@MULTIMODAL_REGISTRY.register_processor(
    PrunedLlavaMultiModalProcessor,
    info=LlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class PrunedLlavaForConditionalGeneration(PruningModelMixin, LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        tower_device = next(self.vision_tower.parameters()).device
        self._init_pruning(vllm_config, tower_device)

    def embed_multimodal(self, **kwargs: object):
        fields = self._pop_prune_fields(kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if fields is None or image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)
        features = self._process_image_pixels(image_input)  # (B, N, D)
        kept = self._prune(features, fields)
        embeds = self.multi_modal_projector(torch.cat(kept))
        return torch.split(embeds, [len(k) for k in kept])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(weights) | set(self._selector_weight_names())
