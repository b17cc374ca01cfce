"""Client-side helpers for talking to a pruning server (benchmarks, eval, tests)."""

from __future__ import annotations

import base64
import io

from vllm_tokenprune.serving.http import KEEP_RATIO_HEADER, METHOD_HEADER


def image_question(url: str, text: str) -> list[dict]:
    """Chat messages of one user turn: one image (its URL) and a question."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def image_url(image) -> str:
    """A PIL image as a data URL for an OpenAI ``image_url`` content item."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def prune_headers(keep_ratio: float | str | None = None, method: str | None = None) -> dict[str, str]:
    """The request headers for a keep ratio (a number, or a budget such as ``auto``) and method."""
    headers = {}
    if keep_ratio is not None:
        headers[KEEP_RATIO_HEADER] = keep_ratio if isinstance(keep_ratio, str) else repr(float(keep_ratio))
    if method is not None:
        headers[METHOD_HEADER] = method
    return headers


def image_tokens(usage) -> int | None:
    """The image tokens of a response's prompt, as the server counted them
    (``usage.prompt_tokens_details.multimodal_tokens``, with ``--enable-prompt-tokens-details``)."""
    details = getattr(usage, "prompt_tokens_details", None)
    return (getattr(details, "multimodal_tokens", None) or {}).get("image") if details else None


class ServerUnreachableError(RuntimeError):
    pass


def served_model(base_url: str) -> str:
    """The first model the server at ``base_url`` (ending in /v1) serves."""
    import openai

    try:
        return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0).models.list().data[0].id
    except openai.APIConnectionError:
        raise ServerUnreachableError(f"no OpenAI-compatible server answers at {base_url}") from None
