"""Generated images with structure: a few small coloured shapes on a mostly empty canvas.

Used to train and test selectors without any dataset: most patches are near-empty
background that a reconstructor can predict from its position, and a few hold shapes that
it cannot, so a working selector must keep the shape patches. Everything is seeded.

``make_scene`` adds a question-answering task with answers known by construction (how
many shapes, which colour appears the most), in a plain and a textured variant, with
train and test splits drawn from disjoint seed ranges (``testbed.tasks`` writes eval sets).
"""

from __future__ import annotations

from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------
# The question-answering task: scenes with verifiable answers
#
# A scene holds 1-5 small solid shapes (the content) on a near-white canvas, each inside
# its own patch cell: one shape is one content token, so a pruning method that drops it
# loses that shape, and shapes never touch, so counts are unambiguous. The textured
# variant adds 1-3 patterned regions (stripes, checkerboards, gradients): busy, high
# contrast, but periodic with a period dividing the patch size and aligned to the patch
# grid, so every patch of a region is predictable from its neighbours. Answers come from
# the generator, never from looking at pixels.

TASK_IMAGE_SIZE = 168  # 12 x 12 patches of 14 px: the tower input, so no resize happens
TASK_PATCH = 14
# Well separated hues; no black, white or grey, which belong to the textures.
TASK_COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
    "yellow": (240, 180, 0), "purple": (150, 40, 190), "cyan": (0, 170, 190),
}
COUNT_WORDS = ("one", "two", "three", "four", "five")
QUESTIONS = {"count": "how many shapes are there ?", "colour": "which colour appears the most ?"}
VARIANTS = ("textured", "plain")
TEXTURES = ("hstripes", "vstripes", "diagonal", "checker", "gradient")
# Greys and earth tones, desaturated so a texture is never mistaken for a shape colour.
TEXTURE_COLOURS = ((45, 45, 45), (105, 105, 105), (175, 175, 175), (230, 230, 230),
                   (200, 175, 130), (120, 85, 55), (80, 90, 110))
# Disjoint scene-seed ranges [start, stop) per split: no test scene is ever trained on,
# and "val" (progress during training) is neither.
SPLITS = {"train": (0, 10**9), "test": (10**9, 10**9 + 10**6), "val": (10**9 + 10**6, 10**9 + 2 * 10**6)}


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # a TASK_COLOURS name
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive, pixels


@dataclass(frozen=True)
class Texture:
    kind: str  # one of TEXTURES
    cells: tuple[int, int, int, int]  # col0, row0, col1, row1 exclusive, in patches


@dataclass
class Scene:
    image: Image.Image
    shapes: list[Shape]
    textures: list[Texture]
    ink: np.ndarray  # (H, W) bool: pixels drawn by shapes

    def question(self, kind: str) -> str:
        if kind not in QUESTIONS:
            raise ValueError(f"unknown question {kind!r}; choose one of {', '.join(QUESTIONS)}")
        return QUESTIONS[kind]

    def answer(self, question: str) -> str:
        """The one-word answer to ``question`` (a QUESTIONS key), by construction."""
        if question == "count":
            return COUNT_WORDS[len(self.shapes) - 1]
        if question == "colour":
            counts = {c: sum(s.colour == c for s in self.shapes) for c in TASK_COLOURS}
            return max(counts, key=counts.get)  # unique by construction (_shape_colours)
        raise ValueError(f"unknown question {question!r}; choose one of {', '.join(QUESTIONS)}")

    def content_patches(self, patch: int = TASK_PATCH) -> np.ndarray:
        """(rows, cols) bool: patches holding any shape pixel (the tokens that matter)."""
        return patches_touched(self.ink, patch)


