"""Generated images with structure: a few small coloured shapes on a mostly empty canvas.

Used to train and test selectors without any dataset: most patches are near-empty
background that a reconstructor can predict from its position, and a few hold shapes that
it cannot, so a working selector must keep the shape patches. Everything is seeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Saturated colours, far from the light background (RGB).
PALETTE = [
    (220, 30, 30), (30, 160, 40), (30, 60, 220), (240, 180, 0),
    (150, 40, 190), (0, 170, 190), (240, 110, 20), (20, 20, 20),
]
SHAPES = ("square", "circle", "triangle")


def make_shapes_image(
    rng: np.random.Generator,
    size: int | tuple[int, int],
    *,
    max_shapes: int = 4,
    noise_std: float = 4.0,
) -> Image.Image:
    """1..max_shapes solid shapes, each 8-20% of the shorter side, on a lightly noisy canvas.

    ``size`` is an int (square) or (width, height).
    """
    width, height = (size, size) if isinstance(size, int) else size
    background = rng.integers(235, 256, size=3)  # near-white with a slight random tint
    image = Image.new("RGB", (width, height), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        side = int(rng.integers(max(2, round(0.08 * short)), max(3, round(0.20 * short)) + 1))
        x0 = int(rng.integers(0, width - side + 1))
        y0 = int(rng.integers(0, height - side + 1))
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        colour = PALETTE[int(rng.integers(len(PALETTE)))]
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        if kind == "square":
            draw.rectangle(box, fill=colour)
        elif kind == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(x0 + side // 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)],
                         fill=colour)
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, noise_std, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def write_image_folder(out_dir: str | Path, n: int, seed: int, size: int | tuple[int, int]) -> list[Path]:
    """Write n PNGs to out_dir and return their paths.

    Image i depends only on (seed, i), so a larger folder extends a smaller one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = out_dir / f"shapes_{i:05d}.png"
        make_shapes_image(np.random.default_rng([seed, i]), size).save(path)
        paths.append(path)
    return paths
