"""The model families pruning serves: one row each, the one table every other part reads.

A row names, for its family:

- serving: the stock architecture checkpoints name and the module of its pruned class
  (``serving/models/<module>.py``), which the plugin registers and ``vllm-tokenprune serve``
  selects;
- training: how ``training/features.py`` reads the tower's features (``features``, a key of
  its ``READERS``) and whether ``train-query`` can learn from the model's attention;
- the testbed: the builder of its tiny checkpoint (``testbed/tiny/<module>.py``), which
  ``make-tiny --arch NAME`` runs.

Nothing here imports what it names: rows hold names, each part resolves its own, and
``tests/test_families.py`` resolves every name of every row.
"""

from __future__ import annotations

from dataclasses import dataclass

_MODELS = "vllm_tokenprune.serving.models"
_TINY = "vllm_tokenprune.testbed.tiny"


@dataclass(frozen=True)
class Family:
    name: str  # make-tiny --arch
    model_type: str  # the checkpoint config's model_type
    stock: str  # the architecture checkpoints name
    module: str  # serving/models/<module>.py holds the pruned class
    # how training reads the tower (a key of training.features.READERS): "llava" (a feature
    # layer), "gemma3" (pooled), "gemma4" (the pooler's soft tokens), "internvl" (pixel-shuffled)
    # or "qwen" (the merger)
    features: str
    tiny: str  # "module:NAME" under testbed/tiny: the tiny checkpoint's builder
    # train-query reads the teacher's attention at the image's placeholders, so they must hold
    # the candidate tokens one to one (not so where newline markers or tiles sit among them)
    query_teacher: bool = False
    mrope: bool = False  # 3-D M-RoPE positions (serving/models/mrope.py)
    videos: bool = False  # its videos are pruned too (video_keep_ratio); else served whole

    @property
    def pruned(self) -> str:
        """The pruned architecture, selected with --hf-overrides '{"architectures": [...]}'."""
        return "Pruned" + self.stock

    @property
    def target(self) -> str:
        """``"module:Class"``, so that vLLM imports the module only when it loads the model."""
        return f"{_MODELS}.{self.module}:{self.pruned}"

    @property
    def tiny_builder(self) -> str:
        """``"module:NAME"`` of the tiny checkpoint's builder (a ``testbed.tiny.parts.Arch``)."""
        return f"{_TINY}.{self.tiny}"


FAMILIES: tuple[Family, ...] = (
    Family("llava", "llava", "LlavaForConditionalGeneration", "llava", "llava", "llava:LLAVA",
           query_teacher=True),
    Family("llava-next", "llava_next", "LlavaNextForConditionalGeneration", "llava_next", "llava",
           "llava:LLAVA_NEXT"),
    Family("llava-onevision", "llava_onevision", "LlavaOnevisionForConditionalGeneration", "llava_onevision",
           "llava", "llava:LLAVA_ONEVISION", videos=True),
    Family("qwen2-vl", "qwen2_vl", "Qwen2VLForConditionalGeneration", "qwen2_vl", "qwen", "qwen:QWEN2_VL",
           query_teacher=True, mrope=True, videos=True),
    Family("qwen2.5-vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", "qwen",
           "qwen:QWEN2_5_VL", query_teacher=True, mrope=True, videos=True),
    Family("qwen3-vl", "qwen3_vl", "Qwen3VLForConditionalGeneration", "qwen3_vl", "qwen", "qwen:QWEN3_VL",
           query_teacher=True, mrope=True, videos=True),
    Family("qwen3.5", "qwen3_5", "Qwen3_5ForConditionalGeneration", "qwen3_5", "qwen", "qwen:QWEN3_5",
           query_teacher=True, mrope=True, videos=True),
    Family("qwen3.5-moe", "qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "qwen3_5", "qwen",
           "qwen:QWEN3_5_MOE", query_teacher=True, mrope=True, videos=True),
    Family("gemma3", "gemma3", "Gemma3ForConditionalGeneration", "gemma3", "gemma3", "gemma:GEMMA3"),
    Family("internvl", "internvl", "InternVLForConditionalGeneration", "internvl", "internvl",
           "internvl:INTERNVL"),
    Family("gemma4", "gemma4", "Gemma4ForConditionalGeneration", "gemma4", "gemma4", "gemma:GEMMA4"),
)


def serving_videos() -> str:
    """The families whose videos are pruned, for the errors that refuse a video ratio elsewhere."""
    return ", ".join(f.name for f in FAMILIES if f.videos)


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