def patches_touched(mask: np.ndarray, patch: int = TASK_PATCH) -> np.ndarray:
    """(rows, cols) bool: the patches of an (H, W) pixel mask holding any True pixel."""
    h, w = mask.shape
    return mask[: h - h % patch, : w - w % patch].reshape(h // patch, patch, w // patch, patch).any(axis=(1, 3))


def scene_seed(split: str, index: int) -> int:
    """The seed of scene ``index`` of ``split``; raises if it would leave the split's range."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    start, stop = SPLITS[split]
    if not 0 <= index < stop - start:
        raise ValueError(f"index {index} is outside split {split!r} (size {stop - start})")
    return start + index


def _shape_colours(rng: np.random.Generator, n: int) -> list[str]:
    """n colour names whose most frequent colour is unique, in random order.

    The winner is uniform over the colours and its count m uniform over the feasible
    values (the other n - m shapes, each other colour fewer than m times).
    """
    names = list(TASK_COLOURS)
    winner = names[int(rng.integers(len(names)))]
    feasible = [m for m in range(1, n + 1) if m == n or (m >= 2 and n - m <= (m - 1) * (len(names) - 1))]
    m = feasible[int(rng.integers(len(feasible)))]
    colours, counts = [winner] * m, dict.fromkeys(names, 0)
    others = [c for c in names if c != winner]
    while len(colours) < n:
        c = others[int(rng.integers(len(others)))]
        if counts[c] < m - 1:
            counts[c] += 1
            colours.append(c)
    return [colours[i] for i in rng.permutation(n)]


def _texture_pixels(rng: np.random.Generator, kind: str, width: int, height: int,
                    x0: int, y0: int, patch: int) -> np.ndarray:
    """(height, width, 3) float pixels of a two-colour texture.

    Stripes, diagonals and checkers use absolute coordinates and a period dividing the
    patch size, so all whole patches of a patch-aligned region are the same.
    """
    i, j = rng.choice(len(TEXTURE_COLOURS), size=2, replace=False)
    a, b = np.array(TEXTURE_COLOURS[i], np.float32), np.array(TEXTURE_COLOURS[j], np.float32)
    ys, xs = np.mgrid[y0:y0 + height, x0:x0 + width]
    period = patch // int(rng.choice([1, 2]))
    if kind == "gradient":
        t = (xs - x0) / max(width - 1, 1) if rng.integers(2) else (ys - y0) / max(height - 1, 1)
    elif kind == "hstripes":
        t = (ys % period) < period / 2
    elif kind == "vstripes":
        t = (xs % period) < period / 2
    elif kind == "diagonal":
        t = ((xs + ys) % period) < period / 2
    else:  # checker: cells of half a period
        t = ((xs // (period // 2) + ys // (period // 2)) % 2) == 0
    t = np.asarray(t, np.float32)[..., None]
    return t * a + (1 - t) * b


def _place_textures(rng: np.random.Generator, grid: tuple[int, int]) -> list[Texture]:
    """1-3 non-overlapping patch-aligned rectangles of 3-7 patches a side, <= 60% of the grid."""
    rows, cols = grid
    taken = np.zeros(grid, bool)
    textures = []
    for _ in range(int(rng.integers(1, 4))):
        for _try in range(50):
            w, h = (int(v) for v in rng.integers(3, 8, size=2))
            c0, r0 = int(rng.integers(0, cols - w + 1)), int(rng.integers(0, rows - h + 1))
            if taken[r0:r0 + h, c0:c0 + w].any() or taken.sum() + w * h > 0.6 * rows * cols:
                continue
            taken[r0:r0 + h, c0:c0 + w] = True
            textures.append(Texture(TEXTURES[int(rng.integers(len(TEXTURES)))], (c0, r0, c0 + w, r0 + h)))
            break
    return textures


def _place_shapes(rng: np.random.Generator, colours: list[str], free: np.ndarray, patch: int) -> list[Shape]:
    """One shape of 8-12 px per colour, each inside its own free patch cell (1 px clear of
    the cell's edges): a shape is exactly one content token, and shapes never touch."""
    cells = np.flatnonzero(free)
    shapes = []
    for colour, cell in zip(colours, rng.choice(cells, size=len(colours), replace=False)):
        side = int(rng.integers(8, 13))
        row, col = divmod(int(cell), free.shape[1])
        x0, y0 = (int(v) for v in rng.integers(1, patch - side, size=2))
        x0, y0 = col * patch + x0, row * patch + y0
        shapes.append(Shape(SHAPES[int(rng.integers(len(SHAPES)))], colour, (x0, y0, x0 + side - 1, y0 + side - 1)))
    return shapes


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    x0, y0, x1, y1 = shape.box
    if shape.kind == "square":
        draw.rectangle(shape.box, fill=fill)
    elif shape.kind == "circle":
        draw.ellipse(shape.box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)


def make_scene(variant: str, seed: int, *, size: int = TASK_IMAGE_SIZE, patch: int = TASK_PATCH,
               noise_std: float = 4.0) -> Scene:
    """The scene of ``seed`` (see ``scene_seed``) in ``variant``; same arguments, same pixels."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    rng = np.random.default_rng([seed, VARIANTS.index(variant)])
    free = np.ones((size // patch, size // patch), bool)
    textures = _place_textures(rng, free.shape) if variant == "textured" else []
    for t in textures:
        c0, r0, c1, r1 = t.cells
        free[r0:r1, c0:c1] = False
    n = int(rng.integers(1, len(COUNT_WORDS) + 1))
    shapes = _place_shapes(rng, _shape_colours(rng, n), free, patch)
    pixels = np.empty((size, size, 3), np.float32)
    pixels[:] = rng.integers(235, 256, size=3)  # near-white with a slight random tint
    for t in textures:
        c0, r0, c1, r1 = t.cells
        x0, y0, w, h = c0 * patch, r0 * patch, (c1 - c0) * patch, (r1 - r0) * patch
        pixels[y0:y0 + h, x0:x0 + w] = _texture_pixels(rng, t.kind, w, h, x0, y0, patch)
    image, ink = paint_shapes(pixels, shapes, rng, noise_std)
    return Scene(image, shapes, textures, ink)


def paint_shapes(pixels: np.ndarray, shapes: list[Shape], rng: np.random.Generator, noise_std: float,
                 ink_boxes: tuple[tuple[int, int, int, int], ...] = ()) -> tuple[Image.Image, np.ndarray]:
    """The canvas (H, W, 3) with the shapes drawn and pixel noise added, and the (H, W) bool
    ink mask of the shapes and of ``ink_boxes`` (other content, already on the canvas)."""
    height, width = pixels.shape[:2]
    image = Image.fromarray(pixels.astype(np.uint8))
    ink = Image.new("1", (width, height), 0)
    draw, ink_draw = ImageDraw.Draw(image), ImageDraw.Draw(ink)
    for box in ink_boxes:
        ink_draw.rectangle(box, fill=1)
    for shape in shapes:
        draw_shape(draw, shape, TASK_COLOURS[shape.colour])
        draw_shape(ink_draw, shape, 1)
    noisy = np.asarray(image, np.float32)
    noisy += noise_std * rng.standard_normal((height, width, 3), dtype=np.float32)
    image = Image.fromarray(np.rint(np.clip(noisy, 0, 255, out=noisy), out=noisy).astype(np.uint8))
    return image, np.asarray(ink, bool)
