"""Where tokens sit: ``Tokens.grids`` lists the N tokens as row-major grids, in order."""

from __future__ import annotations

import torch


def offsets(grids: tuple[tuple[int, int], ...]) -> list[int]:
    """Index of each grid's first token."""
    starts, total = [], 0
    for rows, cols in grids:
        starts.append(total)
        total += rows * cols
    return starts


def neighbours(index: torch.Tensor, grids: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The tokens above, below, left and right of each token of ``index`` within its grid
    (fewer at grid borders), ascending and without repeats; may include ``index`` itself."""
    found = [index[:0]]
    for start, (rows, cols) in zip(offsets(grids), grids):
        local = index[(index >= start) & (index < start + rows * cols)] - start
        r, c = local // cols, local % cols
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            inside = (r + dr >= 0) & (r + dr < rows) & (c + dc >= 0) & (c + dc < cols)
            found.append((start + (r + dr) * cols + (c + dc))[inside])
    return torch.cat(found).unique()
