"""The clutter task: scenes where choosing tokens is hard, with answers known by construction.

The shapes task (``synthetic.make_scene``) never forces a choice: at most five content
tokens, so keep 0.1 holds them all. Here, on the same 12 x 12 grid of 14 px patches:

- Content exceeds the budget: 1-6 shapes anywhere (straddling patch borders), 10-36 px,
  plus a text box, so an image holds from 2 to about 48 content tokens (a third of the
  grid) and a fixed low ratio must drop some on dense images.
- Predictable but diverse distractors (variant ``clutter``): 4-9 patch-aligned regions,
  each a different texture (stripes of four orientations, checkers, dots, gradients; two
  of seven desaturated colours; period 7 or 14 px, dividing the patch), so every patch
  of a region is predictable from its neighbours yet unlike any other region. A
  diversity method spends budget on them; a reconstruction-trained selector should not.
  Variant ``clutter-plain`` is the same content on a bare canvas.
- A reading question: three digits in a 3 x 5 pixel font drawn at 2x (6 x 10 px glyphs)
  in a framed box of three patches on the grid; the answer is the string, digit by digit
  ("4 7 2"), so a pruning method must keep those three tokens, in order.
- Questions whose answer depends on what is asked: "what colour is the triangle ?" asks
  about a kind that occurs exactly once, so it needs that shape's tokens and nothing else.

Same (variant, seed), same pixels. Splits and seeds are the shapes task's
(``synthetic.SPLITS``), drawn with a different stream, so scenes of the two tasks differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from vllm_tokenprune.testbed.synthetic import (
    SHAPES,
    TASK_COLOURS,
    TASK_IMAGE_SIZE,
    TASK_PATCH,
    TEXTURE_COLOURS,
    Shape,
    Texture,
    paint_shapes,
    patches_touched,
)

VARIANTS = ("clutter", "clutter-plain")
COUNT_WORDS = ("one", "two", "three", "four", "five", "six")
DIGITS = "0123456789"
TEXT_LENGTH = 3
QUESTIONS = {
    "count": "how many shapes are there ?",
    "shape-colour": "what colour is the {shape} ?",
    "read": "what is written in the box ?",
}
TEXTURES = ("hstripes", "vstripes", "diagonal", "antidiagonal", "checker", "dots", "hgradient", "vgradient")
MAX_CONTENT = TASK_IMAGE_SIZE ** 2 // TASK_PATCH ** 2 // 3  # content tokens at most: a third of the grid
SHAPE_SIZES = (10, 36)  # px, log-uniform
GAP = 3  # px between any two drawn things, so counts and boxes are unambiguous
INK = (20, 20, 20)

# 3 x 5 glyphs, rows top to bottom.
_FONT = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
}
GLYPH_SCALE = 2  # 6 x 10 px glyphs
# The box is TEXT_LENGTH patches in a row on the patch grid, one glyph centred in each: a
# digit is one token. (Glyphs at any pixel offset, read across patch borders, stayed at
# chance for 1500 steps of the demo model while everything else was being learned.)
GLYPH_OFFSET = ((TASK_PATCH - 3 * GLYPH_SCALE) // 2, (TASK_PATCH - 5 * GLYPH_SCALE) // 2)


def glyph(ch: str) -> np.ndarray:
    """(10, 6) bool: the pixels a digit inks."""
    bits = np.array([[c == "1" for c in row] for row in _FONT[ch]])
    return bits.repeat(GLYPH_SCALE, 0).repeat(GLYPH_SCALE, 1)


def glyph_origins(box: tuple[int, int, int, int], length: int = TEXT_LENGTH) -> list[tuple[int, int]]:
    """(x, y) of each glyph's top-left pixel in a box at ``box``."""
    x0, y0 = box[0] + GLYPH_OFFSET[0], box[1] + GLYPH_OFFSET[1]
    return [(x0 + i * TASK_PATCH, y0) for i in range(length)]


