"""The learned token selector, its training-time reconstructor, loss and checkpoints.

Method: "When Less is Enough: Adaptive Token Reduction for Efficient Image Representation"
(arXiv 2503.16660). A small Transformer scores every image token coming out of the vision
tower; in training a two-class Gumbel-Softmax samples a hard keep/drop mask and a
reconstructor must rebuild the dropped tokens from the kept ones, so the selector learns
to keep the tokens that cannot be predicted from the rest. At serve time the server keeps
the top-K tokens by score (``TokenSelector.topk``), K from ``budget.keep_count``.

The selector has no position encoding of its own: the tower's features already carry
position, and without one it scores any token count (other resolutions, crops, Qwen's
variable grids) with the same weights.

Checkpoints are safetensors only; their JSON metadata header holds everything needed to
rebuild the selector and to check at start-up that it fits the served model
(``check_compatible``).
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from vllm_tokenprune.budget import keep_count

FORMAT = "vllm_tokenprune.selector"
FORMAT_VERSION = 1
# Metadata the caller of save_selector must provide: what the selector was trained on.
REQUIRED_METADATA = ("source_model", "feature_layer", "vision_signature")
_RESERVED = ("format", "format_version", "selector_config", "reconstructor_config", "feature_dim")
DROP, KEEP = 0, 1  # index of each logit in the head's output


class SelectorCheckpointError(ValueError):
    """The file is not a usable selector checkpoint (not safetensors, or not ours)."""


class SelectorMismatchError(ValueError):
    """The selector was trained on features other than the ones this model produces."""


# ---------------------------------------------------------------------------------------
# Models


@dataclass
class SelectorConfig:
    feature_dim: int  # D of the vision features the selector scores
    width: int | None = None  # None -> min(256, feature_dim): slim keeps it ~1% of a CLIP-L tower
    num_layers: int = 3  # Transformer encoder layers (the paper uses 3)
    num_heads: int | None = None  # None -> max(1, width // 64)
    mlp_ratio: float = 4.0  # feed-forward width = mlp_ratio * width
    dropout: float = 0.0

    def __post_init__(self):
        _resolve_width_and_heads(self)


@dataclass
class ReconstructorConfig:
    feature_dim: int  # D of the features it rebuilds
    width: int | None = None  # None -> min(256, feature_dim)
    num_layers: int = 2
    num_heads: int | None = None  # None -> max(1, width // 64)
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self):
        _resolve_width_and_heads(self)


def _resolve_width_and_heads(config) -> None:
    if config.width is None:
        config.width = min(256, config.feature_dim)
    if config.num_heads is None:
        config.num_heads = max(1, config.width // 64)
    if config.width % config.num_heads:
        raise ValueError(f"width {config.width} is not divisible by num_heads {config.num_heads}")


def _encoder(width: int, num_layers: int, num_heads: int, mlp_ratio: float, dropout: float) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        width, num_heads, dim_feedforward=int(width * mlp_ratio), dropout=dropout,
        activation="gelu", batch_first=True, norm_first=True,
    )
    return nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)


class TokenSelector(nn.Module):
    """Scores image tokens: Linear(D -> width), Transformer layers, a keep/drop head.

    Features are standardized per dimension with buffers set from the training set
    (``set_normalization``), so they travel with the checkpoint.
    """

    def __init__(self, config: SelectorConfig):
        super().__init__()
        self.config = config
        d, w = config.feature_dim, config.width
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_std", torch.ones(d))
        self.proj = nn.Linear(d, w)
        self.encoder = _encoder(w, config.num_layers, config.num_heads, config.mlp_ratio, config.dropout)
        self.head = nn.Linear(w, 2)

    @torch.no_grad()
    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp(min=eps))

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.config.feature_dim:
            raise ValueError(
                f"selector expects features of dim {self.config.feature_dim}, got shape {tuple(features.shape)}"
            )
        x = features.to(self.feature_mean.dtype)
        return (x - self.feature_mean) / self.feature_std

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, N, D) -> logits (B, N, 2), [..., DROP] and [..., KEEP]."""
        return self.head(self.encoder(self.proj(self.normalize(features))))

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Keep logit minus drop logit, float32: (B, N, D) -> (B, N), (N, D) -> (N,)."""
        single = features.dim() == 2
        logits = self(features.unsqueeze(0) if single else features)
        scores = (logits[..., KEEP] - logits[..., DROP]).float()
        return scores[0] if single else scores

    def mask(self, features: torch.Tensor, tau: float, hard: bool = True) -> torch.Tensor:
        """Training-time keep mask (B, N): a two-class Gumbel-Softmax sample.

        hard=True gives exact 0/1 values with straight-through gradients of the soft
        sample. The hard sample is argmax(logits + gumbel) whatever tau is; tau only
        shapes the gradient.
        """
        logits = self(features).float()
        gumbel = -torch.empty_like(logits).exponential_().log()
        noisy = logits + gumbel
        soft = (noisy / tau).softmax(dim=-1)[..., KEEP]
        if not hard:
            return soft
        hard_mask = (noisy[..., KEEP] > noisy[..., DROP]).float()
        # soft - soft.detach() is exactly zero, so the values stay exactly 0/1.
        return hard_mask + (soft - soft.detach())

    @torch.no_grad()
    def topk(self, features: torch.Tensor, keep_ratio: float) -> torch.Tensor:
        """Indices of the K = keep_count(N, keep_ratio) best tokens, ascending.

        (N, D) -> (K,); (B, N, D) -> (B, K).
        """
        scores = self.scores(features)
        return topk_sorted(scores, keep_count(scores.shape[-1], keep_ratio))


def topk_sorted(scores: torch.Tensor, k: int | Sequence[int]) -> torch.Tensor | list[torch.Tensor]:
    """Indices of the k highest scores, returned in ascending (spatial) order.

    Ties go to the lower index (a stable descending sort; torch.topk promises no order
    among equal values), so the selection is deterministic. scores (N,) with int k ->
    (k,); (B, N) with int k -> (B, k); (B, N) with one k per row -> list of (k_b,).
    """
    if torch.is_tensor(k) and k.dim() == 0:
        k = int(k)
    if scores.dim() == 2 and not isinstance(k, numbers.Integral):
        ks = [int(v) for v in k]
        if len(ks) != scores.shape[0]:
            raise ValueError(f"got {len(ks)} values of k for {scores.shape[0]} rows")
        return [topk_sorted(row, kk) for row, kk in zip(scores, ks)]
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be (N,) or (B, N), got shape {tuple(scores.shape)}")
    k, n = int(k), scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


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
        self.encoder = _encoder(w, config.num_layers, config.num_heads, config.mlp_ratio, config.dropout)
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
    clashing = [k for k in _RESERVED if k in metadata]
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


def _read_checkpoint(path: str | Path, map_location) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"selector checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise SelectorCheckpointError(
            f"{path} is not a safetensors file ({e}); selector checkpoints are written by "
            "`vllm-tokenprune train` (pickled torch files are not accepted)"
        ) from e
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        meta = {}
    if meta.get("format") != FORMAT:
        raise SelectorCheckpointError(
            f"{path} is a safetensors file but not a vllm_tokenprune selector checkpoint "
            f"(its metadata header lacks format={FORMAT!r}; found keys {sorted(raw)})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise SelectorCheckpointError(
            f"{path} has selector format version {meta.get('format_version')!r}; this code reads {FORMAT_VERSION}"
        )
    missing = [k for k in ("selector_config", "feature_dim", *REQUIRED_METADATA) if k not in meta]
    if missing:
        raise SelectorCheckpointError(f"{path} lacks required metadata {missing}")
    return tensors, meta


def _build(cls, config_cls, prefix: str, config: dict, tensors: dict, path) -> nn.Module:
    try:
        module = cls(config_cls(**config))
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SelectorCheckpointError(f"{path}: cannot rebuild {cls.__name__} from the checkpoint: {e}") from e
    return module.eval()


def load_selector(path: str | Path, *, map_location="cpu") -> tuple[TokenSelector, dict[str, Any]]:
    """Rebuild the selector (in eval mode) from nothing but the file; returns (selector, metadata)."""
    tensors, meta = _read_checkpoint(path, map_location)
    selector = _build(TokenSelector, SelectorConfig, "selector.", meta["selector_config"], tensors, path)
    return selector, meta


def load_reconstructor(path: str | Path, *, map_location="cpu") -> TokenReconstructor:
    """The training-time reconstructor, where the checkpoint holds one (for evaluation)."""
    tensors, meta = _read_checkpoint(path, map_location)
    if "reconstructor_config" not in meta:
        raise SelectorCheckpointError(f"{path} holds no reconstructor")
    return _build(
        TokenReconstructor, ReconstructorConfig, "reconstructor.", meta["reconstructor_config"], tensors, path
    )


# ---------------------------------------------------------------------------------------
# Compatibility with the served model


def vision_signature(hf_config) -> dict[str, Any]:
    """The facts about a VLM config that determine the features the selector sees.

    Works on transformers' LLaVA / LLaVA-NeXT / LLaVA-OneVision / Qwen2.5-VL configs (and
    vLLM's hf_config, the same objects). For Qwen2.5-VL the selector scores the merged
    tokens after the patch merger, so feature_dim is the merger's out_hidden_size.
    """
    vc = hf_config.vision_config
    layer = getattr(hf_config, "vision_feature_layer", None)
    out_hidden = getattr(vc, "out_hidden_size", None)
    if out_hidden is not None:
        feature_dim = out_hidden
    elif isinstance(layer, (list, tuple)):  # LLaVA concatenates the listed layers
        feature_dim = vc.hidden_size * len(layer)
    else:
        feature_dim = vc.hidden_size
    num_layers = getattr(vc, "num_hidden_layers", None)
    signature = {
        "model_type": hf_config.model_type,
        "vision_model_type": vc.model_type,
        "vision_hidden_size": vc.hidden_size,
        "feature_dim": feature_dim,
        "patch_size": getattr(vc, "patch_size", None),
        "image_size": getattr(vc, "image_size", None),
        "num_vision_layers": num_layers if num_layers is not None else getattr(vc, "depth", None),
        "vision_feature_layer": layer,
        "vision_feature_select_strategy": getattr(hf_config, "vision_feature_select_strategy", None),
        "spatial_merge_size": getattr(vc, "spatial_merge_size", None),
    }
    # Through JSON so tuples become lists and compare equal to a loaded checkpoint's.
    return json.loads(json.dumps(signature))


def check_compatible(metadata: dict[str, Any], hf_config) -> None:
    """Raise SelectorMismatchError listing every field where the served model differs."""
    expected = metadata["vision_signature"]
    found = vision_signature(hf_config)
    problems = [
        f"{key}: expected {expected.get(key)!r}, found {found.get(key)!r}"
        for key in sorted(set(expected) | set(found))
        if expected.get(key) != found.get(key)
    ]
    if metadata.get("feature_dim") != found["feature_dim"]:
        problems.append(f"selector input dim: expected {metadata.get('feature_dim')!r}, found {found['feature_dim']!r}")
    if problems:
        served = getattr(hf_config, "name_or_path", "") or found["model_type"]
        raise SelectorMismatchError(
            f"the selector was trained for {metadata.get('source_model')!r} and does not fit the served "
            f"model {served!r}: " + "; ".join(problems)
        )
