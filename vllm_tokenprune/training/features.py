"""Vision features exactly as a VLM feeds them to its projector, extracted with transformers.

Only the vision tower is built and only its weights are read from the checkpoint (a
7B VLM's language model is never loaded). What is extracted, per family:

- LLaVA-1.5 (``llava``): ``vision_tower(pixel_values, output_hidden_states=True)
  .hidden_states[vision_feature_layer]``, CLS dropped when the strategy is "default";
  a list of layers is concatenated along D (as transformers' and vLLM's LLaVA do). vLLM
  builds the tower with ``require_post_norm=False``, so these are the served features.
- LLaVA-NeXT: the same, on the base-resolution view of each image (the first of the
  processor's patches) only. The served model also scores the high-resolution
  crops with the same tower; the base view is enough to train a selector.
- Gemma 3 (``gemma3``): the SigLIP tower's last hidden state (post-norm, as served),
  average-pooled to the projector's token grid, as ``serving/models/gemma3.py`` scores it
  (the projector's pooling without its norm and projection).
- Gemma 4 (``gemma4``): the tower's soft tokens (its pooler's k x k averages, padding stripped),
  each image at its own aspect as the processor resizes it, as ``serving/models/gemma4.py``
  scores them (before the embedder's norm and projection).
- InternVL (``internvl``): the tower's last hidden state without [CLS], pixel-shuffled (2 x 2
  patches per token), as the projector receives it, on the whole image as one tile (no
  tiles: like LLaVA-NeXT's base view, enough to train a selector for every tile).
- Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and Qwen3.5-MoE: the visual module's output after the patch merger (the merged
  tokens the selector scores at serve time; Qwen3-VL's main embedding, without DeepStack,
  as ``serving/models/qwen3_vl.py`` scores it). Each image keeps its own size and aspect
  as the checkpoint's image processor resizes it (``smart_resize`` within min_pixels and
  max_pixels, overridable as the server's ``--mm-processor-kwargs``), so N varies per image.

Features come as ``ragged.RaggedFeatures``: every image's tokens and its token grid.

``training.store`` writes these features to disk in shards, keyed by the model and image
files, so that training streams them and a second run skips the tower.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from tqdm.auto import tqdm

from vllm_tokenprune.families import of_model_type
from vllm_tokenprune.selection.selector import vision_signature
from vllm_tokenprune.training.ragged import RaggedFeatures
from vllm_tokenprune.training.stream import ahead

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Bump when what the tower's features are, or how they are stored, changes, to invalidate stored ones.
FEATURES_VERSION = 3
# The image processor settings a server may override for the Qwen families (``--mm-processor-kwargs``).
QWEN_PROCESSOR_KWARGS = ("min_pixels", "max_pixels")

# ---------------------------------------------------------------------------------------
# Images


class ImageFolderError(ValueError):
    """No usable images: a missing or empty folder, or a file that is not a readable image."""


class FeatureSettingsError(ValueError):
    """Image processor settings that the model's family does not take."""


