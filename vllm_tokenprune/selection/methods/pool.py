"""Average pooling of the token grid to exactly K tokens, for any K.

Each grid of an image (one for LLaVA-1.5 and Qwen, the base crop and the unpadded anyres
grid for LLaVA-NeXT) gets a share of K proportional to its token count (largest
remainders). A grid of H x W tokens pooled to k cells is cut into r horizontal bands,
r = sqrt(k H / W) rounded and clamped to [ceil(k / W), min(H, k)] so that cells come out
about square, every band at least one token high and every cell at least one token wide;
band i holds floor((i + 1) k / r) - floor(i k / r) cells. Band and cell edges are
floor(i H / r) and floor(j W / c), so the cells partition the grid: every token is
averaged into exactly one cell. A cell sits at the position of its central token (the
top-left one of the middle four when its sides are even), so cells keep row-major order.
At keep 0.25 on a 24 x 24 grid this is exactly 2 x 2 average pooling (12 bands of 12).
"""

from __future__ import annotations

import math

import torch

from vllm_tokenprune.selection.methods import Method, Rows, Tokens, per_image
from vllm_tokenprune.selection.methods.grid import offsets


def shares(k: int, sizes: list[int]) -> list[int]:
    """k split over parts of the given sizes in proportion (largest remainders, earlier
    parts first on ties); no part gets more than its size when k <= sum(sizes)."""
    total = sum(sizes)
    quotas = [k * size / total for size in sizes]
    out = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (out[i] - quotas[i], i))
    for i in by_remainder[: k - sum(out)]:
        out[i] += 1
    return out


def cells(rows: int, cols: int, k: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A rows x cols grid pooled to k cells: (cell of each token (rows * cols,), position
    of each cell's central token (k,)), both row-major; computed on ``device``."""
    bands = min(rows, k, max(math.ceil(k / cols), round(math.sqrt(k * rows / cols))))

    def part(i, n, parts):  # start of part i of n items split at floor(i * n / parts)
        return i * n // parts

    def part_of(x, n, parts):  # the part item x falls in: the last i with part(i) <= x
        return ((x + 1) * parts + n - 1) // n - 1

    # Token (y, x): band b, cell j of that band's c cells.
    y, x = torch.arange(rows, device=device)[:, None], torch.arange(cols, device=device)[None, :]
    b = part_of(y, rows, bands)
    c = part(b + 1, k, bands) - part(b, k, bands)
    cell_of = part(b, k, bands) + part_of(x, cols, c)
    # Cell m: its band and its index in the band give its central token.
    m = torch.arange(k, device=device)
    b = part_of(m, k, bands)
    c = part(b + 1, k, bands) - part(b, k, bands)
    j = m - part(b, k, bands)
    centre_row = (part(b, rows, bands) + part(b + 1, rows, bands) - 1) // 2
    centre_col = (part(j, cols, c) + part(j + 1, cols, c) - 1) // 2
    return cell_of.flatten(), centre_row * cols + centre_col


def _keep(tokens: Tokens, k: int) -> Rows:
    device = tokens.values.device
    groups, index, first = [], [], 0
    for start, (rows, cols), share in zip(offsets(tokens.grids), tokens.grids,
                                          shares(k, [r * c for r, c in tokens.grids])):
        if share == 0:
            groups.append(torch.full((rows * cols,), -1, dtype=torch.long, device=device))
            continue
        cell_of, centres = cells(rows, cols, share, device)
        groups.append(cell_of + first)
        index.append(centres + start)
        first += share
    return tokens.merge(torch.cat(index), torch.cat(groups))


pool = Method("pool", per_image(_keep))
