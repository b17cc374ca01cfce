"""The HTTP layer: an ASGI middleware for ``vllm serve --middleware``.

It turns the ``X-Keep-Ratio`` / ``X-Prune-Method`` headers (or the body's
``mm_processor_kwargs.keep_ratio`` / ``.prune_method``; a header wins) into the request's
``mm_processor_kwargs``, where vLLM hands them to our multimodal processor.

Pruning needs the server to run with ``--trust-request-mm-kwargs``, which on its own
would let clients pass any processor kwarg (image resolution, crop counts...). So the
middleware rewrites ``mm_processor_kwargs`` to hold our two keys and nothing else, and
drops ``media_io_kwargs``: clients choose ratio and method, nothing more.

Operator policy (default ratio, floor, rounding step) comes from ``RatioPolicy.from_env``.
"""

from __future__ import annotations

import json

from vllm_tokenprune.budget import (
    KEEP_RATIO_KEY,
    METHOD_KEY,
    PruneRequestError,
    RatioPolicy,
    parse_keep_ratio,
    parse_method,
)
from vllm_tokenprune.client import KEEP_RATIO_HEADER, METHOD_HEADER

APPLIED_RATIO_HEADER = "X-Keep-Ratio-Applied"
# The OpenAI routes whose requests may carry images and mm_processor_kwargs.
ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})


def resolve_request(
    headers: dict[str, list[str]], body: dict, policy: RatioPolicy
) -> tuple[float, str | None]:
    """The (ratio, method) a request asks for, validated, with the operator policy applied.

    ``headers`` maps lower-case names to every value sent. Raises PruneRequestError.
    """
    mm_kwargs = body.get("mm_processor_kwargs")
    if mm_kwargs is None:
        mm_kwargs = {}
    elif not isinstance(mm_kwargs, dict):
        raise PruneRequestError("mm_processor_kwargs must be an object", "mm_processor_kwargs")

    def pick(header: str, key: str, parse):
        values = headers.get(header.lower(), [])
        if len(values) > 1:
            raise PruneRequestError(f"{header} header given {len(values)} times", header)
        if values:
            return parse(values[0], param=f"{header} header")
        if key in mm_kwargs and mm_kwargs[key] is not None:
            return parse(mm_kwargs[key], param=f"mm_processor_kwargs.{key}")
        return None

    ratio = pick(KEEP_RATIO_HEADER, KEEP_RATIO_KEY, parse_keep_ratio)
    method = pick(METHOD_HEADER, METHOD_KEY, parse_method)
    return policy.apply(ratio), method


class KeepRatioMiddleware:
    """Pure ASGI middleware (no response buffering, streaming untouched)."""

    def __init__(self, app):
        self.app = app
        self.policy = RatioPolicy.from_env()

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in ROUTES
        ):
            return await self.app(scope, receive, send)

        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            # Not ours to judge: vLLM answers malformed JSON with its own 400.
            return await self.app(scope, _replay(raw, receive), send)

        headers: dict[str, list[str]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1").lower(), []).append(
                value.decode("latin-1")
            )
        try:
            ratio, method = resolve_request(headers, body, self.policy)
        except PruneRequestError as err:
            return await _send_error(send, str(err), err.param)

        mm_kwargs = {KEEP_RATIO_KEY: ratio}
        if method is not None:
            mm_kwargs[METHOD_KEY] = method
        body["mm_processor_kwargs"] = mm_kwargs
        body.pop("media_io_kwargs", None)
        raw = json.dumps(body).encode()

        scope = dict(scope)
        scope["headers"] = [
            (k, v) for k, v in scope["headers"] if k.lower() != b"content-length"
        ] + [(b"content-length", str(len(raw)).encode())]

        async def send_with_ratio(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [
                    (APPLIED_RATIO_HEADER.lower().encode(), repr(ratio).encode())
                ]
            await send(message)

        return await self.app(scope, _replay(raw, receive), send_with_ratio)


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(raw: bytes, receive):
    """A receive callable that yields ``raw`` once, then defers to the real one."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay


async def _send_error(send, message: str, param: str) -> None:
    """An OpenAI-style 400, the same shape vLLM's own errors have."""
    payload = json.dumps(
        {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