def find_images(folder: str | Path) -> list[Path]:
    """All png/jpg/jpeg/webp files under folder, recursively, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFolderError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ImageFolderError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return paths


def load_images(paths: list[Path]) -> list[Image.Image]:
    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ImageFolderError(f"cannot read image {path}: {e}") from e
    return images


# ---------------------------------------------------------------------------------------
# Model files and the vision tower


def _model_file(model: str, filename: str) -> Path | None:
    """A file of a local checkpoint folder or of a hub model (from the local hub cache if there)."""
    if Path(model).is_dir():
        path = Path(model) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(model, filename))
    except EntryNotFoundError:
        return None


def _weight_files(model: str, tower_prefix: str) -> list[Path]:
    """The safetensors files holding the tower's weights (only those shards of a sharded checkpoint)."""
    index = _model_file(model, "model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({shard for key, shard in weight_map.items() if _tower_key(key, tower_prefix)})
        return [_model_file(model, shard) for shard in shards]
    single = _model_file(model, "model.safetensors")
    if single is None:
        raise FileNotFoundError(f"{model}: no model.safetensors or model.safetensors.index.json")
    return [single]


def _tower_key(key: str, tower_prefix: str) -> str | None:
    """The name inside the tower of a checkpoint key, e.g. 'model.vision_tower.x.y' -> 'x.y'."""
    m = re.match(rf"^(?:.*\.)?{tower_prefix}\.(.*)$", key)
    return m.group(1) if m else None


def _reader(config) -> Reader:
    """How the tower of ``config``'s family is read (its row in ``families`` names it)."""
    return READERS[of_model_type(config.model_type).features]


def _tower_module(vision_config) -> torch.nn.Module:
    """The tower's transformers module, randomly initialised. AutoModel maps every served
    tower's config but Qwen2-VL's, whose class is named here."""
    from transformers import AutoModel

    if vision_config.model_type == "qwen2_vl_vision":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        return Qwen2VisionTransformerPretrainedModel._from_config(vision_config)
    return AutoModel.from_config(vision_config)


def _build_tower(model: str, config) -> tuple[torch.nn.Module, list[Path]]:
    """The vision tower with its checkpoint weights, and the files they came from."""
    tower = _tower_module(config.vision_config)
    prefix = _reader(config).tower
    wanted = set(tower.state_dict())
    state = {}
    files = _weight_files(model, prefix)
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = _tower_key(key, prefix)
                if name is None:
                    continue
                # transformers 5 saves CLIP/SigLIP towers without the "vision_model." level
                # that older checkpoints (and vLLM) use.
                for candidate in (name, name.removeprefix("vision_model."), "vision_model." + name):
                    if candidate in wanted:
                        state[candidate] = f.get_tensor(key).float()
                        break
    # Hidden states never pass the post-norm or pooling head; checkpoints may omit them.
    missing = sorted(k for k in wanted - state.keys() if "post_layernorm" not in k and not k.startswith("head."))
    if missing:
        raise ValueError(f"{model}: vision tower weights missing from the checkpoint: {missing[:5]}")
    tower.load_state_dict(state, strict=False)
    return tower.float().eval(), files


# ---------------------------------------------------------------------------------------
# Extraction


def _llava_inputs(processor, images) -> dict:
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    if pixels.dim() == 5:  # LLaVA-NeXT / OneVision: (B, patches, C, H, W), base view first
        pixels = pixels[:, 0]
    return {"pixel_values": pixels}


def _llava_forward(tower, config, inputs: dict) -> RaggedFeatures:
    hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    feats = [hidden[layer] for layer in layers]
    if config.vision_feature_select_strategy == "default":  # drop CLS
        feats = [f[:, 1:] for f in feats]
    feats = torch.cat(feats, dim=-1)
    side = config.vision_config.image_size // config.vision_config.patch_size
    # With CLS kept the tokens form no grid: one row.
    return RaggedFeatures.stack(feats, (side, side) if side * side == feats.shape[1] else None)


def _gemma3_forward(tower, config, inputs: dict) -> RaggedFeatures:
    hidden = tower(inputs["pixel_values"]).last_hidden_state  # (B, patches, D), post-norm
    patches = config.vision_config.image_size // config.vision_config.patch_size
    side = math.isqrt(config.mm_tokens_per_image)
    grid = hidden.transpose(1, 2).reshape(len(hidden), hidden.shape[2], patches, patches)
    pooled = torch.nn.functional.avg_pool2d(grid, patches // side).flatten(2).transpose(1, 2)
    return RaggedFeatures.stack(pooled, (side, side))


def _gemma4_inputs(processor, images) -> dict:
    inputs = processor(images=images, return_tensors="pt")
    return {"pixel_values": inputs["pixel_values"], "pixel_position_ids": inputs["image_position_ids"]}


def _gemma4_forward(tower, config, inputs: dict) -> RaggedFeatures:
    # The pooler's soft tokens of all images one after the other, padding stripped, each
    # image's in row-major order of its grid of k x k patch blocks; a patch's position is
    # (x, y), -1 for padding.
    soft_tokens = tower(**inputs).last_hidden_state
    x, y = (inputs["pixel_position_ids"].amax(dim=1) + 1).T
    kernel = config.vision_config.pooling_kernel_size
    return RaggedFeatures(soft_tokens, torch.stack([y // kernel, x // kernel], dim=1))


def _internvl_inputs(processor, images) -> dict:
    return {"pixel_values": processor(images=images, crop_to_patches=False, return_tensors="pt")["pixel_values"]}


def _internvl_forward(tower, config, inputs: dict) -> RaggedFeatures:
    from transformers.models.internvl.modeling_internvl import InternVLModel

    hidden = tower(inputs["pixel_values"]).last_hidden_state[:, 1:]  # without CLS
    side = math.isqrt(hidden.shape[1])
    # transformers' own shuffle (it reads nothing of the model it belongs to)
    shuffled = InternVLModel.pixel_shuffle(None, hidden.reshape(len(hidden), side, side, -1),
                                           scale_factor=config.downsample_ratio)
    return RaggedFeatures.stack(shuffled.flatten(1, 2), tuple(shuffled.shape[1:3]))


def _qwen_inputs(processor, images) -> dict:
    inputs = processor(images=images, return_tensors="pt")
    return {"pixel_values": inputs["pixel_values"], "grid_thw": inputs["image_grid_thw"]}


def _qwen_forward(tower, config, inputs: dict) -> RaggedFeatures:
    # Merged tokens of all images one after the other, each image's in row-major order of
    # its merged grid (t * h / merge rows, as serving lays them out; t = 1 for images).
    merged = tower(inputs["pixel_values"], grid_thw=inputs["grid_thw"]).pooler_output
    merge = config.vision_config.spatial_merge_size
    t, h, w = inputs["grid_thw"].cpu().T
    return RaggedFeatures(merged, torch.stack([t * h // merge, w // merge], dim=1))


@dataclass(frozen=True)
class Reader:
    """How training reads one kind of tower: a row of ``families`` names it by its key in ``READERS``."""

    inputs: Callable[[Any, list[Image.Image]], dict[str, torch.Tensor]]  # image processor -> tower inputs
    forward: Callable[[torch.nn.Module, Any, dict[str, torch.Tensor]], RaggedFeatures]  # tower, config, inputs
    layer: Callable[[Any], Any]  # what a selector checkpoint records as its feature layer, from the config
    tower: str = "vision_tower"  # the checkpoint's name for the tower module
    # images keep their own size, resized within a pixel range the server may override
    # (QWEN_PROCESSOR_KWARGS); other towers take every image at one size
    own_size: bool = False


READERS: dict[str, Reader] = {
    "llava": Reader(_llava_inputs, _llava_forward, lambda config: getattr(config, "vision_feature_layer", None)),
    "gemma3": Reader(_llava_inputs, _gemma3_forward, lambda config: "pooled"),
    "gemma4": Reader(_gemma4_inputs, _gemma4_forward, lambda config: "pooled"),
    "internvl": Reader(_internvl_inputs, _internvl_forward, lambda config: "pixel_shuffle"),
    "qwen": Reader(_qwen_inputs, _qwen_forward, lambda config: "merger", tower="visual", own_size=True),
}


@dataclass
class Tower:
    """A checkpoint's vision tower up to the selector's input (LLaVA: the feature layer
    without CLS; Gemma 3: pooled; Gemma 4: its pooler's soft tokens; InternVL: pixel-shuffled; Qwen: after the
    merger), with the model's own preprocessing.

    ``tower(images)`` gives their features; ``preprocess`` and ``forward`` are its two
    halves, for timing the forward alone. Call under ``torch.inference_mode()``.
    """

    config: Any
    preprocess: Callable[[list[Image.Image]], dict[str, torch.Tensor]]
    forward: Callable[[dict[str, torch.Tensor]], RaggedFeatures]
    image_pixels: dict[str, int] | None  # Qwen: the min_pixels and max_pixels images are resized within

    def __call__(self, images: list[Image.Image]) -> RaggedFeatures:
        return self.forward(self.preprocess(images))


def _processor(model: str, config, processor_kwargs: dict[str, int]):
    """The checkpoint's image processor with the server's overrides, and the pixel range it
    resizes Qwen images within (None for LLaVA, whose images all get one size)."""
    from transformers import AutoImageProcessor

    if not _reader(config).own_size:
        if processor_kwargs:
            raise FeatureSettingsError(f"{sorted(processor_kwargs)} apply to Qwen models only; "
                                       f"{model} resizes every image to one size")
        return AutoImageProcessor.from_pretrained(model), None
    unknown = sorted(set(processor_kwargs) - set(QWEN_PROCESSOR_KWARGS))
    if unknown:
        raise FeatureSettingsError(f"unknown image processor settings {unknown}; "
                                   f"training takes {', '.join(QWEN_PROCESSOR_KWARGS)}")
    processor = AutoImageProcessor.from_pretrained(model, **processor_kwargs)
    return processor, {"min_pixels": processor.size["shortest_edge"], "max_pixels": processor.size["longest_edge"]}


def load_tower(model: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               processor_kwargs: dict[str, int] | None = None) -> Tower:
    """The tower of ``model`` with its checkpoint weights, in ``dtype`` on ``device``;
    ``processor_kwargs`` (Qwen: min_pixels, max_pixels) override the image processor's
    settings as the server's ``--mm-processor-kwargs`` would."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    processor, image_pixels = _processor(model, config, processor_kwargs or {})
    module, _ = _build_tower(model, config)
    module.to(device=device, dtype=dtype)
    reader = _reader(config)

    def preprocess(images: list[Image.Image]) -> dict[str, torch.Tensor]:
        images = [im.convert("RGB") for im in images]
        inputs = reader.inputs(processor, images)
        return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}

    def forward(inputs: dict[str, torch.Tensor]) -> RaggedFeatures:
        return reader.forward(module, config, inputs)

    return Tower(config, preprocess, forward, image_pixels)


def tower_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on CUDA, as vLLM serves these towers there (and half the disk per feature);
    float32 elsewhere: CPUs run bfloat16 matmuls slowly, and in float32 the features equal
    the projector's input exactly (tests/test_train.py)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def feature_info(model: str, tower: Tower, grids: torch.Tensor, feature_dim: int) -> dict[str, Any]:
    """What a selector checkpoint records about the features (of images with token ``grids``
    (B, 2)) it was trained on: among them the fewest and most tokens of an image, and (Qwen)
    the pixel range images were resized within, which the server's should match."""
    config = tower.config
    lengths = grids.prod(dim=1)
    return {
        "source_model": model,
        "feature_layer": _reader(config).layer(config),
        "vision_signature": vision_signature(config),
        "num_tokens": [int(lengths.min()), int(lengths.max())],
        "feature_dim": feature_dim,
        "image_pixels": tower.image_pixels,
    }


def tower_outputs(tower: Tower, items: Sequence, *, batch_size: int, load: Callable[[Sequence], list] = list,
                  workers: int = 0, bar: tqdm | None = None) -> Iterator[RaggedFeatures]:
    """The tower's features, on the CPU in the tower's dtype, for each batch of items in order.

    ``load`` turns a batch of items into images (``load_images`` for paths). ``workers``
    threads decode and preprocess the next batches while the tower runs: on one core that
    work alone would keep a GPU waiting.
    """
    batches = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
    with torch.inference_mode():
        for inputs in ahead(lambda batch: tower.preprocess(load(batch)), batches, workers):
            features = tower.forward(inputs).to("cpu")
            if bar is not None:
                bar.update(len(features))
            yield features


def extract_features(
    model_dir_or_id: str | Path,
    images: list[Image.Image],
    *,
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
    processor_kwargs: dict[str, int] | None = None,
) -> tuple[RaggedFeatures, dict[str, Any]]:
    """The images' features, float32 on CPU, and their ``feature_info``, in memory.

    ``training.store`` writes the same features to disk shard by shard, for large folders.
    """
    if not images:
        raise ValueError("no images to extract features from")
    model = str(model_dir_or_id)
    tower = load_tower(model, device=device, dtype=tower_dtype(device), processor_kwargs=processor_kwargs)
    with tqdm(total=len(images), desc="features", unit="img", disable=not progress) as bar:
        features = RaggedFeatures.cat(list(tower_outputs(tower, images, batch_size=batch_size, bar=bar)))
    features = features.to("cpu", dtype=torch.float32)
    return features, feature_info(model, tower, features.grids, features.feature_dim)


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def features_key(model: str, image_paths: list[Path], *, dtype: torch.dtype,
                 processor_kwargs: dict[str, int] | None = None) -> str:
    """Hash of everything the features depend on: model config, processor config and its
    overrides, tower weight files (size, mtime), image files (size, mtime), the feature
    layer and the tower's dtype."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    parts: dict[str, Any] = {
        "version": FEATURES_VERSION,
        "model": model,
        "config": config.to_dict(),
        "feature_layer": getattr(config, "vision_feature_layer", None),
        "processor_kwargs": processor_kwargs or {},
        "dtype": str(dtype),
        "images": [_file_stamp(Path(p)) for p in image_paths],
    }
    processor_config = _model_file(model, "preprocessor_config.json")
    parts["processor"] = processor_config.read_text() if processor_config else None
    prefix = _reader(config).tower
    parts["weights"] = [_file_stamp(p) for p in _weight_files(model, prefix)]
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
