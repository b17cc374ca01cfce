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


def with_neighbours(index: torch.Tensor, grids: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """(N,) True at the tokens of ``index`` and at those above, below, left and right of
    each within its grid. A mask, not a list: its size never depends on the data."""
    n = sum(rows * cols for rows, cols in grids)
    mask = torch.zeros(n, dtype=torch.bool, device=index.device).index_fill_(0, index, True)
    for start, (rows, cols) in zip(offsets(grids), grids):
        inside = (index >= start) & (index < start + rows * cols)
        r, c = (index - start) // cols, (index - start) % cols
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            ok = inside & (r + dr >= 0) & (r + dr < rows) & (c + dc >= 0) & (c + dc < cols)
            # A neighbour outside the grid marks the token itself, already marked.
            mask.index_fill_(0, torch.where(ok, index + dr * cols + dc, index), True)
    return mask
