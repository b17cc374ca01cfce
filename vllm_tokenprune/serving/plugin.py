"""vLLM plugin entry point (group ``vllm.general_plugins``).

vLLM calls ``register()`` once in every process it starts (API server, engine core,
workers, the model-inspection subprocess), so it must be cheap and safe to call again.
Each family of ``families.FAMILIES`` is registered by its ``"module:Class"`` string: vLLM
imports a module only when a model with that architecture is loaded, and importing this
package never imports vLLM. A pruned architecture is selected with
--hf-overrides '{"architectures": ["<pruned>"]}' (``vllm-tokenprune serve`` does).
"""

from __future__ import annotations

import functools
import logging

from vllm_tokenprune.families import FAMILIES

logger = logging.getLogger(__name__)

def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for family in FAMILIES:
        if family.pruned not in supported:
            ModelRegistry.register_model(family.pruned, family.target)
    _let_runner_recompute_mrope()
    _let_vllm_refuse_huge_images()


def _let_vllm_refuse_huge_images() -> None:
    """Make vLLM's own image-size limit answer first, with a 400.

    vLLM refuses an image over ``VLLM_MAX_IMAGE_PIXELS`` with a ValueError (a 400) after
    ``PIL.Image.open``; but PIL's decompression-bomb guard raises inside ``open`` for
    anything over twice its own ``MAX_IMAGE_PIXELS``, an error vLLM answers with a 500.
    With PIL's threshold at vLLM's limit, every oversized image meets vLLM's check first,
    and PIL still guards at twice that. A limit of 0 (vLLM's check off) leaves PIL as is.
    """
    from PIL import Image
    from vllm import envs

    if envs.VLLM_MAX_IMAGE_PIXELS > 0:
        Image.MAX_IMAGE_PIXELS = envs.VLLM_MAX_IMAGE_PIXELS


# Marks a wrapped load_model, so that register() patches each runner class once.
_PATCHED = "_tokenprune_recomputes_mrope"
# Class attribute of the models whose runner must recompute M-RoPE positions (the pruned
# Qwen classes, ``models/mrope.py``); read by name so the plugin imports no model code.
PRUNES_MROPE_IMAGES = "tokenprune_prunes_mrope_images"


def _v1_runners():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner, CPUModelRunner


def v1_runners_recompute_mrope() -> bool:
    """Whether ``_let_runner_recompute_mrope`` patched both V1 runners."""
    try:
        return all(getattr(r.__dict__.get("load_model"), _PATCHED, False) for r in _v1_runners())
    except ImportError:
        return False


def _runs_vllms_video_pruning(model_config, model) -> bool:
    """vLLM's own EVS is on for this stock model (``--video-pruning-rate``): the GPU runner
    then sets its flag itself; the CPU runner never does, and without the recompute, which
    strips the position columns EVS appends, its first pruned video ends the engine."""
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    mm_config = model_config.multimodal_config
    return bool(supports_multimodal_pruning(model) and mm_config is not None
                and mm_config.is_multimodal_pruning_enabled())


def _let_runner_recompute_mrope() -> None:
    """The one patch of vLLM internals: turn on the V1 runners' M-RoPE position recompute
    for our M-RoPE models (``models/mrope.py`` explains what it computes).

    vLLM rewrites positions after the encoder (``model.recompute_mrope_positions``) only
    when the runner's ``is_multimodal_pruning_enabled`` is set, which
    ``GPUModelRunner.load_model`` does only for EVS video pruning (``video_pruning_rate >
    0``) and ``CPUModelRunner.load_model`` never does. The flag lives on the runner, which
    the model cannot reach, and no config option sets it without also turning on EVS, so
    this wraps ``load_model``: when the loaded model is one of ours, it sets the flag on
    the runner and on the model together (the model appends position columns exactly when
    the runner strips them). A stock model under vLLM's own EVS gets the flag as the GPU
    runner would give it (``_runs_vllms_video_pruning``: on the CPU runner EVS crashes
    without it); any other model loads untouched. Model Runner V2 needs no patch: there the
    models bring their own model state (``models/runner_v2.py``).
    """
    try:
        runners = _v1_runners()
    except ImportError as exc:
        logger.warning("tokenprune: vLLM's V1 runners moved (%s); pruned M-RoPE models will "
                       "refuse to start on them", exc)
        return
    for runner in runners:
        original = runner.__dict__.get("load_model")
        if original is None or getattr(original, _PATCHED, False):
            if original is None:
                logger.warning("tokenprune: %s.load_model moved; not patched", runner.__name__)
            continue

        @functools.wraps(original)
        def load_model(self, *args, _original=original, **kwargs):
            _original(self, *args, **kwargs)
            model = self.get_model()
            if getattr(model, PRUNES_MROPE_IMAGES, False):
                self.is_multimodal_pruning_enabled = model.is_multimodal_pruning_enabled = True
            elif _runs_vllms_video_pruning(self.model_config, model):
                self.is_multimodal_pruning_enabled = True  # the GPU runner's own rule, for the CPU runner

        setattr(load_model, _PATCHED, True)
        runner.load_model = load_model
