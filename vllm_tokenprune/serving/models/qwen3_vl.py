"""Qwen3-VL with visual-token pruning, its kept tokens at their true M-RoPE positions.

DeepStack does not stand in the way. Qwen3-VL's vision module returns, per merged
token, the main embedding (``out_hidden_size``) followed by one embedding per DeepStack
level taken from intermediate tower layers, all in one row; the language model adds the
DeepStack parts to its first layers' hidden states at the same image-token positions.
Keeping a row keeps all its channels, so a kept token brings its DeepStack features and
a dropped token takes them along: rows and DeepStack features stay aligned at any K.

The method scores the main embedding only (the merged token the language model
receives, what the placeholders count, and the feature dim the selector checkpoint's
``vision_signature`` records); the DeepStack channels are intermediate-layer copies of
the same tokens. Positions: see ``models/mrope.py``. One limit of Qwen3-VL: vLLM sizes
its rotary cache at ``max_position_embeddings`` positions (no headroom, unlike
Qwen2.5-VL's four times), and pruned prompts keep the positions of the unpruned one, so
the unpruned prompt, not only the pruned one, must fit in ``max_position_embeddings``.

Tower attention statistics: every block attends over the whole image; LATE is the last,
MIDDLE the one in the middle (HiPrune's object layer at half depth, as for Qwen2.5-VL).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.serving.models.mrope import MRopePruningModelMixin, MRopePruningProcessorMixin


class PrunedQwen3VLMultiModalProcessor(MRopePruningProcessorMixin, Qwen3VLMultiModalProcessor):
    """Qwen3-VL's processor, as stock, except that each image's placeholder run holds K of
    its N merged tokens: N from the image's grid (``MRopePruningProcessorMixin``), K from
    ``policy.keep_count`` in ``PruningProcessorMixin.apply``. Its K embeddings are chosen
    and placed in ``MRopePruningModelMixin.embed_multimodal``."""


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen3VLMultiModalProcessor,
    info=Qwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class PrunedQwen3VLForConditionalGeneration(MRopePruningModelMixin, Qwen3VLForConditionalGeneration):
    video_frames_apart = True  # each frame its own run after its timestamp, placed like an image

    def _selection_features(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds[:, : self.visual_dim]  # without the DeepStack channels
