"""Per-token statistics of tower layers' attention: recorded during the tower call, then
computed from the layers' queries and keys.

vLLM's towers run fused attention kernels that return no weights. The statistics the
methods need are cheap to rebuild from the layer's own queries and keys (post-norm,
post-projection, post-rotary: what the kernel received): the [CLS] row is one query
against all keys; the attention each token receives from all queries is the layer's
QK^T once more, computed in query chunks so that memory stays small for large images.
All in float32, on the device the tensors are on. Nothing here imports vLLM.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Mapping, Sequence

import torch

from vllm_tokenprune.selection.methods import ATTENTION, GLOBAL_ATTENTION, KEYS, Probe

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


class TowerProbe:
    """The per-token attention statistics of chosen tower layers, for one tower call.

    On entry it puts a forward pre-hook on each needed layer's attention op (vLLM's
    ``MMEncoderAttention``), which records the queries and keys the op receives (after
    the layer's norm, projections and rotary embedding: exactly what the fused kernel
    gets); on exit it removes them. ``results`` then computes what the methods asked for,
    on the tower's device. With tensor parallelism each rank holds some of the heads; the
    head averages are summed over ranks.
    """

    def __init__(self, ops: Mapping[str, torch.nn.Module], probes: Iterable[Probe], *,
                 has_cls: bool, total_heads: int):
        self.probes = set(probes)
        # Sorted: tensor-parallel ranks must issue their all-reduces in the same order, and
        # set order differs between processes (string hashing is salted per process).
        self.ops = {layer: ops[layer] for layer in sorted({p.layer for p in self.probes})}
        self.has_cls = has_cls
        self.total_heads = total_heads
        self._seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks = contextlib.ExitStack()

    def __enter__(self) -> TowerProbe:
        for layer, op in self.ops.items():
            handle = op.register_forward_pre_hook(functools.partial(self._record, layer),
                                                  with_kwargs=True)
            self._hooks.callback(handle.remove)
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.close()

    def _record(self, layer: str, op: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        named = {**dict(zip(("query", "key"), args)), **kwargs}
        self._seen[layer] = named["query"], named["key"]

    def results(self, spans: Sequence[tuple[int, int]] | None = None
                   ) -> list[dict[Probe, torch.Tensor]]:
        """Per attention sequence, each probe's statistic (S,) or (S, head_dim). Sequences
        are the batch rows of the recorded tensors, or, for a packed batch of one row, the
        (start, length) ``spans`` of it."""
        out: list[dict[Probe, torch.Tensor]] = []
        for layer, op in self.ops.items():
            if layer not in self._seen:
                raise RuntimeError(
                    f"tokenprune: the tower's {layer} attention op did not run as a module "
                    "(a compiled encoder?); methods that read the tower's attention need it eager")
            q, k = (x.reshape(*x.shape[:2], op.num_heads, op.head_size) for x in self._seen[layer])
            wanted = {p.stat for p in self.probes if p.layer == layer}
            sequences = ([(q, k)] if spans is None
                         else [(q[:, start:start + n], k[:, start:start + n]) for start, n in spans])
            per_sequence = []
            for qs, ks in sequences:
                found = statistics(qs, ks, op.scale, wanted, has_cls=self.has_cls)
                found = {stat: self._all_heads(found[stat], op) for stat in sorted(found)}
                per_sequence += [{Probe(stat, layer): v[b] for stat, v in found.items()}
                                 for b in range(len(qs))]
            out = per_sequence if not out else [{**a, **b} for a, b in zip(out, per_sequence)]
        return out

    def _all_heads(self, head_mean: torch.Tensor, op: torch.nn.Module) -> torch.Tensor:
        shards = self.total_heads // op.num_heads
        if shards == 1:
            return head_mean
        from vllm.distributed import tensor_model_parallel_all_reduce

        return tensor_model_parallel_all_reduce(head_mean.contiguous()) / shards
