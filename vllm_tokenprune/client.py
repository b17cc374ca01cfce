"""Client-side helpers for talking to a pruning server (benchmarks, eval, tests)."""

from __future__ import annotations

import base64
import io

KEEP_RATIO_HEADER = "X-Keep-Ratio"
METHOD_HEADER = "X-Prune-Method"


def image_url(image) -> str:
    """A PIL image as a data URL for an OpenAI ``image_url`` content item."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def prune_headers(keep_ratio: float | None = None, method: str | None = None) -> dict[str, str]:
    headers = {}
    if keep_ratio is not None:
        headers[KEEP_RATIO_HEADER] = repr(float(keep_ratio))
    if method is not None:
        headers[METHOD_HEADER] = method
    return headers
