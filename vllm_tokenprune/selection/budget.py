"""The budget predictor behind ``X-Keep-Ratio: auto``: an image's pixels -> its kept fraction.

vLLM fixes every image's placeholder count in the processor, before the tower runs, so
an image-dependent K has to be predicted from the image itself, in the API server, on its
CPU. The predictor reads a fixed 64 x 64 thumbnail of the whole image (``thumbnail``;
making it reads each pixel once, all after costs the same at any resolution) and the
image's token count N (Qwen's dynamic resolution: the same content at more tokens needs a
smaller fraction), and returns a fraction in (0, 1). The processor turns it into K with
``policy.keep_count``, like any ratio.

Architecture: the thumbnail is cut into an 8 x 8 grid of cells, and each cell described by
fixed statistics (``cell_features``: how far its colour lies from the image's, its spread,
and how much it changes from pixel to pixel, across and down); a small MLP shared by all
cells scores them, the mean over cells and log N go through a second MLP. The mean makes
it count local evidence ("how much of the image holds detail"), which is what the number
of tokens worth keeping follows. About 3k parameters.

Serving runs its forward as one compiled pass on the calling thread (``fractions``,
``budget_kernel``): a PyTorch convolution or matrix product hands even this little work to
the intra-op thread pool, whose threads wake, spin and wait on every call, and in an API
server with one pool thread per core that costs more CPU than the arithmetic
(``benchmarks/budget_cost.py``). Training uses the same weights as a PyTorch module; a test
holds the two forwards equal.

It is trained by ``training.budget`` after the selector, and ships in the selector's
checkpoint as its own section (tensors ``budget.*``, header key ``budget_predictor``
with its own ``format_version``). Checkpoints without that section load as before and
have no predictor; servers that predate it ignore the section.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vllm_tokenprune.selection.selector import (
    SelectorCheckpointError,
    float32_on_cpu,
    read_checkpoint,
    section_header,
)

SECTION = "budget_predictor"  # the checkpoint header key of the predictor's section
SECTION_VERSION = 3  # 3: the thumbnail is an area mean (2: bilinear after the box reduction)
PREFIX = "budget."  # its tensors' names in the checkpoint
THUMBNAIL = 64  # side of the square thumbnail the predictor reads
CELLS = 8  # cells per side of the thumbnail
FEATURES = 12  # statistics per cell (``cell_features``)
# Fractions are kept away from 0 so that they are always a valid keep ratio.
MIN_FRACTION = 1e-4


def reduced(image) -> np.ndarray:
    """(H, W, 3) uint8 with THUMBNAIL <= H, W < 2 * THUMBNAIL (or the image's own side where
    it is smaller): the image box-averaged by the largest integer factor per side that stays
    above the thumbnail (PIL's ``reduce``: one pass over the pixels, whatever their number)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))  # vLLM's (H, W, C) arrays
    if image.mode != "RGB":
        image = image.convert("RGB")
    factor = (max(1, image.width // THUMBNAIL), max(1, image.height // THUMBNAIL))
    return np.asarray(image.reduce(factor) if factor != (1, 1) else image)


def thumbnail(image) -> np.ndarray:
    """(THUMBNAIL, THUMBNAIL, 3) uint8: the whole image, squashed to a square, each pixel
    the mean of the area it covers (``reduced``, then ``budget_kernel.area_resample``).

    The same steps prepare training images and served ones, so the predictor sees the same
    input for the same picture; they are deterministic, and their cost stays small for
    large images.
    """
    from vllm_tokenprune.selection.budget_kernel import area_resample

    return area_resample(reduced(image), THUMBNAIL)


def cell_features(thumbnails: np.ndarray) -> np.ndarray:
    """(B, CELLS * CELLS, FEATURES) float32 from uint8 thumbnails (B, S, S, 3): per cell and
    colour channel how far its mean lies from the whole image's, its standard deviation, and
    the mean absolute difference of neighbouring pixels across and down (the last column and
    row repeat their neighbour). How much stands out, never which colour: a predictor
    trained on one palette must not read an image of another (a black one among grey
    scenes) as dense."""
    from vllm_tokenprune.selection.budget_kernel import cell_statistics  # what serving computes

    out = np.empty((len(thumbnails), CELLS * CELLS, FEATURES), np.float32)
    for i, t in enumerate(thumbnails):
        out[i] = cell_statistics(t, CELLS)
    return out


@dataclass
class BudgetConfig:
    hidden: int = 32  # width of both MLPs
    # log N of the training images (fewest, most tokens): N enters standardized to this
    # range and clamped to it, so an unseen N (another family's layout) is never extrapolated.
    log_tokens: list[float] = field(default_factory=lambda: [0.0, 0.0])


class BudgetPredictor(nn.Module):
    def __init__(self, config: BudgetConfig):
        super().__init__()
        self.config = config
        # The training cells' feature statistics: inputs enter clipped to the range seen in
        # training (an unlike image, e.g. a blank one among textured scenes, is read as the
        # nearest seen, never extrapolated), then standardized.
        self.register_buffer("feature_low", torch.full((FEATURES,), -math.inf))
        self.register_buffer("feature_high", torch.full((FEATURES,), math.inf))
        self.register_buffer("feature_mean", torch.zeros(FEATURES))
        self.register_buffer("feature_std", torch.ones(FEATURES))
        self.cell = nn.Sequential(nn.Linear(FEATURES, config.hidden), nn.ReLU(),
                                  nn.Linear(config.hidden, config.hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(config.hidden + 1, config.hidden), nn.ReLU(),
                                  nn.Linear(config.hidden, 1))
        self._served_params: np.ndarray | None = None

    def token_input(self, num_tokens: int) -> float:
        """log N standardized to the training range, clamped to it."""
        low, high = self.config.log_tokens
        if high <= low:  # every training image had one N: the input carries nothing
            return 0.0
        return min(1.0, max(-1.0, (math.log(num_tokens) - (low + high) / 2) / ((high - low) / 2)))

    def tokens_input(self, num_tokens) -> np.ndarray:
        """(B, 1) float32: ``token_input`` of each N."""
        return np.array([[self.token_input(n)] for n in num_tokens], np.float32).reshape(-1, 1)

    def forward(self, features: torch.Tensor, num_tokens) -> torch.Tensor:
        """features (B, cells, FEATURES) from ``cell_features``, num_tokens (B,) -> logits (B,)."""
        x = torch.minimum(torch.maximum(features, self.feature_low), self.feature_high)
        pooled = self.cell((x - self.feature_mean) / self.feature_std).mean(dim=1)
        tokens = torch.from_numpy(self.tokens_input(num_tokens)).to(pooled)
        return self.head(torch.cat([pooled, tokens], dim=1))[:, 0]

    def _kernel_params(self) -> np.ndarray:
        """The weights flattened into one float32 array in ``budget_kernel.fraction``'s order:
        read at the first served call and kept (a served predictor never changes)."""
        if self._served_params is None:
            self._served_params = torch.cat([t.detach().cpu().float().reshape(-1) for t in (
                self.feature_low, self.feature_high, self.feature_mean, self.feature_std, self.cell[0].weight,
                self.cell[0].bias, self.cell[2].weight, self.cell[2].bias, self.head[0].weight, self.head[0].bias,
                self.head[2].weight, self.head[2].bias)]).numpy()
        return self._served_params

    def warm_up(self) -> None:
        """Compile (or load) the served kernel now, on a blank thumbnail."""
        self.fractions([np.zeros((THUMBNAIL, THUMBNAIL, 3), np.uint8)], [1])

    def fractions(self, images, num_tokens) -> list[float]:
        """Each image's predicted kept fraction, in [MIN_FRACTION, 1] (serving: the compiled
        ``budget_kernel``, single-threaded; its first call in a process compiles or loads it)."""
        from vllm_tokenprune.selection.budget_kernel import fraction

        params, hidden = self._kernel_params(), self.config.hidden
        return [fraction(reduced(image), THUMBNAIL, self.token_input(n), CELLS, hidden, params, MIN_FRACTION)
                for image, n in zip(images, num_tokens, strict=True)]


def section(predictor: BudgetPredictor, info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checkpoint header section and tensors of a trained predictor; ``info`` (JSON)
    says what it was trained to predict and how well it does (``training.budget``)."""
    header = {"format_version": SECTION_VERSION, "config": asdict(predictor.config), **info}
    tensors = {PREFIX + k: v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()}
    return header, tensors


def load_budget_predictor(path: str | Path) -> tuple[BudgetPredictor, dict[str, Any]] | None:
    """The predictor in a selector checkpoint (eval mode) and its header section, or None
    when the checkpoint has none. Raises SelectorCheckpointError for a damaged one."""
    tensors, meta = read_checkpoint(path, "cpu")
    try:
        header = section_header(path, meta, SECTION, SECTION_VERSION, "budget predictor")
    except SelectorCheckpointError as e:
        raise SelectorCheckpointError(f"{e}: refit it with `vllm-tokenprune train --model MODEL --images DIR "
                                      f"--out {path} --budget-only` (the selector stays)") from None
    if header is None:
        return None
    try:
        with float32_on_cpu():  # served on the CPU, in the processor
            predictor = BudgetPredictor(BudgetConfig(**header["config"]))
        predictor.load_state_dict({k.removeprefix(PREFIX): v for k, v in tensors.items() if k.startswith(PREFIX)},
                                  strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise SelectorCheckpointError(f"{path}: cannot rebuild the budget predictor: {e}") from e
    weights = predictor.state_dict()
    bounds = ("feature_low", "feature_high")  # infinite where a feature is not clipped
    if not all(bool(torch.isfinite(t).all()) or (name in bounds and not bool(t.isnan().any()))
               for name, t in weights.items()) or not all(
            math.isfinite(v) for v in predictor.config.log_tokens) or not bool((predictor.feature_std > 0).all()):
        raise SelectorCheckpointError(f"{path}: the budget predictor holds non-finite weights")
    return predictor.eval(), header
