"""Every private vLLM name this project relies on, and where: what a vLLM upgrade may move.

vLLM's documented extension points (the plugin entry point, the model and processor
registries, ``--middleware``, ``--hf-overrides``) carry the project; what they do not reach
goes through the names below, which vLLM does not promise to keep. Each entry is (vLLM
module, name in it, how we use it, our module that does). ``tests/test_vllm_private.py``
resolves every one in the installed vLLM, so an upgrade that renames or moves one fails
there, by name, and checks that the package uses no private vLLM name this list lacks.

This module names them as strings and imports nothing.
"""

from __future__ import annotations

IMPORT, OVERRIDE, CALL, PATCH = "import", "override", "call", "patch"

_PROCESSOR = "vllm.multimodal.processing.processor"
_QWEN = ("vllm.model_executor.models.qwen2_vl", "Qwen2VLForConditionalGeneration"), (
    "vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"), (
    "vllm.model_executor.models.qwen3_vl", "Qwen3VLForConditionalGeneration")
_LLAVA = ("vllm.model_executor.models.llava", "LlavaForConditionalGeneration"), (
    "vllm.model_executor.models.llava_next", "LlavaNextForConditionalGeneration"), (
    "vllm.model_executor.models.gemma3_mm", "Gemma3ForConditionalGeneration")
_ONEVISION = "vllm.model_executor.models.llava_onevision", "LlavaOnevisionForConditionalGeneration"
_GEMMA4 = "vllm.model_executor.models.gemma4_mm"
_INTERNS1 = "vllm.model_executor.models.interns1", "InternS1ForConditionalGeneration"

PRIVATE: tuple[tuple[str, str, str, str], ...] = (
    # private names imported
    ("vllm.model_executor.models.vision", "_get_vision_feature_selector", IMPORT, "serving/models/llava.py"),
    (_GEMMA4, "_get_max_soft_tokens", IMPORT, "serving/models/gemma4.py"),
    (_GEMMA4, "_SUPPORTED_SOFT_TOKENS", IMPORT, "serving/models/gemma4.py"),
    # the multimodal processor's hooks every pruned processor overrides (calling super())
    *((_PROCESSOR, f"BaseMultiModalProcessor.{hook}", OVERRIDE, "serving/models/processor.py")
      for hook in ("_apply_hf_processor_main", "_get_mm_fields_config", "_get_prompt_updates", "_get_mm_hashes",
                   "_get_cache_missing_items")),
    # the stock models' steps the pruned ones call around selection
    *((module, f"{cls}.{method}", CALL, "serving/models/llava.py") for module, cls in _LLAVA
      for method in ("_parse_and_validate_image_input", "_image_pixels_to_features", "_process_image_input")),
    (_ONEVISION[0], f"{_ONEVISION[1]}._image_pixels_to_features", CALL, "serving/models/llava.py"),
    *((_ONEVISION[0], f"{_ONEVISION[1]}.{method}", CALL, "serving/models/llava_onevision.py")
      for method in ("_parse_and_validate_multimodal_inputs", "_process_image_input", "_process_video_pixels",
                     "_merge_image_patch_embeddings")),
    ("vllm.model_executor.models.llava_next", "LlavaNextForConditionalGeneration._merge_image_patch_embeddings",
     CALL, "serving/models/llava_next.py"),
    *((module, f"{cls}.{method}", CALL, "serving/models/mrope.py") for module, cls in _QWEN
      for method in ("_parse_and_validate_multimodal_inputs", "_process_image_input", "_process_video_input")),
    *((_GEMMA4, f"Gemma4ForConditionalGeneration.{method}", CALL, "serving/models/gemma4.py")
      for method in ("_parse_and_validate_multimodal_inputs", "_process_image_input", "_process_video_input",
                     "_process_audio_input")),
    (_GEMMA4, "Gemma4ProcessingInfo._compute_num_soft_tokens", CALL, "serving/models/gemma4.py"),
    *((_INTERNS1[0], f"{_INTERNS1[1]}.{method}", CALL, "serving/models/internvl.py")
      for method in ("_parse_and_validate_multimodal_inputs", "_process_vision_input")),
    # the runners' load_model, wrapped once by the plugin (``plugin.py`` says why)
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.load_model", PATCH, "serving/plugin.py"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model", PATCH, "serving/plugin.py"),
)
