"""The HTTP layer: an ASGI middleware for ``vllm serve --middleware``.

It translates and reports. The ``X-Keep-Ratio`` / ``X-Prune-Method`` headers become the
request body's ``mm_processor_kwargs.keep_ratio`` / ``.prune_method``, and their ``video=``
parts ``.video_keep_ratio`` / ``.video_prune_method`` (a header wins over the body), on
every POST route, where vLLM hands them to our multimodal processor. The processor decides
and enforces everything else (operator policy, foreign kwargs, methods the server cannot
run), for HTTP, batch and offline requests alike; this layer maps its errors on header
values back to the header's name, refuses pruning choices on the routes that pass no
processor kwargs, and reports the ratio the policy applies (``X-Keep-Ratio-Applied``, by
the processor's own rule).

Work happens when the route reads the body, i.e. after vLLM's own middlewares (API key
check included) let the request through. A body is read up to ``MAX_BODY_BYTES``, parsed
only when it carries ``mm_processor_kwargs`` (at most once), and a header's kwargs are
appended to it, never serialised again (``translate``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from vllm_tokenprune.policy import (
    ALIAS_SEPARATOR,
    IMAGE,
    KEEP_RATIO_KEY,
    METHOD_KEY,
    NOT_SERVED_KEY,
    VIDEO,
    VIDEO_KEEP_RATIO_KEY,
    VIDEO_METHOD_KEY,
    AutoBudget,
    PrunePolicy,
    PruneRequestError,
    model_aliases,
    parse_budget,
    parse_by_modality,
    parse_method,
    parse_video_method,
    parse_video_ratio,
)
from vllm_tokenprune.serving.metrics import record_alias

KEEP_RATIO_HEADER = "X-Keep-Ratio"
METHOD_HEADER = "X-Prune-Method"
APPLIED_RATIO_HEADER = "X-Keep-Ratio-Applied"
# Each header's kwarg and parser per modality (``policy.parse_by_modality``: ``0.5, video=0.25``).
HEADERS = {
    KEEP_RATIO_HEADER: {IMAGE: (KEEP_RATIO_KEY, parse_budget), VIDEO: (VIDEO_KEEP_RATIO_KEY, parse_video_ratio)},
    METHOD_HEADER: {IMAGE: (METHOD_KEY, parse_method), VIDEO: (VIDEO_METHOD_KEY, parse_video_method)},
}
MAX_BODY_BYTES = 256 * 2**20
# Routes that render a prompt without serving it: processed, not counted in the metrics.
NOT_SERVED_ROUTES = frozenset({"/tokenize"})
# vLLM's Anthropic route builds its chat request without processor kwargs: pruning
# choices sent there could not reach the processor, so they are refused, not ignored.
NO_KWARGS_ROUTES = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
_KWARGS_MARK = b'"mm_processor_kwargs"'


def mentions(raw: bytes, name: bytes) -> bool:
    """``name in raw`` for a ``name`` that starts with a quote, fast on bodies of base64 images:
    ``in`` runs the general search over every byte (0.5 ms on a 3.7 MB body of four images), while
    ``find(b'"')`` jumps by memchr to the few quotes such a body has (0.04 ms). Past 64 quotes the
    body is mostly JSON structure, and the general search takes over from there."""
    i = raw.find(b'"')
    for _ in range(64):
        if i == -1:
            return False
        if raw.startswith(name, i):
            return True
        i = raw.find(b'"', i + 1)
    return i != -1 and raw.find(name, i) != -1


def pruning_headers(raw_headers) -> dict[str, str]:
    """Our headers' values by canonical name (any case); a header given twice is an error."""
    wanted = {name.lower().encode("latin-1"): name for name in HEADERS}
    found: dict[str, str] = {}
    for name, value in raw_headers:
        canonical = wanted.get(name.lower())
        if canonical is None:
            continue
        if canonical in found:
            raise PruneRequestError(f"{canonical} header given more than once", canonical)
        found[canonical] = value.decode("latin-1")
    return found


