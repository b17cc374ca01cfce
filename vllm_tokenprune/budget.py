"""The token budget: how many image tokens a request keeps.

``keep_count`` is the single definition of K. The multimodal processor calls it to size
the placeholder run of every image, and hands the integer to the model, which selects
exactly that many embeddings. Nothing else computes K.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields


def keep_count(num_tokens: int, keep_ratio: float) -> int:
    """K = round(N * ratio), clamped to [1, N]: never zero tokens, never more than N."""
    if num_tokens < 1:
        raise ValueError(f"an image must have at least one token, got {num_tokens}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    # Round half up; the small epsilon absorbs float error such as 0.35 * 20 = 6.999...
    k = math.floor(num_tokens * keep_ratio + 0.5 + 1e-9)
    return max(1, min(num_tokens, k))


# --- A request's ratio and method -------------------------------------------------------

KEEP_RATIO_KEY = "keep_ratio"
METHOD_KEY = "prune_method"
# Refuse absurd values before parsing them (a header is client-controlled).
MAX_VALUE_LENGTH = 64


class PruneRequestError(ValueError):
    """A client sent an invalid keep ratio or method; ``param`` names where it came from."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def parse_keep_ratio(raw: object, *, param: str) -> float:
    """A keep ratio from a header string or a JSON number, validated to (0, 1]."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise PruneRequestError(f"{param} must be a number in (0, 1], got {raw!r}", param)
    if isinstance(raw, str):
        if len(raw) > MAX_VALUE_LENGTH:
            raise PruneRequestError(
                f"{param} is too long ({len(raw)} characters; at most {MAX_VALUE_LENGTH})", param
            )
        try:
            value = float(raw.strip())
        except ValueError:
            raise PruneRequestError(
                f"{param} must be a number in (0, 1], got {raw!r}", param
            ) from None
    else:
        value = float(raw)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise PruneRequestError(f"{param} must be a number in (0, 1], got {raw!r}", param)
    return value


def parse_method(raw: object, *, param: str) -> str:
    from vllm_tokenprune.methods import METHOD_NAMES

    if not isinstance(raw, str) or len(raw) > MAX_VALUE_LENGTH:
        raise PruneRequestError(f"{param} must be a method name, got {raw!r}", param)
    name = raw.strip().lower()
    if name not in METHOD_NAMES:
        raise PruneRequestError(
            f"{param}: unknown prune method {raw!r}; choose one of {', '.join(METHOD_NAMES)}",
            param,
        )
    return name


@dataclass(frozen=True)
class RatioPolicy:
    """The operator's rules for client-chosen ratios.

    ``min_keep_ratio`` is a floor clients cannot go under (lower requests are raised to
    it); ``keep_ratio_step`` rounds ratios to a grid, so that near-identical ratios
    share one processor/encoder/prefix cache entry instead of fragmenting the caches.
    """

    default_keep_ratio: float = 1.0
    min_keep_ratio: float = 0.0
    keep_ratio_step: float = 0.0

    ENV_PREFIX = "VLLM_TOKENPRUNE_"

    def __post_init__(self):
        parse_keep_ratio(self.default_keep_ratio, param="default_keep_ratio")
        if not 0.0 <= self.min_keep_ratio <= 1.0:
            raise ValueError(f"min_keep_ratio must be in [0, 1], got {self.min_keep_ratio}")
        if not 0.0 <= self.keep_ratio_step <= 1.0:
            raise ValueError(f"keep_ratio_step must be in [0, 1], got {self.keep_ratio_step}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RatioPolicy:
        """Read ``VLLM_TOKENPRUNE_DEFAULT_KEEP_RATIO`` etc. (set by ``vllm-tokenprune serve``)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(cls.ENV_PREFIX + f.name.upper())
            if raw is not None:
                try:
                    values[f.name] = float(raw)
                except ValueError:
                    raise ValueError(f"{cls.ENV_PREFIX + f.name.upper()}={raw!r} is not a number") from None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        return {self.ENV_PREFIX + f.name.upper(): repr(getattr(self, f.name)) for f in fields(self)}

    def apply(self, ratio: float | None) -> float:
        ratio = self.default_keep_ratio if ratio is None else ratio
        if self.keep_ratio_step > 0:
            steps = max(1, math.floor(ratio / self.keep_ratio_step + 0.5 + 1e-9))
            ratio = min(1.0, round(steps * self.keep_ratio_step, 12))
        return max(ratio, self.min_keep_ratio)
