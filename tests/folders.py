"""Image folders of several sizes, for training on Qwen's dynamic resolution."""

from __future__ import annotations

from pathlib import Path

from vllm_tokenprune.testbed.synthetic import write_image_folder

# (width, height): landscape, portrait, square; 50, 36 and 16 tokens on the tiny Qwen2.5-VL
SIZES = [(280, 140), (100, 260), (112, 112)]


def folder_of_sizes(root: Path, n: int, sizes=SIZES, seed: int = 0) -> list[Path]:
    """n images spread over ``sizes`` as evenly as they go, a subfolder per size (so read in
    sorted order, size by size)."""
    return [path for i, size in enumerate(sizes)
            for path in write_image_folder(root / f"size{i}", len(range(i, n, len(sizes))), seed=seed + i, size=size)]
