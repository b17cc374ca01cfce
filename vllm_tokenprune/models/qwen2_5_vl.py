"""Qwen2.5-VL with visual-token pruning, its kept tokens at their true M-RoPE positions.

The method scores the merged tokens (the vision module's output after the patch merger,
``out_hidden_size`` wide): those are what the language model receives and what the
placeholders count. How positions stay exact is explained in ``models/mrope.py``.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.models.mrope import MRopePruningModelMixin, MRopePruningProcessorMixin


class PrunedQwen2_5_VLMultiModalProcessor(MRopePruningProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class PrunedQwen2_5_VLForConditionalGeneration(
    MRopePruningModelMixin, Qwen2_5_VLForConditionalGeneration
):
    pass
