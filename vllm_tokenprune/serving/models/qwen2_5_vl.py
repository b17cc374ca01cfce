"""Qwen2.5-VL with visual-token pruning, its kept tokens at their true M-RoPE positions.

The method sees the merged tokens (the vision module's output after the patch merger,
``out_hidden_size`` wide): those are what the language model receives and what the
placeholders count. How positions stay exact is explained in ``models/mrope.py``.

Tower attention statistics come from full-attention blocks only (the others attend within
windows of 4 x 4 merged tokens): the last one (LATE), and the one nearest the middle of
the tower (MIDDLE; HiPrune's object layer, the 16th of Qwen2.5-VL's 32 blocks).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.selection import methods
from vllm_tokenprune.serving.models.mrope import MRopePruningModelMixin, MRopePruningProcessorMixin


class PrunedQwen2_5_VLMultiModalProcessor(MRopePruningProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor, as stock, except that each image's placeholder run holds K of
    its N merged tokens: N from the image's grid (``MRopePruningProcessorMixin``), K from
    ``policy.keep_count`` in ``PruningProcessorMixin.apply``. Its K embeddings are chosen
    and placed in ``MRopePruningModelMixin.embed_multimodal``."""


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class PrunedQwen2_5_VLForConditionalGeneration(
    MRopePruningModelMixin, Qwen2_5_VLForConditionalGeneration
):
    def _probe_blocks(self) -> dict[str, int]:
        full = self.config.vision_config.fullatt_block_indexes
        middle = len(self.visual.blocks) // 2 - 1
        return {methods.LATE: full[-1], methods.MIDDLE: min(full, key=lambda b: (abs(b - middle), b))}

    def _tower_order(self, grid: list[int]) -> torch.Tensor:
        return self.visual.get_window_index_thw(*grid)[0]
