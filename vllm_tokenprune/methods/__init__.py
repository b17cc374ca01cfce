"""Token selection methods, chosen per request by name.

Every method answers the same question: given one image's vision-tower features
(N, D) and a keep count K (fixed earlier by ``budget.keep_count`` in the processor),
which K token indices survive, in original order. Methods that can be written as a
per-token score share ``topk_sorted`` so ties break the same way everywhere.

A method's position in ``METHOD_NAMES`` is the integer id the processor hands to the
model (multimodal fields must be tensors, not strings); append, never reorder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from vllm_tokenprune.selector import TokenSelector

METHOD_NAMES: tuple[str, ...] = ("learned", "random", "norm")


class UnknownMethodError(ValueError):
    pass


def method_id(name: str) -> int:
    try:
        return METHOD_NAMES.index(name)
    except ValueError:
        raise UnknownMethodError(
            f"unknown prune method {name!r}; choose one of {', '.join(METHOD_NAMES)}"
        ) from None


def method_name(ident: int) -> str:
    return METHOD_NAMES[ident]


@dataclass
class ImageContext:
    """What a method may use besides the features of one image."""

    seed: int  # deterministic per image content (hash of its pixels)
    selector: TokenSelector | None = None


ScoreFn = Callable[["torch.Tensor", ImageContext], "torch.Tensor"]


def _learned(features: torch.Tensor, ctx: ImageContext) -> torch.Tensor:
    if ctx.selector is None:
        raise ValueError("prune method 'learned' needs a selector; none is loaded")
    return ctx.selector.scores(features)


def _random(features: torch.Tensor, ctx: ImageContext) -> torch.Tensor:
    import torch

    gen = torch.Generator(device="cpu").manual_seed(ctx.seed)
    return torch.rand(features.shape[0], generator=gen).to(features.device)


def _norm(features: torch.Tensor, ctx: ImageContext) -> torch.Tensor:
    # Saliency by feature magnitude: a strong training-free baseline on CLIP-like towers.
    return features.float().norm(dim=-1)


_SCORERS: dict[str, ScoreFn] = {"learned": _learned, "random": _random, "norm": _norm}
assert tuple(_SCORERS) == METHOD_NAMES


def select(name: str, features: torch.Tensor, k: int, ctx: ImageContext) -> torch.Tensor:
    """Indices (k,) of the tokens of ``features`` (N, D) to keep, ascending."""
    from vllm_tokenprune.selector import topk_sorted

    if k >= features.shape[0]:
        import torch

        return torch.arange(features.shape[0], device=features.device)
    scores = _SCORERS[name](features, ctx)
    return topk_sorted(scores, k)
