"""Training the selector: the keep mask it samples, the reconstructor, the loss, checkpoints.

In training a two-class Gumbel-Softmax samples a hard keep/drop mask from the selector's
logits (``sample_keep_mask``) and a reconstructor must rebuild the dropped tokens from the kept
ones, so the selector learns to keep the tokens that cannot be predicted from the rest
(arXiv 2503.16660). ``save_selector`` writes the checkpoint the server reads with
``selection.selector.load_selector``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vllm_tokenprune.selection.selector import (
    DROP,
    FORMAT,
    FORMAT_VERSION,
    KEEP,
    REQUIRED_METADATA,
    RESERVED,
    TokenSelector,
    encoder_stack,
    resolve_width_and_heads,
)


@dataclass
class ReconstructorConfig:
    feature_dim: int  # D of the features it rebuilds
    width: int | None = None  # None -> min(256, feature_dim)
    num_layers: int = 2
    num_heads: int | None = None  # None -> max(1, width // 64)
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self):
        resolve_width_and_heads(self)


def sample_keep_mask(selector: TokenSelector, features: torch.Tensor, tau: float, hard: bool = True) -> torch.Tensor:
    """Training-time keep mask (B, N): a two-class Gumbel-Softmax sample.

    hard=True gives exact 0/1 values with straight-through gradients of the soft
    sample. The hard sample is argmax(logits + gumbel) whatever tau is; tau only
    shapes the gradient.
    """
    logits = selector(features).float()
    gumbel = -torch.empty_like(logits).exponential_().log()
    noisy = logits + gumbel
    soft = (noisy / tau).softmax(dim=-1)[..., KEEP]
    if not hard:
        return soft
    hard_mask = (noisy[..., KEEP] > noisy[..., DROP]).float()
    # soft - soft.detach() is exactly zero, so the values stay exactly 0/1.
    return hard_mask + (soft - soft.detach())


def sincos_position_encoding(grid_hw: tuple[int, int], dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sine-cosine encoding (h*w, dim), row-major; a quarter of dim per sin/cos of y/x."""
    h, w = grid_hw
    quarter = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys = ys.reshape(-1, 1).float() * freqs
    xs = xs.reshape(-1, 1).float() * freqs
    pe = torch.cat([ys.sin(), ys.cos(), xs.sin(), xs.cos()], dim=-1)
    return F.pad(pe, (0, dim - pe.shape[-1]))


class TokenReconstructor(nn.Module):
    """Rebuilds all N (normalized) tokens from the kept ones; used only in training.

    Dropped tokens are replaced by one shared learnable mask embedding. They carry no
    position of their own, so a fixed 2D sine-cosine encoding of the token grid is added
    to every token (any N: grid_hw=None treats the tokens as one row).
    """

    def __init__(self, config: ReconstructorConfig):
        super().__init__()
        self.config = config
        d, w = config.feature_dim, config.width
        self.mask_embedding = nn.Parameter(torch.randn(d) * 0.02)
        self.proj_in = nn.Linear(d, w)
        self.encoder = encoder_stack(w, config.num_layers, config.num_heads, config.mlp_ratio, config.dropout)
        self.proj_out = nn.Linear(w, d)

    def forward(
        self, features: torch.Tensor, keep_mask: torch.Tensor, grid_hw: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """features (B, N, D) normalized, keep_mask (B, N) in {0, 1} -> reconstruction (B, N, D)."""
        n = features.shape[1]
        grid_hw = (1, n) if grid_hw is None else tuple(grid_hw)
        if grid_hw[0] * grid_hw[1] != n:
            raise ValueError(f"grid {grid_hw} does not hold {n} tokens")
        m = keep_mask.unsqueeze(-1).to(features.dtype)
        x = self.proj_in(m * features + (1 - m) * self.mask_embedding)
        x = x + sincos_position_encoding(grid_hw, x.shape[-1], x.device).to(x.dtype)
        return self.proj_out(self.encoder(x))


# ---------------------------------------------------------------------------------------
# Loss


def dropped_mse(recon: torch.Tensor, target: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the dropped tokens (B, N, D), averaged over D: the metric."""
    drop = 1.0 - keep_mask
    per_token = (recon.float() - target.float()).pow(2).mean(dim=-1)
    return (drop * per_token).sum() / drop.sum().clamp(min=1.0)


def selector_loss(
    recon: torch.Tensor, target: torch.Tensor, keep_mask: torch.Tensor, target_keep: float, rate_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's loss: reconstruction error of the dropped tokens + max(L_pr, p).

    L_pr is an image's fraction kept (mean of its hard mask; straight-through, so it has a
    gradient); below the target p the max is constant, so pruning pressure stops there.
    The max is taken per image, then averaged: serving keeps K of every image, so the
    selector must rank within each image. Over the batch's fraction instead, it spent the
    budget on the images that were hard to rebuild and starved the rest; on the demo
    model's textured scenes it then kept 61% of the shape tokens at 0.25, against 100%
    per image (docs/quality.md).
    The summed error of the dropped tokens is divided by the count expected at the target,
    B*N*(1-p), not by the sampled count: with the sampled count each token's gradient grows
    as fewer are dropped, and training was seen to collapse into keeping every token. At
    the target the value equals the mean over dropped tokens (reported as "rec").
    """
    drop = 1.0 - keep_mask
    per_token = (recon.float() - target.float()).pow(2).mean(dim=-1)
    rec = (drop * per_token).sum() / (drop.numel() * max(1.0 - target_keep, 1e-3))
    kept = keep_mask.mean(dim=1)
    loss = rec + rate_weight * torch.clamp(kept, min=target_keep).mean()
    with torch.no_grad():
        rec_dropped = dropped_mse(recon, target, keep_mask)
    return loss, {"rec": rec_dropped.item(), "kept": kept.mean().item()}


# ---------------------------------------------------------------------------------------
# Checkpoints


def save_selector(
    path: str | Path,
    selector: TokenSelector,
    *,
    reconstructor: TokenReconstructor | None = None,
    metadata: dict[str, Any],
) -> None:
    """Write a safetensors checkpoint whose header holds the construction arguments and metadata.

    metadata must hold REQUIRED_METADATA (use ``vision_signature(hf_config)``) and may add
    any JSON-serializable training information.
    """
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"metadata is missing {missing}")
    clashing = [k for k in RESERVED if k in metadata]
    if clashing:
        raise ValueError(f"metadata keys {clashing} are reserved for the checkpoint format")
    header: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "selector_config": asdict(selector.config),
        "feature_dim": selector.config.feature_dim,
    }
    tensors = {f"selector.{k}": v.detach().cpu().contiguous() for k, v in selector.state_dict().items()}
    if reconstructor is not None:
        header["reconstructor_config"] = asdict(reconstructor.config)
        tensors.update(
            {f"reconstructor.{k}": v.detach().cpu().contiguous() for k, v in reconstructor.state_dict().items()}
        )
    header.update(metadata)
    # Each header value is JSON, so the file is self-describing to any safetensors reader.
    encoded = {k: json.dumps(v) for k, v in header.items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=encoded)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint
