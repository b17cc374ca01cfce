"""LLaVA-1.5 with visual-token pruning.

Methods see the tower features the projector would receive (the ``vision_feature_layer``
output, CLS dropped under the "default" strategy), as in the paper, laid out as the
tower's square patch grid; the K rows a method returns, in stock order, go through the
projector into the K placeholders the processor reserved.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from transformers import CLIPVisionConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.vision import (
    _get_vision_feature_selector,
    get_num_selected_vision_tokens,
    get_vision_encoder_info,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageSize

from vllm_tokenprune.selection import methods
from vllm_tokenprune.selection.methods.attention import TowerProbe
from vllm_tokenprune.serving.models.model import PruningModelMixin
from vllm_tokenprune.serving.models.processor import PruningProcessorMixin

# HiPrune's object layer: the 9th of CLIP-L's 24 layers, the paper's default (arXiv 2508.00553).
OBJECT_LAYER_SHARE = 9 / 24


class LlavaPruningProcessorMixin(PruningProcessorMixin):
    """N of the LLaVA families: the stock placeholder count of an image of its size (anyres
    crops and newline markers included), which their processors take no kwargs to change."""

    def _unpruned_tokens(self, image_size: ImageSize, hf_kwargs: Mapping[str, object]) -> int:
        return self.info.get_num_image_tokens(
            image_width=image_size.width, image_height=image_size.height
        )


class PrunedLlavaMultiModalProcessor(LlavaPruningProcessorMixin, LlavaMultiModalProcessor):
    """LLaVA-1.5's processor, each image's placeholder run cut to its K."""


class LlavaTowerMixin:
    """The CLIP / SigLIP tower of the LLaVA families: its tokens per crop, their grid, its
    features with the attention statistics a batch's methods need, and ``embed_multimodal``
    (stock for precomputed embeddings, else the family's ``_pruned_embeddings``)."""

    def _crop_tokens(self) -> tuple[int, tuple[tuple[int, int], ...]]:
        """Candidate tokens per crop and their grids: the patch grid, after a 1 x 1 grid
        for the [CLS] token when the feature strategy keeps it."""
        info = get_vision_encoder_info(self.config)
        side = info.get_patch_grid_length()
        tokens = get_num_selected_vision_tokens(
            info.get_num_image_tokens(image_width=0, image_height=0),
            self.config.vision_feature_select_strategy)
        return tokens, ((side, side),) if tokens == side * side else ((1, 1), (side, side))

    def _tower_features(self, pixel_values: torch.Tensor, probes: set[methods.Probe]
                        ) -> tuple[torch.Tensor, list[dict[methods.Probe, torch.Tensor]]]:
        """Features (crops, tokens, D) of a batch of crops, and per crop the statistics of
        ``probes`` at the same tokens (none without probes)."""
        if not probes:
            return self._image_pixels_to_features(self.vision_tower, pixel_values), [{}] * len(pixel_values)
        # vLLM builds the tower only up to vision_feature_layer: its last layer is LATE.
        layers = self.vision_tower.vision_model.encoder.layers
        depth = self.config.vision_config.num_hidden_layers
        middle = min(len(layers) - 1, max(0, round(depth * OBJECT_LAYER_SHARE) - 1))
        ops = {methods.LATE: layers[-1].self_attn.attn, methods.MIDDLE: layers[middle].self_attn.attn}
        probe = TowerProbe(ops, probes, has_cls=isinstance(self.config.vision_config, CLIPVisionConfig),
                           total_heads=self.config.vision_config.num_attention_heads)
        with probe:
            features = self._image_pixels_to_features(self.vision_tower, pixel_values)
        # The feature strategy drops the [CLS] token from the features: from the stats too
        # (Gemma 3, which uses this tower too, has no strategy: it keeps every token).
        select = _get_vision_feature_selector(getattr(self.config, "vision_feature_select_strategy", "full"))

        def at_features(v: torch.Tensor) -> torch.Tensor:  # (S,) or (S, d), as select wants
            return select(v.reshape(1, len(v), -1))[0].reshape(-1, *v.shape[1:])

        return features, [{p: at_features(v) for p, v in crop.items()} for crop in probe.results()]

    def embed_multimodal(self, **kwargs: object):
        fields = self._pop_prune_fields(kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if fields is None or image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)  # precomputed embeddings: never pruned
        return self._in_tower_chunks(self._pruned_embeddings, image_input, fields, *self._tower_counts(image_input))

    def _tower_counts(self, image_input) -> tuple[list[int], dict[str, list[int]] | None]:
        """Each image's tower tokens (its crops' tokens), and the inputs packed flat with each
        image's rows in them (``PruningModelMixin._in_tower_chunks``): none, as pixel_values
        holds one crop (LLaVA-1.5) or one stack of crops (the anyres families) per image."""
        pixels = image_input["pixel_values"]
        one_each = isinstance(pixels, torch.Tensor) and pixels.dim() == 4
        crops = [1] * len(pixels) if one_each else [len(p) for p in pixels]
        return [c * self._crop_tokens()[0] for c in crops], None


@MULTIMODAL_REGISTRY.register_processor(
    PrunedLlavaMultiModalProcessor,
    info=LlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class PrunedLlavaForConditionalGeneration(LlavaTowerMixin, PruningModelMixin,
                                          LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        tower_device = next(self.vision_tower.parameters()).device
        self._init_pruning(vllm_config, tower_device)

    def _pruned_embeddings(self, image_input, fields: dict[str, list[int]]):
        """The K embeddings of each image: the projector over the rows its method keeps."""
        pixel_values = image_input["pixel_values"]
        tokens, grids = self._crop_tokens()
        probes = self._requested_probes(fields, [tokens] * len(pixel_values))
        features, stats = self._tower_features(pixel_values, probes)  # (B, N, D)
        kept = [rows.values for rows in self._select([
            self._candidates(fields, i, feats, grids=grids, stats=stats[i], embed=self.multi_modal_projector)
            for i, feats in enumerate(features)])]
        embeds = self.multi_modal_projector(torch.cat(kept))
        return torch.split(embeds, [len(k) for k in kept])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(weights) | set(self._selector_weight_names())
