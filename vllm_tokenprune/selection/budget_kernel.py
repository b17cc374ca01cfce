"""The budget predictor's compiled parts (Numba, a vLLM dependency): the thumbnail's last
step, and the served forward.

The predictor runs in the API server on every ``auto`` image, where its CPU time is the
whole cost of ``auto``. There, after the HF processor, caches are cold and every NumPy call
costs several times what it does in a warm loop; PyTorch would hand the work to its
intra-op thread pool. So a served image costs one PIL call (the integer box reduction) and
one call of ``fraction``, on the calling thread, which resamples the reduced image to the
thumbnail, sums the cell statistics in one vectorized pass of integers and runs both MLPs
as plain loops.

``area_resample`` is all-integer, so a thumbnail is the same on every machine; ``fraction``
computes what ``budget.cell_features``, ``BudgetPredictor.forward`` and a sigmoid compute
(a test holds them equal). Its reassociation is allowed (the sums vectorize); infinities
are not assumed away, because an unclipped feature's bounds are infinite.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def _compile(function=None, *, fastmath=_FASTMATH):
    """Compiled on the first call, cached on disk when a cache folder is writable (a later
    process loads it in a fraction of the compile time), compiled per process otherwise."""
    if function is None:
        return lambda f: _compile(f, fastmath=fastmath)
    try:
        return numba.njit(cache=True, nogil=True, fastmath=fastmath)(function)
    except RuntimeError:  # numba: "no locator available", no writable cache folder
        return numba.njit(cache=False, nogil=True, fastmath=fastmath)(function)


@_compile
def _overlaps(length, side):
    """Area resampling of ``length`` pixels to ``side`` (``length`` < 2 * ``side``, what the
    box reduction leaves): output o covers [o * length, (o + 1) * length) and input i
    [i * side, (i + 1) * side), in units of 1 / side, so the weights are integers summing to
    ``length``, and an output overlaps at most three inputs. Returns each output's first
    input (moved back where three would run past the end) and (side, 3) int32 weights."""
    first = np.empty(side, np.int64)
    weights = np.zeros((side, 3), np.int32)
    for o in range(side):
        start, end = o * length, (o + 1) * length
        first[o] = min(start // side, max(0, length - 3))
        for j in range(min(3, length)):
            i = first[o] + j
            weights[o, j] = max(0, min(end, (i + 1) * side) - max(start, i * side))
    return first, weights


@_compile(fastmath=False)
def area_resample(image, side):
    """(H, W, 3) uint8 with H, W < 2 * side -> (side, side, 3) uint8: each output pixel the
    mean of the input area it covers, rounded half up. Integer sums, one exact division."""
    height, width = image.shape[0], image.shape[1]
    if not (0 < height < 2 * side and 0 < width < 2 * side):
        raise ValueError("area_resample reads images under twice the thumbnail's side (budget.reduced)")
    (x0, across), (y0, down) = _overlaps(width, side), _overlaps(height, side)
    rows = np.zeros((height, side * 3), np.int32)  # each input row resampled across
    for y in range(height):
        for o in range(side):
            for j in range(min(3, width)):
                w, x = across[o, j], x0[o] + j
                for c in range(3):
                    rows[y, 3 * o + c] += w * np.int32(image[y, x, c])
    out = np.empty((side, side * 3), np.uint8)
    total = np.empty(side * 3, np.int32)
    # round(total / area) half up = floor((2 total + area) / (2 area)): a quotient that is not
    # a whole number lies at least 1 / (2 area) > 3e-5 from one, so a product with the
    # rounded reciprocal, nudged by 1e-7, floors exactly.
    scale = 1 / (2 * height * width)
    for o in range(side):
        total[:] = 0
        for j in range(min(3, height)):
            w, y = down[o, j], y0[o] + j
            for k in range(side * 3):
                total[k] += w * rows[y, k]
        for k in range(side * 3):
            out[o, k] = np.uint8(math.floor((2 * total[k] + height * width) * scale + 1e-7))
    return out.reshape(side, side, 3)


@_compile
def _cell_sums(rows, cells, sums):
    """rows (S, 3S) uint8, one thumbnail's rows of interleaved RGB -> sums (cells^2, 4, 3)
    int64: per cell and channel the sum of the pixels, of their squares, and of the absolute
    differences to the next pixel across and down (the last column and row take their
    neighbour before). Each band of rows is summed column-wise first, in contiguous int32
    loops that vectorize."""
    side, width = rows.shape[0], rows.shape[1]
    step = side // cells
    total, squares = np.empty(width, np.int32), np.empty(width, np.int32)
    across, down = np.empty(width, np.int32), np.empty(width, np.int32)
    for band in range(cells):
        total[:] = 0
        squares[:] = 0
        across[:] = 0
        down[:] = 0
        for y in range(band * step, band * step + step):
            below = y + 1 if y + 1 < side else side - 2
            for k in range(width):
                v = np.int32(rows[y, k])
                total[k] += v
                squares[k] += v * v
                down[k] += abs(np.int32(rows[below, k]) - v)
            for k in range(width - 3):
                across[k] += abs(np.int32(rows[y, k + 3]) - np.int32(rows[y, k]))
            for k in range(width - 3, width):
                across[k] += abs(np.int32(rows[y, k - 3]) - np.int32(rows[y, k]))
        for cx in range(cells):
            for c in range(3):
                cell = band * cells + cx
                for k in range(3 * cx * step + c, 3 * (cx + 1) * step, 3):
                    sums[cell, 0, c] += total[k]
                    sums[cell, 1, c] += squares[k]
                    sums[cell, 2, c] += across[k]
                    sums[cell, 3, c] += down[k]


@_compile
def cell_statistics(thumbnail, cells):
    """(cells^2, 12) float32 from one (S, S, 3) uint8 thumbnail: ``budget.cell_features``
    (contrast, standard deviation, change across, change down; three channels each). From
    integer sums, so a flat image's statistics are exactly 0."""
    side = thumbnail.shape[0]
    n, pixels = cells * cells, (side // cells) ** 2
    sums = np.zeros((n, 4, 3), np.int64)
    _cell_sums(np.ascontiguousarray(thumbnail).reshape(side, side * 3), cells, sums)
    out = np.empty((n, 12), np.float32)
    image = sums[:, 0].sum(axis=0)  # (3,) the whole image's pixel sums
    for cell in range(n):
        for c in range(3):
            out[cell, c] = abs(n * sums[cell, 0, c] - image[c]) / (255 * pixels * n)
            variance = pixels * sums[cell, 1, c] - sums[cell, 0, c] ** 2  # times (255 pixels)^2, exact
            out[cell, 3 + c] = math.sqrt(variance) / (255 * pixels)
            out[cell, 6 + c] = sums[cell, 2, c] / (255 * pixels)
            out[cell, 9 + c] = sums[cell, 3, c] / (255 * pixels)
    return out


@_compile
def fraction(reduced, side, tokens, cells, hidden, params, floor):
    """One image's kept fraction in [floor, 1]: reduced (H, W, 3) uint8 (``budget.reduced``),
    side the thumbnail's, tokens the image's ``BudgetPredictor.token_input``, params the
    weights flattened in ``BudgetPredictor._kernel_params``' order."""
    x = cell_statistics(area_resample(reduced, side), cells)
    n, features = x.shape[0], x.shape[1]
    o = 4 * features
    low, high, mean, std = params[:features], params[features:2 * features], params[2 * features:3 * features], \
        params[3 * features:o]
    w1 = params[o:o + hidden * features].reshape(hidden, features)
    o += hidden * features
    b1 = params[o:o + hidden]
    w2 = params[o + hidden:o + hidden + hidden * hidden].reshape(hidden, hidden)
    o += hidden + hidden * hidden
    b2 = params[o:o + hidden]
    w3 = params[o + hidden:o + hidden + hidden * (hidden + 1)].reshape(hidden, hidden + 1)
    o += hidden + hidden * (hidden + 1)
    if o + 2 * hidden + 1 != params.size:  # no bounds checks in compiled code: a layout slip must be loud
        raise ValueError("budget predictor parameters do not match its layout")
    b3, w4, b4 = params[o:o + hidden], params[o + hidden:o + 2 * hidden], params[o + 2 * hidden]

    h1 = np.empty(hidden, np.float32)
    pooled = np.zeros(hidden, np.float32)
    for cell in range(n):
        for f in range(features):
            x[cell, f] = (min(max(x[cell, f], low[f]), high[f]) - mean[f]) / std[f]
        for h in range(hidden):
            acc = b1[h]
            for f in range(features):
                acc += w1[h, f] * x[cell, f]
            h1[h] = max(acc, np.float32(0))
        for h in range(hidden):
            acc = b2[h]
            for f in range(hidden):
                acc += w2[h, f] * h1[f]
            pooled[h] += max(acc, np.float32(0))
    pooled /= np.float32(n)
    logit = b4
    for h in range(hidden):
        acc = b3[h] + w3[h, hidden] * np.float32(tokens)
        for f in range(hidden):
            acc += w3[h, f] * pooled[f]
        logit += w4[h] * max(acc, np.float32(0))
    return min(1.0, max(floor, 1 / (1 + math.exp(-float(logit)))))