@dataclass
class ClutterScene:
    image: Image.Image
    shapes: list[Shape]
    textures: list[Texture]
    text: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive, the frame
    asked_shape: str  # a kind that occurs exactly once: the shape-colour question's subject
    ink: np.ndarray  # (H, W) bool: pixels of shapes and of the box

    def question(self, kind: str) -> str:
        if kind not in QUESTIONS:
            raise ValueError(f"unknown question {kind!r}; choose one of {', '.join(QUESTIONS)}")
        return QUESTIONS[kind].format(shape=self.asked_shape)

    def answer(self, kind: str) -> str:
        if kind == "count":
            return COUNT_WORDS[len(self.shapes) - 1]
        if kind == "shape-colour":
            return next(s.colour for s in self.shapes if s.kind == self.asked_shape)
        if kind == "read":
            return " ".join(self.text)
        raise ValueError(f"unknown question {kind!r}; choose one of {', '.join(QUESTIONS)}")

    def content_patches(self, patch: int = TASK_PATCH) -> np.ndarray:
        """(rows, cols) bool: patches holding any shape or box pixel."""
        return patches_touched(self.ink, patch)

    def patches_of(self, kind: str, patch: int = TASK_PATCH) -> np.ndarray:
        """(rows, cols) bool: the patches question ``kind`` needs (all shapes, the asked
        shape, or the box)."""
        mask = np.zeros_like(self.ink)
        if kind == "read":
            x0, y0, x1, y1 = self.box
            mask[y0:y1 + 1, x0:x1 + 1] = True
        else:
            for s in self.shapes:
                if kind == "count" or s.kind == self.asked_shape:
                    x0, y0, x1, y1 = s.box
                    mask[y0:y1 + 1, x0:x1 + 1] = True
        return patches_touched(mask & self.ink, patch)


