"""Features of images whose token counts differ, and the padded batches the models run on.

Qwen's processors keep each image near its own size and aspect, so its merged grid, and
with it N, differs from image to image; LLaVA's images all have the same grid. Both are
held the same way: every image's tokens one after the other (T, D), and each image's
token grid (rows, cols), N_i = rows * cols. For the selector and the reconstructor a batch
is padded to its longest image, with a mask of the padding that attention, the loss and
top-K selection leave out (``Padded``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence


@dataclass
class RaggedFeatures:
    """Features of B images: ``tokens`` (T, D), image after image in row-major order, and
    ``grids`` (B, 2) int64, each image's (rows, cols); T = sum of rows * cols.

    Tokens that form no grid (e.g. LLaVA with CLS kept) are one row of N.
    """

    tokens: torch.Tensor
    grids: torch.Tensor

    def __post_init__(self):
        if self.tokens.dim() != 2 or self.grids.dim() != 2 or self.grids.shape[1] != 2:
            raise ValueError(f"expected tokens (T, D) and grids (B, 2), got {tuple(self.tokens.shape)} "
                             f"and {tuple(self.grids.shape)}")
        if int(self.lengths.sum()) != len(self.tokens):
            raise ValueError(f"grids hold {int(self.lengths.sum())} tokens, not {len(self.tokens)}")

    @classmethod
    def stack(cls, features: torch.Tensor, grid: Sequence[int] | None = None) -> RaggedFeatures:
        """Images of equal N (B, N, D); ``grid`` (rows, cols) or None for one row of N."""
        b, n, d = features.shape
        rows, cols = (1, n) if grid is None else grid
        return cls(features.reshape(b * n, d), torch.tensor([[rows, cols]] * b, dtype=torch.int64))

    @classmethod
    def cat(cls, parts: Sequence[RaggedFeatures]) -> RaggedFeatures:
        if len(parts) == 1:
            return parts[0]
        return cls(torch.cat([p.tokens for p in parts]), torch.cat([p.grids for p in parts]))

    @property
    def lengths(self) -> torch.Tensor:
        """N_i of every image (B,), int64 on the CPU."""
        return self.grids.cpu().prod(dim=1)

    @property
    def feature_dim(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return len(self.grids)

    def _offsets(self) -> list[int]:
        return [0, *self.lengths.cumsum(0).tolist()]

    def __getitem__(self, index):
        """An int: that image's tokens (N_i, D). Indices (a list, tensor or slice): those
        images, in that order."""
        offsets = self._offsets()
        if isinstance(index, int):
            i = range(len(self))[index]
            return self.tokens[offsets[i]:offsets[i + 1]]
        ids = list(range(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index).tolist())
        rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in ids] or [torch.zeros(0, dtype=torch.int64)])
        return RaggedFeatures(self.tokens[rows.to(self.tokens.device)], self.grids[ids])

    def __iter__(self):
        return iter(self.tokens.split(self.lengths.tolist()))

    def to(self, device, **kwargs) -> RaggedFeatures:
        """The tokens moved (``Tensor.to`` arguments); the grids stay on the CPU, where their
        sizes are read."""
        return RaggedFeatures(self.tokens.to(device, **kwargs), self.grids)

    def padded(self) -> Padded:
        """The images as one batch (B, max N, D) on the tokens' device, padded at the end."""
        lengths = self.lengths
        n, b = int(lengths.max()), len(self)
        if bool((lengths == n).all()):  # no padding: the unmasked attention kernels run
            return Padded(self.tokens.reshape(b, n, -1), None, self.grids)
        x = pad_sequence(list(self), batch_first=True)
        padding = torch.arange(n)[None] >= lengths[:, None]
        return Padded(x, padding.to(x.device), self.grids)


@dataclass
class Padded:
    """A padded batch: ``x`` (B, N, D), ``padding`` (B, N) True at padding or None where
    every image has N tokens, ``grids`` (B, 2) each image's (rows, cols)."""

    x: torch.Tensor
    padding: torch.Tensor | None
    grids: torch.Tensor

    def __getitem__(self, rows: slice) -> Padded:
        """Some of the images (a slice of the batch), as padded as the whole."""
        return Padded(self.x[rows], None if self.padding is None else self.padding[rows], self.grids[rows])

    @property
    def lengths(self) -> list[int]:
        return self.grids.prod(dim=1).tolist()


def real_tokens(padding: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """1.0 at real tokens, 0.0 at padding, shaped as ``like`` (B, N)."""
    if padding is None:
        return torch.ones_like(like, dtype=torch.float32)
    return (~padding).float()
