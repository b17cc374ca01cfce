"""The budget predictor behind ``X-Keep-Ratio: auto``: an image's pixels -> its kept fraction.

vLLM fixes every image's placeholder count in the processor, before the tower runs, so
an image-dependent K has to be predicted from the image itself, in the API server, on its
CPU. The predictor reads a fixed 64 x 64 thumbnail of the whole image (``thumbnail``), so
its cost does not grow with the image's resolution, plus the image's token count N (Qwen's
dynamic resolution: the same content at more tokens needs a smaller fraction), and
returns a fraction in (0, 1). The processor turns it into K with ``policy.keep_count``,
like any ratio.

Architecture: three strided 3 x 3 convolutions (64 -> 32 -> 16 -> 8), global mean
pooling, then a small MLP that also reads log N. The mean over positions makes it
count local evidence ("how much of the image holds detail"), which is what the number of
tokens worth keeping follows. About 15k parameters; well under a millisecond per image on
one core (``benchmarks/budget_cost.py``).

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

from vllm_tokenprune.selection.selector import SelectorCheckpointError, read_checkpoint, section_header

SECTION = "budget_predictor"  # the checkpoint header key of the predictor's section
SECTION_VERSION = 1
PREFIX = "budget."  # its tensors' names in the checkpoint
THUMBNAIL = 64  # side of the square thumbnail the predictor reads
# Fractions are kept away from 0 so that they are always a valid keep ratio.
MIN_FRACTION = 1e-4


def thumbnail(image) -> torch.Tensor:
    """(3, THUMBNAIL, THUMBNAIL) float32 in [0, 1]: the whole image, squashed to a square.

    The same function prepares training images and served ones, so the predictor sees
    the same input for the same picture. PIL's ``reducing_gap`` first shrinks by an
    integer factor (a cheap box filter), then resamples bilinearly: the cost stays small
    for large images and the result is deterministic.
    """
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))  # vLLM's (H, W, C) arrays
    if image.mode != "RGB":
        image = image.convert("RGB")
    small = image.resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR, reducing_gap=2.0)
    pixels = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8)
    return pixels.view(THUMBNAIL, THUMBNAIL, 3).permute(2, 0, 1).float().div_(255)


@dataclass
class BudgetConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 32])  # per strided convolution
    hidden: int = 32  # MLP width
    # log N of the training images (fewest, most tokens): N enters standardized to this
    # range and clamped to it, so an unseen N (another family's layout) is never extrapolated.
    log_tokens: list[float] = field(default_factory=lambda: [0.0, 0.0])


class BudgetPredictor(nn.Module):
    def __init__(self, config: BudgetConfig):
        super().__init__()
        self.config = config
        layers, width = [], 3
        for channels in config.channels:
            layers += [nn.Conv2d(width, channels, 3, stride=2, padding=1), nn.ReLU()]
            width = channels
        self.convs = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(width + 1, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1))

    def _tokens_input(self, num_tokens: torch.Tensor) -> torch.Tensor:
        low, high = self.config.log_tokens
        if high <= low:  # every training image had one N: the input carries nothing
            return torch.zeros(len(num_tokens), 1)
        z = (num_tokens.float().log() - (low + high) / 2) / ((high - low) / 2)
        return z.clamp(-1.0, 1.0)[:, None]

    def forward(self, thumbnails: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """thumbnails (B, 3, S, S) in [0, 1], num_tokens (B,) -> logits (B,)."""
        pooled = self.convs(thumbnails - 0.5).mean(dim=(2, 3))
        return self.head(torch.cat([pooled, self._tokens_input(num_tokens)], dim=1))[:, 0]

    @torch.inference_mode()
    def fractions(self, images, num_tokens) -> list[float]:
        """Each image's predicted kept fraction, in [MIN_FRACTION, 1]."""
        x = torch.stack([thumbnail(image) for image in images])
        p = torch.sigmoid(self(x, torch.as_tensor(num_tokens, dtype=torch.int64)))
        return [min(1.0, max(MIN_FRACTION, float(v))) for v in p]


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
    header = section_header(path, meta, SECTION, SECTION_VERSION, "budget predictor")
    if header is None:
        return None
    try:
        predictor = BudgetPredictor(BudgetConfig(**header["config"]))
        predictor.load_state_dict({k.removeprefix(PREFIX): v for k, v in tensors.items() if k.startswith(PREFIX)},
                                  strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise SelectorCheckpointError(f"{path}: cannot rebuild the budget predictor: {e}") from e
    if not all(bool(torch.isfinite(p).all()) for p in predictor.parameters()) or not all(
            math.isfinite(v) for v in predictor.config.log_tokens):
        raise SelectorCheckpointError(f"{path}: the budget predictor holds non-finite weights")
    return predictor.eval(), header
