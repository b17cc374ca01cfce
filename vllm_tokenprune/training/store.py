"""Tower features of an image folder on disk, in shards, so training never holds them all.

A store is a folder named by ``features.features_key`` (model files, image files, tower
dtype) under the cache directory:

    <key>/shard_0000000_0000256.safetensors   images [0, 256): "features" (256, N, D) in the
                                               tower's dtype, and their float64 "sum" and
                                               "sum_sq" per dimension (``stream.token_sums``)
    <key>/index.json                           written last: model signature, grid, N, D,
                                               dtype and the shard list

A folder with an index is complete and is reused as it is. Shards are written atomically
and named by their image range, so an interrupted extraction keeps its finished shards
and continues from the first missing one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vllm_tokenprune.training.features import (
    QWEN_IMAGE_SIZE,
    feature_info,
    features_key,
    load_images,
    load_tower,
    tower_dtype,
    tower_outputs,
)
from vllm_tokenprune.training.stream import token_sums

DEFAULT_CACHE_DIR = "~/.cache/vllm_tokenprune/features"
INDEX = "index.json"


@dataclass
class FeatureStore:
    """A complete store, read one shard at a time (a ``stream.FeatureSet``)."""

    root: Path
    index: dict[str, Any]

    @property
    def key(self) -> str:
        return self.root.name

    @property
    def info(self) -> dict[str, Any]:
        """``features.feature_info`` of the stored features."""
        return self.index["info"]

    @property
    def shard_sizes(self) -> list[int]:
        return [shard["images"] for shard in self.index["shards"]]

    @property
    def num_tokens(self) -> int:
        return self.info["num_tokens"]

    @property
    def feature_dim(self) -> int:
        return self.info["feature_dim"]

    def load(self, shard: int) -> torch.Tensor:
        with safe_open(str(self.root / self.index["shards"][shard]["file"]), framework="pt") as f:
            return f.get_tensor("features")

    def sums(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Added up from each shard's stored sums, without reading any features."""
        total = squares = 0
        for shard in self.index["shards"]:
            with safe_open(str(self.root / shard["file"]), framework="pt") as f:
                total = total + f.get_tensor("sum")
                squares = squares + f.get_tensor("sum_sq")
        return sum(self.shard_sizes) * self.num_tokens, total, squares


def open_store(root: Path) -> FeatureStore | None:
    """The store at ``root`` if it is complete, else None."""
    try:
        return FeatureStore(root, json.loads((root / INDEX).read_text()))
    except (OSError, json.JSONDecodeError):
        return None


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def feature_store(
    model: str | Path,
    image_paths: list[Path],
    *,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    shard_images: int = 256,
    batch_size: int = 16,
    device: str = "cpu",
    workers: int = 0,
    progress: bool = True,
    qwen_image_size: int = QWEN_IMAGE_SIZE,
) -> tuple[FeatureStore, bool]:
    """The store of these images' features, extracted now where not stored yet; returns
    (store, whether it was complete already). The tower runs in ``tower_dtype(device)``."""
    if not image_paths:
        raise ValueError("no images to extract features from")
    model = str(model)
    dtype = tower_dtype(device)
    root = Path(cache_dir).expanduser() / features_key(model, image_paths, dtype=dtype, qwen_image_size=qwen_image_size)
    store = open_store(root)
    if store is not None:
        return store, True

    n = len(image_paths)
    ranges = [(start, min(start + shard_images, n)) for start in range(0, n, shard_images)]
    files = [f"shard_{start:07d}_{end:07d}.safetensors" for start, end in ranges]
    missing = [(r, file) for r, file in zip(ranges, files) if not (root / file).is_file()]
    root.mkdir(parents=True, exist_ok=True)
    tower = load_tower(model, device=device, dtype=dtype, qwen_image_size=qwen_image_size)
    with tqdm(total=sum(end - start for (start, end), _ in missing), desc="features", unit="img",
              disable=not progress) as bar:
        for (start, end), file in missing:
            features = torch.cat(list(tower_outputs(tower, image_paths[start:end], batch_size=batch_size,
                                                    load=load_images, workers=workers, bar=bar)))
            _, total, squares = token_sums(features)
            tensors = {"features": features.contiguous(), "sum": total, "sum_sq": squares}
            _write_atomically(root / file, lambda tmp, t=tensors: save_file(t, str(tmp)))

    with safe_open(str(root / files[0]), framework="pt") as f:
        _, num_tokens, dim = f.get_slice("features").get_shape()
    index = {
        "info": feature_info(model, tower.config, num_tokens, dim, qwen_image_size),
        "dtype": str(dtype).removeprefix("torch."),
        "num_images": len(image_paths),
        "shards": [{"file": file, "images": end - start} for (start, end), file in zip(ranges, files)],
    }
    _write_atomically(root / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
    return FeatureStore(root, index), False
