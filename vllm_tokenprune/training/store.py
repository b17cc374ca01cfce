"""Tower features of an image folder on disk, in shards, so training never holds them all.

A store is a folder named by ``features.features_key`` (model files, image files, tower
dtype) under the cache directory:

    <key>/shard_0000000_0000256.safetensors   images [0, 256): "tokens" (T, D), their tokens
                                               one image after the other, in the tower's
                                               dtype; "grids" (256, 2), each image's (rows,
                                               cols); the tokens' float64 "sum" and "sum_sq"
                                               per dimension (``stream.token_sums``)
    <key>/index.json                           written last: ``features.feature_info``, dtype
                                               and the shard list with each shard's images
                                               and tokens

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
    feature_info,
    features_key,
    load_images,
    load_tower,
    tower_dtype,
    tower_outputs,
)
from vllm_tokenprune.training.ragged import RaggedFeatures
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
    def shard_tokens(self) -> list[int]:
        return [shard["tokens"] for shard in self.index["shards"]]

    @property
    def feature_dim(self) -> int:
        return self.info["feature_dim"]

    def load(self, shard: int) -> RaggedFeatures:
        """Shard ``shard``'s features; the tokens may be a view of the file, mapped in memory."""
        with safe_open(str(self.root / self.index["shards"][shard]["file"]), framework="pt") as f:
            # The grids copied out: a view would keep the whole file mapped (and its read pages
            # resident) for as long as they live, and a round keeps every shard's grids.
            return RaggedFeatures(f.get_tensor("tokens"), f.get_tensor("grids").clone())

    def sums(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Added up from each shard's stored sums, without reading any features."""
        total = squares = 0
        for shard in self.index["shards"]:
            with safe_open(str(self.root / shard["file"]), framework="pt") as f:
                total = total + f.get_tensor("sum")
                squares = squares + f.get_tensor("sum_sq")
        return sum(shard["tokens"] for shard in self.index["shards"]), total, squares


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
    processor_kwargs: dict[str, int] | None = None,
) -> tuple[FeatureStore, bool]:
    """The store of these images' features, extracted now where not stored yet; returns
    (store, whether it was complete already). The tower runs in ``tower_dtype(device)``;
    ``processor_kwargs`` as for ``features.load_tower``."""
    if not image_paths:
        raise ValueError("no images to extract features from")
    model = str(model)
    dtype = tower_dtype(device)
    root = Path(cache_dir).expanduser() / features_key(model, image_paths, dtype=dtype,
                                                       processor_kwargs=processor_kwargs)
    store = open_store(root)
    if store is not None:
        return store, True

    n = len(image_paths)
    ranges = [(start, min(start + shard_images, n)) for start in range(0, n, shard_images)]
    files = [f"shard_{start:07d}_{end:07d}.safetensors" for start, end in ranges]
    missing = [(r, file) for r, file in zip(ranges, files) if not (root / file).is_file()]
    root.mkdir(parents=True, exist_ok=True)
    tower = load_tower(model, device=device, dtype=dtype, processor_kwargs=processor_kwargs)
    with tqdm(total=sum(end - start for (start, end), _ in missing), desc="features", unit="img",
              disable=not progress) as bar:
        for (start, end), file in missing:
            features = RaggedFeatures.cat(list(tower_outputs(tower, image_paths[start:end], batch_size=batch_size,
                                                             load=load_images, workers=workers, bar=bar)))
            _, total, squares = token_sums(features)
            tensors = {"tokens": features.tokens.contiguous(), "grids": features.grids.contiguous(),
                       "sum": total, "sum_sq": squares}
            _write_atomically(root / file, lambda tmp, t=tensors: save_file(t, str(tmp)))

    grids = []  # every image's, from the shards (written now or by an interrupted run)
    for file in files:
        with safe_open(str(root / file), framework="pt") as f:
            grids.append(f.get_tensor("grids"))
            dim = f.get_slice("tokens").get_shape()[1]
    index = {
        "info": feature_info(model, tower, torch.cat(grids), dim),
        "dtype": str(dtype).removeprefix("torch."),
        "num_images": len(image_paths),
        "shards": [{"file": file, "images": end - start, "tokens": int(g.prod(dim=1).sum())}
                   for (start, end), file, g in zip(ranges, files, grids)],
    }
    _write_atomically(root / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
    return FeatureStore(root, index), False
