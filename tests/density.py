"""Images whose content covers a chosen share of the canvas: the budget predictor's tests
need images that need few tokens and images that need many."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CELLS = 12  # the canvas is cut into CELLS x CELLS cells; content fills some of them


def density_image(width: int, height: int, density: float, seed: int) -> Image.Image:
    """A pale, lightly noisy canvas whose cells are each filled with coloured noise with
    probability ``density`` (0: nearly blank; 1: dense everywhere)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(235, 3, (height, width, 3)), 0, 255)
    ys, xs = np.linspace(0, height, CELLS + 1).astype(int), np.linspace(0, width, CELLS + 1).astype(int)
    for r in range(CELLS):
        for c in range(CELLS):
            if rng.random() < density:
                block = (ys[r + 1] - ys[r], xs[c + 1] - xs[c], 3)
                noise = rng.integers(0, 256, 3) * 0.5 + rng.integers(0, 256, block) * 0.5
                pixels[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = noise
    return Image.fromarray(pixels.astype(np.uint8))


def write_density_folder(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """n images of densities spread evenly over [0, 1], in a shuffled order."""
    root.mkdir(parents=True, exist_ok=True)
    densities = np.random.default_rng(seed).permutation(np.linspace(0, 1, n))
    paths = []
    for i, density in enumerate(densities):
        path = root / f"img_{i:04d}.png"
        density_image(*size, float(density), seed=seed * 100_000 + i).save(path)
        paths.append(path)
    return paths
