"""Model Runner V2 (vLLM's default runner on GPU) for the pruned M-RoPE models.

V2 rewrites M-RoPE positions after the encoder through its ``MultiModalPruner``: for each
request whose prefill window holds media embeddings, it calls the model's
``recompute_mrope_positions`` and writes the result into its position buffers (the same
contract as the V1 runner's, step 3 of ``models/mrope.py``). Its ``DefaultModelState``
creates that pruner only for EVS video pruning. V2 lets a model bring its own model state
(``get_model_state_cls``, read first by ``resolve_model_state_cls``); the pruned M-RoPE
models return the state V2 would give them, with the pruner always on:
``PrunedMRopeModelState`` (the default state), or for hybrid language models (Qwen3.5's
Gated DeltaNet layers) ``PrunedMRopeHybridModelState`` (V2's Mamba-hybrid state).

The model's ``is_multimodal_pruning_enabled`` is set here: it makes the model append the
position columns the pruner strips. (Encoder CUDA graphs, whose replay would bypass
``embed_multimodal`` and so pruning, the models never offer:
``common.NoEncoderCudaGraphsMixin``.)

This module imports V2's internals; only V2 imports it (V1 never calls the hook).
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.worker.gpu.model_states.default import DefaultModelState
from vllm.v1.worker.gpu.model_states.mamba_hybrid import MambaHybridModelState
from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

logger = init_logger(__name__)


class _PrunerAlwaysOn:
    """Mix into a V2 model state (before it in the MRO)."""

    def __init__(self, vllm_config, model, encoder_cache, device):
        model.is_multimodal_pruning_enabled = True
        super().__init__(vllm_config, model, encoder_cache, device)
        if self.rope_state is None or encoder_cache is None:
            raise ValueError(
                f"{type(model).__name__}: Model Runner V2 built no M-RoPE state or encoder cache "
                "for this rank, so pruned image tokens would keep provisional positions")
        if self.mm_pruner is None:
            self.mm_pruner = MultiModalPruner(model, self.rope_state, encoder_cache, self.inputs_embeds_size)
        logger.info("tokenprune: Model Runner V2 recomputes the M-RoPE positions of pruned images "
                    "(%s)", type(self).__name__)


class PrunedMRopeModelState(_PrunerAlwaysOn, DefaultModelState):
    """V2's default model state, with the pruner on."""


class PrunedMRopeHybridModelState(_PrunerAlwaysOn, MambaHybridModelState):
    """V2's model state of hybrid attention / linear-attention models, with the pruner on."""