@dataclass(frozen=True)
class Aliases:
    """A server's model aliases with the kwargs each carries (``policy.model_aliases``), and
    the bytes every one of them starts with in a body."""

    kwargs: Mapping[str, dict]
    mark: bytes

    @classmethod
    def of(cls, served_names) -> Aliases | None:
        names = [served_names] if isinstance(served_names, str) else list(served_names or ())
        found = model_aliases(names) if names else {}
        return cls(found, b'"' + names[0].encode() + ALIAS_SEPARATOR.encode()) if found else None


class Translated(NamedTuple):
    body: bytes
    kwargs: dict | None  # the body's mm_processor_kwargs once translated; None: it has none
    alias: str | None = None  # the model alias that chose some of them
    sources: Mapping[str, str] = {}  # kwarg -> the header (or "model") that set it, for errors


def translate(path: str, headers: dict[str, str], raw: bytes, aliases: Aliases | None = None) -> Translated:
    """A body with the headers', and the model alias's, choices written into its
    ``mm_processor_kwargs``: a header wins over the body, the body over the alias. Raises
    PruneRequestError for what the client must fix.

    A body is parsed only when it carries ``mm_processor_kwargs`` or names an alias. The kwargs
    are written by appending the key to the object, not by serializing it again (the body may
    hold megabytes of images): JSON parsers, Python's and so vLLM's included, keep the last of
    repeated names. A body in UTF-16 or 32 is read as vLLM reads it, and passed on as it
    came unless kwargs are written into it (then in UTF-8)."""
    served = path not in NOT_SERVED_ROUTES
    sent, raw = raw, utf8(raw)
    carries_kwargs = mentions(raw, _KWARGS_MARK)  # one scan of the body
    names_alias = aliases is not None and mentions(raw, aliases.mark)
    if not headers and not carries_kwargs and not names_alias and served:
        return Translated(sent, None)
    kwargs: dict = {}
    sources: dict[str, str] = {}
    alias = None
    if carries_kwargs or names_alias:
        try:
            body = json.loads(raw)
        except RecursionError:
            raise PruneRequestError("request body nests too deeply", None) from None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            if headers:
                raise PruneRequestError("a request with pruning headers needs a JSON object body", None)
            return Translated(sent, None)  # not ours to judge: vLLM answers it
        kwargs = body.get("mm_processor_kwargs")
        if kwargs is None:
            kwargs = {}
        elif not isinstance(kwargs, dict):
            raise PruneRequestError("mm_processor_kwargs must be an object", "mm_processor_kwargs")
        if carries_kwargs and path in NO_KWARGS_ROUTES:
            raise PruneRequestError(f"mm_processor_kwargs is not supported on {path}: vLLM passes no "
                               "processor kwargs there; images get the server's default keep ratio",
                               "mm_processor_kwargs")
        if names_alias and isinstance(body.get("model"), str) and body["model"] in aliases.kwargs:
            alias = body["model"]
            if path in NO_KWARGS_ROUTES:
                raise PruneRequestError(f"model {alias!r} carries pruning choices, and {path} cannot pass them on: "
                                        "vLLM passes no processor kwargs there", "model")
            for key, value in aliases.kwargs[alias].items():
                if kwargs.get(key) is None:
                    kwargs[key], sources[key] = value, "model"
        if not headers and not sources and served:
            return Translated(sent, kwargs, alias)
    first, last = _outer_braces(raw)
    if last < 0:
        if headers:
            raise PruneRequestError("a request with pruning headers needs a JSON object body", None)
        return Translated(sent, None)
    if path in NO_KWARGS_ROUTES:
        header = next(iter(headers))
        raise PruneRequestError(f"{header} header is not supported on {path}: vLLM passes no processor "
                           "kwargs there; images get the server's default keep ratio", f"{header} header")
    for header, value in headers.items():
        keys = HEADERS[header]
        parsed = parse_by_modality(value, {m: parse for m, (_, parse) in keys.items()}, param=f"{header} header")
        for modality, value in parsed.items():
            key = keys[modality][0]
            kwargs[key] = str(value) if isinstance(value, AutoBudget) else value  # auto: its canonical string
            sources[key] = f"{header} header"
    if not served:
        kwargs[NOT_SERVED_KEY] = True
    empty = _skip_space(raw, first + 1) == last
    # One copy of the body: the object up to its closing brace, then the key.
    return Translated(b"".join([memoryview(raw)[:last], b"" if empty else b",", b'"mm_processor_kwargs":',
                                json.dumps(kwargs).encode(), b"}"]), kwargs, alias, sources)


