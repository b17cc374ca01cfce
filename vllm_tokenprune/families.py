"""The model families pruning serves: the one table every other reads.

The plugin registers each family's pruned class, ``vllm-tokenprune serve`` maps a
checkpoint's architecture to it, training picks the tower and how to read its features,
and ``make-tiny --arch NAME`` builds a small checkpoint of it (``testbed/tiny.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # make-tiny --arch
    model_type: str  # the checkpoint config's model_type
    stock: str  # the architecture checkpoints name
    module: str  # the module holding the pruned class
    # how training reads the tower: "llava" (a feature layer), "gemma3" (pooled), "gemma4" (the
    # pooler's soft tokens), "internvl" (pixel-shuffled) or "qwen" (the merger)
    features: str

    @property
    def pruned(self) -> str:
        """The pruned architecture, selected with --hf-overrides '{"architectures": [...]}'."""
        return "Pruned" + self.stock

    @property
    def target(self) -> str:
        """``"module:Class"``, so that vLLM imports the module only when it loads the model."""
        return f"{self.module}:{self.pruned}"


_MODELS = "vllm_tokenprune.serving.models"
FAMILIES: tuple[Family, ...] = (
    Family("llava", "llava", "LlavaForConditionalGeneration", f"{_MODELS}.llava", "llava"),
    Family("llava-next", "llava_next", "LlavaNextForConditionalGeneration", f"{_MODELS}.llava_next", "llava"),
    Family("llava-onevision", "llava_onevision", "LlavaOnevisionForConditionalGeneration",
           f"{_MODELS}.llava_onevision", "llava"),
    Family("qwen2-vl", "qwen2_vl", "Qwen2VLForConditionalGeneration", f"{_MODELS}.qwen2_vl", "qwen"),
    Family("qwen2.5-vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", f"{_MODELS}.qwen2_5_vl", "qwen"),
    Family("qwen3-vl", "qwen3_vl", "Qwen3VLForConditionalGeneration", f"{_MODELS}.qwen3_vl", "qwen"),
    Family("qwen3.5", "qwen3_5", "Qwen3_5ForConditionalGeneration", f"{_MODELS}.qwen3_5", "qwen"),
    Family("qwen3.5-moe", "qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", f"{_MODELS}.qwen3_5", "qwen"),
    Family("gemma3", "gemma3", "Gemma3ForConditionalGeneration", f"{_MODELS}.gemma3", "gemma3"),
    Family("internvl", "internvl", "InternVLForConditionalGeneration", f"{_MODELS}.internvl", "internvl"),
    Family("gemma4", "gemma4", "Gemma4ForConditionalGeneration", f"{_MODELS}.gemma4", "gemma4"),
)


def by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; choose one of {', '.join(f.name for f in FAMILIES)}")


def of_architectures(architectures) -> Family | None:
    """The family of a checkpoint, from its config's ``architectures``."""
    return next((f for f in FAMILIES if f.stock in (architectures or ())), None)


def of_model_type(model_type: str) -> Family:
    for family in FAMILIES:
        if family.model_type == model_type:
            return family
    raise ValueError(f"model type {model_type!r} is not one pruning serves; it serves "
                     f"{', '.join(f.model_type for f in FAMILIES)}")
