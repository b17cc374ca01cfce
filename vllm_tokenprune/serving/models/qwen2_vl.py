"""Qwen2-VL with visual-token pruning, its kept tokens at their true M-RoPE positions.

Qwen2-VL lays images out as Qwen2.5-VL does (merged 2 x 2 patches, one placeholder each,
M-RoPE (t, h, w) positions), so everything is ``models/mrope.py``'s. What differs is
inside the tower: every block attends over the whole image (no windows), so the tower
runs its tokens in stock order and the attention statistics come from the last block
(LATE) and the one at half depth (MIDDLE), as for Qwen3-VL. The merger's output width is
the vision config's ``hidden_size`` (Qwen2.5-VL's ``out_hidden_size``).
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.serving.models.mrope import MRopePruningModelMixin, MRopePruningProcessorMixin


class PrunedQwen2VLMultiModalProcessor(MRopePruningProcessorMixin, Qwen2VLMultiModalProcessor):
    """Qwen2-VL's processor, as stock, except that each image's placeholder run holds K of
    its N merged tokens: N from the image's grid (``MRopePruningProcessorMixin``), K from
    ``policy.keep_count`` in ``PruningProcessorMixin.apply``."""


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2VLMultiModalProcessor,
    info=Qwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class PrunedQwen2VLForConditionalGeneration(MRopePruningModelMixin, Qwen2VLForConditionalGeneration):
    """Stock Qwen2-VL with the embeddings and positions of ``MRopePruningModelMixin``."""