_SPACE = b" \t\r\n"


def utf8(raw: bytes) -> bytes:
    """A JSON body in UTF-8. JSON may come in UTF-16 or 32, or after a byte-order mark, which
    Python's parser (and so vLLM) accepts; the scans here read UTF-8. A body that does not
    decode is left as it is, for vLLM to answer."""
    encoding = json.detect_encoding(raw)
    if encoding == "utf-8":
        return raw
    try:
        return raw.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return raw


def _skip_space(raw: bytes, i: int) -> int:
    while i < len(raw) and raw[i] in _SPACE:
        i += 1
    return i


def _outer_braces(raw: bytes) -> tuple[int, int]:
    """Indices of a JSON object's opening and closing braces, (-1, -1) for anything else;
    found without copying the body."""
    first, last = _skip_space(raw, 0), len(raw) - 1
    while last >= 0 and raw[last] in _SPACE:
        last -= 1
    if first < len(raw) and last > first and raw[first] == ord("{") and raw[last] == ord("}"):
        return first, last
    return -1, -1


def applied_ratio(policy: PrunePolicy, kwargs: dict | None) -> str | None:
    """What ``X-Keep-Ratio-Applied`` reports: the ratio the processor will give the images,
    or under ``auto`` the budget it resolves the images' own ratios within, e.g.
    ``auto;max=0.5``; then, where a request gives videos a ratio or the server a default
    one, the videos' as ``X-Keep-Ratio`` writes it (``0.5, video=0.25``). None when the
    body's value is invalid: the processor answers that request."""
    kwargs = kwargs or {}
    try:
        requested, video = kwargs.get(KEEP_RATIO_KEY), kwargs.get(VIDEO_KEEP_RATIO_KEY)
        ratio = None if requested is None else parse_budget(requested, param=KEEP_RATIO_KEY)
        video = None if video is None else parse_video_ratio(video, param=VIDEO_KEEP_RATIO_KEY)
    except PruneRequestError:
        return None
    applied = policy.apply(ratio)
    text = str(applied) if isinstance(applied, AutoBudget) else repr(applied)
    if video is None and policy.default_video_keep_ratio == 1.0:
        return text
    return f"{text}, {VIDEO}={policy.video_ratio(video)!r}"


@dataclass
class _Exchange:
    """One request's translation state, shared by its receive and send wrappers."""

    headers: dict[str, str]
    error: PruneRequestError | None = None
    applied: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict)  # Translated.sources
    held: list = field(default_factory=list)  # a 400 being rewritten
    answered: bool = False  # our error answer is sent


