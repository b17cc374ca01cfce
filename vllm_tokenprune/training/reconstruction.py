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
from torch.nn.utils.rnn import pad_sequence

from vllm_tokenprune.selection.budget import SECTION as BUDGET_SECTION
from vllm_tokenprune.selection.selector import (
    DROP,
    FORMAT,
    FORMAT_VERSION,
    KEEP,
    QUERY_SECTION,
    REQUIRED_METADATA,
    RESERVED,
    SelectorCheckpointError,
    TokenSelector,
    encoder_stack,
    read_checkpoint,
    resolve_width_and_heads,
)
from vllm_tokenprune.training.ragged import real_tokens


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


def sample_keep_mask(selector: TokenSelector, features: torch.Tensor, tau: float, hard: bool = True,
                     padding: torch.Tensor | None = None) -> torch.Tensor:
    """Training-time keep mask (B, N): a two-class Gumbel-Softmax sample, 0 at ``padding``.

    hard=True gives exact 0/1 values with straight-through gradients of the soft
    sample. The hard sample is argmax(logits + gumbel) whatever tau is; tau only
    shapes the gradient.
    """
    logits = selector(features, padding).float()
    gumbel = -torch.empty_like(logits).exponential_().log()
    noisy = logits + gumbel
    soft = (noisy / tau).softmax(dim=-1)[..., KEEP]
    real = real_tokens(padding, soft)
    if not hard:
        return soft * real
    hard_mask = (noisy[..., KEEP] > noisy[..., DROP]).float()
    # soft - soft.detach() is exactly zero, so the values stay exactly 0/1.
    return (hard_mask + (soft - soft.detach())) * real