def _texture_pixels(kind: str, a: np.ndarray, b: np.ndarray, period: int, x0: int, y0: int,
                    width: int, height: int) -> np.ndarray:
    """(height, width, 3) pixels. Periodic kinds use absolute coordinates and a period that
    divides the patch, so all whole patches of a patch-aligned region are the same."""
    ys, xs = np.mgrid[y0:y0 + height, x0:x0 + width]
    half = period / 2
    if kind == "hgradient":
        t = (xs - x0) / max(width - 1, 1)
    elif kind == "vgradient":
        t = (ys - y0) / max(height - 1, 1)
    elif kind == "hstripes":
        t = (ys % period) < half
    elif kind == "vstripes":
        t = (xs % period) < half
    elif kind == "diagonal":
        t = ((xs + ys) % period) < half
    elif kind == "antidiagonal":
        t = ((xs - ys) % period) < half
    elif kind == "checker":
        t = ((xs // int(half) + ys // int(half)) % 2) == 0
    else:  # dots: a square dot per period cell
        t = ((xs % period) < half - 1) & ((ys % period) < half - 1)
    t = np.asarray(t, np.float32)[..., None]
    return t * a + (1 - t) * b


def _place_textures(rng: np.random.Generator, taken: np.ndarray) -> list[tuple[Texture, tuple, int]]:
    """4-9 non-overlapping patch-aligned regions of 2-4 patches a side, <= 40% of the grid,
    clear of the ``taken`` cells, each a different (kind, colour pair, period):
    (Texture, colour indices, period)."""
    grid = len(taken)
    area = 0
    styles = [(k, i, j, p) for k in TEXTURES for i in range(len(TEXTURE_COLOURS))
              for j in range(len(TEXTURE_COLOURS)) if i < j for p in (TASK_PATCH, TASK_PATCH // 2)]
    chosen = rng.permutation(len(styles))
    placed = []
    for n in range(int(rng.integers(4, 10))):
        for _try in range(100):
            w, h = (int(v) for v in rng.integers(2, 5, size=2))
            c0, r0 = int(rng.integers(0, grid - w + 1)), int(rng.integers(0, grid - h + 1))
            if taken[r0:r0 + h, c0:c0 + w].any() or area + w * h > 0.4 * grid * grid:
                continue
            taken[r0:r0 + h, c0:c0 + w] = True
            area += w * h
            kind, i, j, period = styles[int(chosen[n])]
            if rng.integers(2):
                i, j = j, i
            placed.append((Texture(kind, (c0, r0, c0 + w, r0 + h)), (i, j), period))
            break
    return placed


def _shape_kinds(rng: np.random.Generator, n: int) -> tuple[list[str], str]:
    """n kinds of which at least one occurs exactly once, and one such kind to ask about."""
    while True:
        kinds = [SHAPES[int(i)] for i in rng.integers(len(SHAPES), size=n)]
        once = [k for k in SHAPES if kinds.count(k) == 1]
        if once:
            return kinds, once[int(rng.integers(len(once)))]


class _Canvas:
    """Free pixels (with a GAP margin around everything placed) and the content patches so far."""

    def __init__(self, size: int, blocked: np.ndarray):
        self.free = ~blocked
        self.content = np.zeros((size // TASK_PATCH, size // TASK_PATCH), bool)
        self.size = size

    def try_place(self, rng: np.random.Generator, w: int, h: int, budget: int) -> tuple[int, int] | None:
        """A random position where a w x h box fits the free pixels and keeps the content
        patches within ``budget``; marks it taken. None after 200 tries."""
        for _ in range(200):
            x0, y0 = int(rng.integers(0, self.size - w + 1)), int(rng.integers(0, self.size - h + 1))
            if not self.free[y0:y0 + h, x0:x0 + w].all():
                continue
            if self.content.sum() + (~self.content[_cells(x0, y0, w, h)]).sum() > budget:
                continue
            self.take(x0, y0, w, h)
            return x0, y0
        return None

    def take(self, x0: int, y0: int, w: int, h: int) -> None:
        self.content[_cells(x0, y0, w, h)] = True
        self.free[max(0, y0 - GAP):y0 + h + GAP, max(0, x0 - GAP):x0 + w + GAP] = False


def _cells(x0: int, y0: int, w: int, h: int) -> tuple[slice, slice]:
    """The (rows, cols) patch cells a w x h pixel box at (x0, y0) touches."""
    return (slice(y0 // TASK_PATCH, (y0 + h - 1) // TASK_PATCH + 1),
            slice(x0 // TASK_PATCH, (x0 + w - 1) // TASK_PATCH + 1))


def make_clutter_scene(variant: str, seed: int, *, size: int = TASK_IMAGE_SIZE, noise_std: float = 4.0) -> ClutterScene:
    """The scene of ``seed`` (``synthetic.scene_seed``) in ``variant``; same arguments, same pixels."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    rng = np.random.default_rng([seed, 2 + VARIANTS.index(variant)])
    grid = size // TASK_PATCH
    text = "".join(DIGITS[int(d)] for d in rng.integers(len(DIGITS), size=TEXT_LENGTH))
    col, row = int(rng.integers(0, grid - TEXT_LENGTH + 1)), int(rng.integers(0, grid))
    box_cells = np.zeros((grid, grid), bool)
    box_cells[row, col:col + TEXT_LENGTH] = True
    textures = _place_textures(rng, box_cells.copy()) if variant == "clutter" else []
    blocked = np.zeros((size, size), bool)
    for t, _, _ in textures:
        c0, r0, c1, r1 = t.cells
        blocked[max(0, r0 * TASK_PATCH - GAP):r1 * TASK_PATCH + GAP,
                max(0, c0 * TASK_PATCH - GAP):c1 * TASK_PATCH + GAP] = True
    canvas = _Canvas(size, blocked)
    x0, y0 = col * TASK_PATCH, row * TASK_PATCH
    canvas.take(x0, y0, TEXT_LENGTH * TASK_PATCH, TASK_PATCH)
    box = (x0, y0, x0 + TEXT_LENGTH * TASK_PATCH - 1, y0 + TASK_PATCH - 1)

    kinds, asked = _shape_kinds(rng, int(rng.integers(1, len(COUNT_WORDS) + 1)))
    colours = list(TASK_COLOURS)
    shapes = []
    log_lo, log_hi = np.log(SHAPE_SIZES[0]), np.log(SHAPE_SIZES[1])
    for i, kind in enumerate(kinds):
        side = int(round(np.exp(rng.uniform(log_lo, log_hi))))
        budget = MAX_CONTENT - 4 * (len(kinds) - i - 1)  # a smallest shape covers <= 4 patches
        while (at := canvas.try_place(rng, side, side, budget)) is None:
            if side == SHAPE_SIZES[0]:
                raise RuntimeError(f"no room for {len(kinds)} shapes in {variant} scene {seed}")
            side = max(SHAPE_SIZES[0], int(side * 0.8))
        colour = colours[int(rng.integers(len(colours)))]
        shapes.append(Shape(kind, colour, (at[0], at[1], at[0] + side - 1, at[1] + side - 1)))

    pixels = np.empty((size, size, 3), np.float32)
    pixels[:] = rng.integers(235, 256, size=3)  # near-white with a slight random tint
    for t, (i, j), period in textures:
        c0, r0, c1, r1 = t.cells
        x0, y0, w, h = c0 * TASK_PATCH, r0 * TASK_PATCH, (c1 - c0) * TASK_PATCH, (r1 - r0) * TASK_PATCH
        pixels[y0:y0 + h, x0:x0 + w] = _texture_pixels(
            t.kind, np.array(TEXTURE_COLOURS[i], np.float32), np.array(TEXTURE_COLOURS[j], np.float32),
            period, x0, y0, w, h)
    x0, y0, x1, y1 = box
    pixels[y0:y1 + 1, x0:x1 + 1] = INK
    pixels[y0 + 1:y1, x0 + 1:x1] = 255
    for ch, (gx, gy) in zip(text, glyph_origins(box)):
        ink_of = glyph(ch)
        pixels[gy:gy + ink_of.shape[0], gx:gx + ink_of.shape[1]][ink_of] = INK
    image, ink = paint_shapes(pixels, shapes, rng, noise_std, ink_boxes=(box,))
    return ClutterScene(image, shapes, [t for t, _, _ in textures], text, box, asked, ink)
