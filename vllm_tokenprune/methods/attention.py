"""Per-token statistics of one tower layer's attention, from its queries and keys.

vLLM's towers run fused attention kernels that return no weights. The statistics the
methods need are cheap to rebuild from the layer's own queries and keys (post-norm,
post-projection, post-rotary: what the kernel received): the [CLS] row is one query
against all keys; the attention each token receives from all queries is the layer's
QK^T once more, computed in query chunks so that memory stays small for large images.
All in float32, on the device the tensors are on.
"""

from __future__ import annotations

import torch

from vllm_tokenprune.methods import ATTENTION, GLOBAL_ATTENTION, KEYS

# Elements of one chunk of attention probabilities (64 MiB in float32).
_CHUNK_ELEMENTS = 1 << 24


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k (B, S, H, d) -> (B, S): softmax(q_0 k^T * scale), token 0 the [CLS] query,
    averaged over heads."""
    logits = torch.einsum("bhd,bshd->bhs", q[:, 0].float(), k.float()) * scale
    return logits.softmax(dim=-1).mean(dim=1)


def global_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k (B, S, H, d) -> (B, S): the attention each key receives, averaged over heads
    and over all S queries."""
    b, s, h, _ = q.shape
    kf = k.float()
    total = torch.zeros(b, s, dtype=torch.float32, device=q.device)
    step = max(1, _CHUNK_ELEMENTS // (b * h * s))
    for start in range(0, s, step):
        logits = torch.einsum("bqhd,bshd->bhqs", q[:, start:start + step].float(), kf) * scale
        total += logits.softmax(dim=-1).sum(dim=(1, 2))
    return total / (h * s)


def statistics(q: torch.Tensor, k: torch.Tensor, scale: float, stats: set[str], *,
               has_cls: bool) -> dict[str, torch.Tensor]:
    """The requested statistics of sequences q, k (B, S, H, d): ATTENTION and
    GLOBAL_ATTENTION (B, S), KEYS (B, S, d). ATTENTION is the [CLS] row when the tower has
    a [CLS] token at position 0, else the global attention."""
    out: dict[str, torch.Tensor] = {}
    if GLOBAL_ATTENTION in stats or (ATTENTION in stats and not has_cls):
        out[GLOBAL_ATTENTION] = global_attention(q, k, scale)
    if ATTENTION in stats:
        out[ATTENTION] = cls_attention(q, k, scale) if has_cls else out[GLOBAL_ATTENTION]
    if KEYS in stats:
        out[KEYS] = k.float().mean(dim=2)
    return {name: out[name] for name in stats}
