"""Reading synthetic scenes back from their pixels, independently of the generators."""

from __future__ import annotations

import hashlib
from collections import deque

import numpy as np
from PIL import Image

from vllm_tokenprune.testbed import tasks
from vllm_tokenprune.testbed.synthetic import TASK_COLOURS, scene_seed


def split_digests(variant: str, split: str, n: int) -> set[str]:
    """SHA-256 of the pixels of scenes 0..n-1 of a split."""
    return {hashlib.sha256(tasks.make_scene(variant, scene_seed(split, i)).image.tobytes()).hexdigest()
            for i in range(n)}


def blobs(mask: np.ndarray, min_pixels: int = 10) -> list[np.ndarray]:
    """4-connected regions of at least min_pixels True pixels, each as (n, 2) (y, x) rows."""
    seen = np.zeros_like(mask)
    found = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        pixels, queue = [], deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            pixels.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(pixels) >= min_pixels:
            found.append(np.array(pixels))
    return found


def coloured_blobs(image: Image.Image) -> list[tuple[str, np.ndarray]]:
    """(colour name, pixels) of every blob within noise of a task colour (noise std is 4)."""
    pixels = np.asarray(image, np.float32)
    return [(name, blob) for name, rgb in TASK_COLOURS.items()
            for blob in blobs(np.abs(pixels - np.array(rgb, np.float32)).max(axis=-1) < 25)]


def shape_kind(blob: np.ndarray) -> str:
    """square, circle or triangle from how much of its bounding box a blob fills
    (1, pi/4 and 1/2 for ideal shapes)."""
    height, width = np.ptp(blob, axis=0) + 1
    fill = len(blob) / (height * width)
    return "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