class KeepRatioMiddleware:
    """Pure ASGI middleware; responses stream through untouched except for one header
    (and the param of a 400 that names a key we wrote from a header or a model alias)."""

    def __init__(self, app):
        self.app = app
        self._config = None  # the policy, the aliases and the model's name, read once

    def config(self, scope) -> tuple[PrunePolicy, Aliases | None, str]:
        if self._config is None:
            state = scope["app"].state
            model_config = state.vllm_config.model_config
            # Every served name, as vLLM checks a request's model against them (the model
            # config keeps only the first).
            models = getattr(state, "openai_serving_models", None)
            names = ([path.name for path in models.base_model_paths] if models is not None
                     else [model_config.served_model_name])
            self._config = (PrunePolicy.from_config(model_config.hf_config), Aliases.of(names), names[0])
        return self._config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path") or "")
        try:
            exchange = _Exchange(pruning_headers(scope["headers"]))
        except PruneRequestError as err:
            exchange = _Exchange({}, error=err)
        policy, aliases, model_name = self.config(scope)
        if exchange.headers or path in NOT_SERVED_ROUTES or aliases is not None:
            # The body may change length after the scope is handed on: drop the stale count.
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"])
        body_read = False

        async def receive_translated():
            nonlocal body_read
            if body_read or exchange.error is not None:
                # The route asked again (a disconnect check), or the request is refused:
                # a disconnect makes the route give up before doing any work.
                return {"type": "http.disconnect"} if exchange.error else await receive()
            body_read = True
            try:
                translated = translate(path, exchange.headers, await _read_body(receive), aliases)
                exchange.applied = applied_ratio(policy, translated.kwargs)
                exchange.sources = translated.sources
            except PruneRequestError as err:
                exchange.error = err
                return {"type": "http.disconnect"}
            if translated.alias is not None and path not in NOT_SERVED_ROUTES:
                record_alias(model_name, translated.alias)
            return {"type": "http.request", "body": translated.body, "more_body": False}

        async def send_translated(message):
            if exchange.error is not None:
                if message["type"] == "http.response.start":  # the route's answer to the disconnect
                    await answer_error()
                return
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if exchange.applied is not None:
                    headers.append((APPLIED_RATIO_HEADER.lower().encode(), exchange.applied.encode()))
                message = dict(message, headers=headers)
                if message["status"] == 400 and exchange.sources:
                    exchange.held.append(message)
                    return
            elif exchange.held:
                exchange.held.append(message)
                if not message.get("more_body", False):
                    await _send_renamed(send, exchange.held, exchange.sources)
                return
            await send(message)

        async def answer_error():
            if not exchange.answered:
                exchange.answered = True
                await _send_error(send, exchange.error)

        try:
            await self.app(scope, receive_translated, send_translated)
        except Exception:
            if exchange.error is None:
                raise
        # Routes differ in how they give up on a disconnect (an answer, an exception, none).
        if exchange.error is not None:
            await answer_error()


async def _read_body(receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PruneRequestError(f"request body larger than {MAX_BODY_BYTES} bytes", None, status=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send_renamed(send, held: list, sources: Mapping[str, str]) -> None:
    """Send a held 400 whose param names a kwarg we wrote from a header (or a model alias)
    under that header (or ``model``)."""
    start, *parts = held
    raw = b"".join(p.get("body", b"") for p in parts)
    try:
        payload = json.loads(raw)
        error = payload["error"]
        for kwarg, source in sources.items():
            key = "mm_processor_kwargs." + kwarg
            if error.get("param") == key:
                error["param"] = source
                error["message"] = str(error.get("message", "")).replace(key, source)
        raw = json.dumps(payload).encode()
    except (ValueError, KeyError, TypeError, AttributeError):
        pass  # not an error body we know: send it as it was
    start = dict(start, headers=[(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                 + [(b"content-length", str(len(raw)).encode())])
    await send(start)
    await send({"type": "http.response.body", "body": raw, "more_body": False})


async def _send_error(send, err: PruneRequestError) -> None:
    """An OpenAI-style error, the same shape vLLM's own errors have."""
    kind = "BadRequestError" if err.status == 400 else "RequestEntityTooLarge"
    payload = json.dumps(
        {"error": {"message": str(err), "type": kind, "param": err.param, "code": err.status}}
    ).encode()
    await send({
        "type": "http.response.start",
        "status": err.status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode())],
    })
    await send({"type": "http.response.body", "body": payload})
