"""The token budget: how many image tokens a request keeps.

``keep_count`` is the single definition of K. The multimodal processor calls it to size
the placeholder run of every image, and hands the integer to the model, which selects
exactly that many embeddings. Nothing else computes K.
"""

from __future__ import annotations

import math


def keep_count(num_tokens: int, keep_ratio: float) -> int:
    """K = round(N * ratio), clamped to [1, N]: never zero tokens, never more than N."""
    if num_tokens < 1:
        raise ValueError(f"an image must have at least one token, got {num_tokens}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    # Round half up; the small epsilon absorbs float error such as 0.35 * 20 = 6.999...
    k = math.floor(num_tokens * keep_ratio + 0.5 + 1e-9)
    return max(1, min(num_tokens, k))
