"""Qwen3.5 with visual-token pruning, its kept tokens at their true M-RoPE positions.

Qwen3.5 is Qwen3-VL's vision side (the same tower, merger, processor and interleaved
M-RoPE, here without DeepStack) in front of a hybrid language model: Gated DeltaNet
(linear attention) layers with a full-attention layer every fourth. Pruning happens before
the language model, so the hybrid layers change nothing: fewer image tokens enter both kinds
of layer, the full-attention layers see them at their stock (t, h, w) positions
(``models/mrope.py``), and the linear-attention layers, which have no positions, see them in
stock order. The method scores the merged tokens (``out_hidden_size``), as for Qwen3-VL.

Qwen3.5-MoE differs only in the language model's feed-forward layers (routed experts), after
pruning; its pruned class is Qwen3.5's on vLLM's MoE class, with the MoE class's processing
info (its config class).
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeProcessingInfo,
    Qwen3_5ProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import Qwen3VLDummyInputsBuilder
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.serving.models.mrope import MRopePruningModelMixin
from vllm_tokenprune.serving.models.qwen3_vl import (
    PrunedQwen3VLForConditionalGeneration,
    PrunedQwen3VLMultiModalProcessor,
)


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen3VLMultiModalProcessor,  # Qwen3.5 serves Qwen3-VL's processor
    info=Qwen3_5ProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class PrunedQwen3_5ForConditionalGeneration(MRopePruningModelMixin, Qwen3_5ForConditionalGeneration):
    _selection_features = PrunedQwen3VLForConditionalGeneration._selection_features  # without DeepStack channels
    video_frames_apart = True  # Qwen3-VL's video layout


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen3VLMultiModalProcessor,
    info=Qwen3_5MoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class PrunedQwen3_5MoeForConditionalGeneration(PrunedQwen3_5ForConditionalGeneration,
                                               Qwen3_5MoeForConditionalGeneration):
    """Qwen3.5's pruning on the MoE model (its __init__ builds the MoE language model)."""