def sincos_position_encoding(grid_hw: tuple[int, int], dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sine-cosine encoding (h*w, dim), row-major; a quarter of dim per sin/cos of y/x.

    A function of (row, col) alone, so it is the same for a token of any image size.
    """
    h, w = grid_hw
    quarter = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys = ys.reshape(-1, 1).float() * freqs
    xs = xs.reshape(-1, 1).float() * freqs
    pe = torch.cat([ys.sin(), ys.cos(), xs.sin(), xs.cos()], dim=-1)
    return F.pad(pe, (0, dim - pe.shape[-1]))


def grid_positions(grids: torch.Tensor, num_tokens: int, dim: int, device=None) -> torch.Tensor:
    """(B, num_tokens, dim): each image's ``sincos_position_encoding`` of its grid (rows,
    cols), zero past its rows * cols tokens (padding)."""
    distinct, which = torch.unique(grids.cpu(), dim=0, return_inverse=True)
    table = pad_sequence([sincos_position_encoding(tuple(g), dim, device) for g in distinct.tolist()],
                         batch_first=True)
    return F.pad(table, (0, 0, 0, num_tokens - table.shape[1]))[which.to(table.device)]


class TokenReconstructor(nn.Module):
    """Rebuilds all N (normalized) tokens from the kept ones; used only in training.

    Dropped tokens are replaced by one shared learnable mask embedding. They carry no
    position of their own, so a fixed 2D sine-cosine encoding of each image's token grid is
    added to every token (grids=None treats each image's tokens as one row). Padding is
    neither attended to nor rebuilt.
    """

    def __init__(self, config: ReconstructorConfig):
        super().__init__()
        self.config = config
        d, w = config.feature_dim, config.width
        self.mask_embedding = nn.Parameter(torch.randn(d) * 0.02)
        self.proj_in = nn.Linear(d, w)
        self.encoder = encoder_stack(w, config.num_layers, config.num_heads, config.mlp_ratio, config.dropout)
        self.proj_out = nn.Linear(w, d)

    def forward(self, features: torch.Tensor, keep_mask: torch.Tensor, grids: torch.Tensor | None = None,
                padding: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, N, D) normalized, keep_mask (B, N) in {0, 1}, grids (B, 2) each image's
        (rows, cols), padding (B, N) True past an image's tokens -> reconstruction (B, N, D)."""
        b, n = features.shape[:2]
        lengths = torch.full((b,), n) if padding is None else (~padding).sum(dim=1).cpu()
        grids = torch.stack([torch.ones_like(lengths), lengths], dim=1) if grids is None else torch.as_tensor(grids)
        if not torch.equal(grids.cpu().prod(dim=1), lengths):
            raise ValueError(f"grids {grids.tolist()} do not hold {lengths.tolist()} tokens")
        m = keep_mask.unsqueeze(-1).to(features.dtype)
        x = self.proj_in(m * features + (1 - m) * self.mask_embedding)
        x = x + grid_positions(grids, n, x.shape[-1], x.device).to(x.dtype)
        return self.proj_out(self.encoder(x, src_key_padding_mask=padding))


# ---------------------------------------------------------------------------------------
# Loss


def _dropped_errors(recon: torch.Tensor, target: torch.Tensor, keep_mask: torch.Tensor,
                    padding: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (B,): the summed squared error (mean over D) of its dropped tokens, and
    how many it dropped; padding is never dropped."""
    drop = (1.0 - keep_mask) * real_tokens(padding, keep_mask)
    per_token = (recon.float() - target.float()).pow(2).mean(dim=-1)
    return (drop * per_token).sum(dim=1), drop.sum(dim=1)


def dropped_mse(recon: torch.Tensor, target: torch.Tensor, keep_mask: torch.Tensor,
                padding: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the batch's dropped tokens (B, N, D), averaged over D."""
    errors, dropped = _dropped_errors(recon, target, keep_mask, padding)
    return errors.sum() / dropped.sum().clamp(min=1.0)


def image_dropped_mse(recon: torch.Tensor, target: torch.Tensor, keep_mask: torch.Tensor,
                      padding: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's mean squared error over its dropped tokens (B,): the evaluation's metric,
    averaged over images so that each image counts once, whatever its size."""
    errors, dropped = _dropped_errors(recon, target, keep_mask, padding)
    return errors / dropped.clamp(min=1.0)


def selector_loss(
    recon: torch.Tensor, target: torch.Tensor, keep_mask: torch.Tensor, target_keep: float, rate_weight: float = 1.0,
    padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's loss: reconstruction error of the dropped tokens + max(L_pr, p), per image,
    averaged over the batch's images (``padding`` (B, N) marks tokens that are no image's).

    L_pr is an image's fraction kept (mean of its hard mask; straight-through, so it has a
    gradient); below the target p the max is constant, so pruning pressure stops there.
    The max is taken per image, then averaged: serving keeps K of every image, so the
    selector must rank within each image. Over the batch's fraction instead, it spent the
    budget on the images that were hard to rebuild and starved the rest; on the demo
    model's textured scenes it then kept 61% of the shape tokens at 0.25, against 100%
    per image (docs/quality.md).
    An image's summed error of the dropped tokens is divided by the count expected at the
    target, N*(1-p), not by the sampled count: with the sampled count each token's gradient
    grows as fewer are dropped, and training was seen to collapse into keeping every token.
    At the target the value equals the mean over dropped tokens (reported as "rec").
    Both terms are per image, so the batch's loss is the mean of its images' losses, each
    as if alone, and an image of many tokens weighs no more than one of few.
    """
    errors, _ = _dropped_errors(recon, target, keep_mask, padding)
    real = real_tokens(padding, keep_mask)
    num_tokens = real.sum(dim=1)
    rec = errors / (num_tokens * max(1.0 - target_keep, 1e-3))
    kept = (keep_mask * real).sum(dim=1) / num_tokens
    loss = (rec + rate_weight * torch.clamp(kept, min=target_keep)).mean()
    with torch.no_grad():
        rec_dropped = dropped_mse(recon, target, keep_mask, padding)
    return loss, {"rec": rec_dropped.item(), "kept": kept.mean().item()}


# ---------------------------------------------------------------------------------------
# Checkpoints


Section = tuple[dict[str, Any], dict[str, torch.Tensor]]  # a header section and its tensors


def save_selector(
    path: str | Path,
    selector: TokenSelector,
    *,
    reconstructor: TokenReconstructor | None = None,
    budget: Section | None = None,
    query: Section | None = None,
    metadata: dict[str, Any],
) -> None:
    """Write a safetensors checkpoint whose header holds the construction arguments and metadata.

    metadata must hold REQUIRED_METADATA (use ``vision_signature(hf_config)``) and may add
    any JSON-serializable training information. ``budget`` is a budget predictor's header
    section and tensors (``selection.budget.section``), ``query`` a question-reading
    selector's (``selection.selector.query_section``).
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
    for name, section in ((BUDGET_SECTION, budget), (QUERY_SECTION, query)):
        if section is not None:
            header[name], section_tensors = section
            tensors.update(section_tensors)
    header.update(metadata)
    write_checkpoint(path, tensors, header)


def load_reconstructor(path: str | Path) -> TokenReconstructor:
    """The reconstructor a selector checkpoint was trained with (eval mode)."""
    tensors, meta = read_checkpoint(path, "cpu")
    if "reconstructor_config" not in meta:
        raise SelectorCheckpointError(f"{path}: holds no reconstructor (written without one)")
    reconstructor = TokenReconstructor(ReconstructorConfig(**meta["reconstructor_config"]))
    reconstructor.load_state_dict({k.removeprefix("reconstructor."): v for k, v in tensors.items()
                                   if k.startswith("reconstructor.")})
    return reconstructor.eval()


def replace_section(path: str | Path, name: str, prefix: str, section: Section, out: str | Path | None = None) -> None:
    """Rewrite a checkpoint with its section ``name`` (tensors ``prefix*``) replaced by
    ``section``; everything else stays. To ``out`` if given, else in place."""
    tensors, meta = read_checkpoint(path, "cpu")
    header, section_tensors = section
    kept = {k: t for k, t in tensors.items() if not k.startswith(prefix)}
    write_checkpoint(out or path, {**kept, **section_tensors}, {**meta, name: header})


def write_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    """Atomically write ``tensors`` with ``header`` (each value JSON, so that the file is
    self-describing to any safetensors reader)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in header.items()})
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint
