"""Gemma 3 with visual-token pruning.

Gemma 3's SigLIP tower sees each crop at one size; its projector average-pools the patch
grid k x k (64 x 64 patches into 16 x 16 = 256 tokens on the real model), normalizes and
projects. The placeholders count pooled tokens, so those are the candidates:

* The method scores a pooled token by its pooled tower features (the projector's pooling
  without its norm and projection, what the selector is trained on); attention statistics
  are the mean over the pooled patches. A kept row carries the stock embedding, so a kept
  token is exactly the stock one and merging methods average stock embeddings.
* Each image's prompt is ``\\n\\n<start_of_image>`` + one placeholder per token +
  ``<end_of_image>\\n\\n``; those markers stay, only the placeholders are cut to K.
* Pan-and-scan (off unless the server turns ``do_pan_and_scan`` on) adds crops, each with
  its own markers and text between them ("Here is the original image ... and here are some
  crops ..."). The processor fixes each crop's run before the model sees a pixel, so K is
  split over the crops in proportion to their tokens (``policy.split_keep``; docs/methods.md
  says why not one K over all of them), and the method keeps each crop's share of it.

On vLLM 0.32's CPU build the language model attends causally over image tokens (its CPU
attention has no bidirectional image ranges, unlike transformers' and vLLM's GPU attention):
stock and pruned models alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from vllm.model_executor.models.gemma3_mm import (
    Gemma3DummyInputsBuilder,
    Gemma3ForConditionalGeneration,
    Gemma3MultiModalProcessor,
    Gemma3ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.policy import split_keep
from vllm_tokenprune.serving.models.common import KEEP_FIELD, PROBE_KEEP_FIELD
from vllm_tokenprune.serving.models.llava import LlavaTowerMixin
from vllm_tokenprune.serving.models.model import NoEncoderCudaGraphsMixin, PruningModelMixin
from vllm_tokenprune.serving.models.processor import HFProcessorTokensMixin


class PrunedGemma3MultiModalProcessor(HFProcessorTokensMixin, Gemma3MultiModalProcessor):
    """Gemma 3's processor, each image's placeholders cut to its K, markers and crop text kept."""


@MULTIMODAL_REGISTRY.register_processor(
    PrunedGemma3MultiModalProcessor,
    info=Gemma3ProcessingInfo,
    dummy_inputs=Gemma3DummyInputsBuilder,
)
class PrunedGemma3ForConditionalGeneration(LlavaTowerMixin, NoEncoderCudaGraphsMixin, PruningModelMixin,
                                           Gemma3ForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning(vllm_config, next(self.vision_tower.parameters()).device)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Per-patch channels (crops, patches, C) -> per token (crops, tokens, C), pooled as
        the projector pools the tower's output."""
        side = self.multi_modal_projector.patches_per_image
        grid = x.transpose(1, 2).reshape(len(x), x.shape[2], side, side)
        return self.multi_modal_projector.avg_pool(grid).flatten(2).transpose(1, 2)

    def _embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features -> language-model embeddings: the rest of the projector."""
        projector = self.multi_modal_projector
        return (projector.mm_soft_emb_norm(pooled) @ projector.mm_input_projection_weight).type_as(pooled)

    def _tower_counts(self, image_input) -> tuple[list[int], dict[str, list[int]]]:
        crops = image_input["num_patches"].tolist()  # kept on the CPU by vLLM
        return [c * self.config.mm_tokens_per_image for c in crops], {"pixel_values": crops}

    def _pruned_embeddings(self, image_input, fields: dict[str, list[int]]) -> list[torch.Tensor]:
        """The K embeddings of each image: each crop's share of K (module docstring), chosen
        by the image's method among the crop's pooled tokens, in stock order."""
        pixel_values = image_input["pixel_values"]
        crops_per_image = image_input["num_patches"].tolist()
        per_crop = self.config.mm_tokens_per_image
        side = self.multi_modal_projector.tokens_per_side
        probes = self._requested_probes(fields, [c * per_crop for c in crops_per_image])
        features, stats = self._tower_features(pixel_values, probes)
        stock = self.multi_modal_projector(features)  # every crop, as stock
        pooled = self._pooled(features)
        jobs, image_of = [], []
        for i, (first, crops) in enumerate(zip(itertools.accumulate([0, *crops_per_image]), crops_per_image)):
            shares = (split_keep(fields[field][i], [per_crop] * crops) for field in (KEEP_FIELD, PROBE_KEEP_FIELD))
            for crop, k, probe_keep in zip(range(first, first + crops), *shares):
                if k == 0:  # a crop whose share rounds to nothing keeps only its markers
                    continue
                crop_stats = {p: self._pooled(v.reshape(1, len(v), -1).float())[0].reshape(-1, *v.shape[1:])
                              for p, v in stats[crop].items()}
                jobs.append(self._candidates(fields, i, pooled[crop], k=k, probe_keep=probe_keep, grids=((side, side),),
                                             stats=crop_stats, values=stock[crop], embed=self._embed))
                image_of.append(i)
        rows: list[list[torch.Tensor]] = [[] for _ in crops_per_image]
        for i, kept in zip(image_of, self._select(jobs)):
            rows[i].append(kept.values)
        return [torch.cat(r) for r in rows]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(weights) | set(self._selector_weight_names())
