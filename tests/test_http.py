"""The ASGI middleware, driven directly (the server tests cover it inside vLLM)."""

import asyncio
import json

import pytest

from vllm_tokenprune.http import KeepRatioMiddleware


async def _echo_app(scope, receive, send):
    """Downstream app: answers 200 with the body and headers it received."""
    message = await receive()
    payload = json.dumps({
        "body": json.loads(message["body"]) if message["body"] else None,
        "content_length": dict(scope["headers"]).get(b"content-length", b"").decode(),
    }).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": payload})


def call(body, headers=(), path="/v1/chat/completions", env=None, monkeypatch=None):
    if env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers]
             + [(b"content-length", str(len(raw)).encode())]}
    sent = []

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(KeepRatioMiddleware(_echo_app)(scope, receive, send))
    start, body_msg = sent
    return start["status"], dict(start["headers"]), json.loads(body_msg["body"])


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_header_becomes_mm_processor_kwargs():
    status, headers, out = call(CHAT, [("X-Keep-Ratio", "0.25"), ("X-Prune-Method", "random")])
    assert status == 200
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": 0.25, "prune_method": "random"}
    assert headers[b"x-keep-ratio-applied"] == b"0.25"
    assert int(out["content_length"]) == len(json.dumps(out["body"]).encode())


def test_body_field_works_and_header_wins():
    body = dict(CHAT, mm_processor_kwargs={"keep_ratio": 0.5, "prune_method": "norm"})
    _, _, out = call(body)
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": 0.5, "prune_method": "norm"}
    _, _, out = call(body, [("x-keep-ratio", "0.1")])
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": 0.1, "prune_method": "norm"}


def test_foreign_processor_kwargs_are_dropped():
    body = dict(CHAT, mm_processor_kwargs={"keep_ratio": 0.5, "max_pixels": 10**9,
                                           "num_crops": 64},
                media_io_kwargs={"video": {"num_frames": 10**6}})
    _, _, out = call(body)
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": 0.5}
    assert "media_io_kwargs" not in out["body"]


def test_default_ratio_when_none_given(monkeypatch):
    _, _, out = call(CHAT)
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": 1.0}
    _, _, out = call(CHAT, env={"VLLM_TOKENPRUNE_DEFAULT_KEEP_RATIO": "0.5",
                                "VLLM_TOKENPRUNE_MIN_KEEP_RATIO": "0.2",
                                "VLLM_TOKENPRUNE_KEEP_RATIO_STEP": "0.1"},
                     monkeypatch=monkeypatch)
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": 0.5}
    _, _, out = call(CHAT, [("X-Keep-Ratio", "0.05")])
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": 0.2}  # the floor
    _, _, out = call(CHAT, [("X-Keep-Ratio", "0.33")])
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": 0.3}  # the step


@pytest.mark.parametrize("headers,body_kwargs,param", [
    ([("X-Keep-Ratio", "nan")], None, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "inf")], None, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "0")], None, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "-1")], None, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "1.5")], None, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "half")], None, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "0." + "1" * 5000)], None, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "0.5"), ("X-Keep-Ratio", "0.25")], None, "X-Keep-Ratio"),
    ([("X-Prune-Method", "magic")], None, "X-Prune-Method header"),
    ([], {"keep_ratio": "abc"}, "mm_processor_kwargs.keep_ratio"),
    ([], {"keep_ratio": 2}, "mm_processor_kwargs.keep_ratio"),
    ([], {"prune_method": 7}, "mm_processor_kwargs.prune_method"),
    ([], "not-an-object", "mm_processor_kwargs"),
])
def test_bad_input_is_an_openai_400_naming_the_source(headers, body_kwargs, param):
    body = dict(CHAT) if body_kwargs is None else dict(CHAT, mm_processor_kwargs=body_kwargs)
    status, _, out = call(body, headers)
    assert status == 400
    assert out["error"]["code"] == 400
    assert out["error"]["type"] == "BadRequestError"
    assert out["error"]["param"] == param
    assert param.split()[0] in out["error"]["message"]


def test_other_routes_and_non_json_pass_through():
    status, _, out = call(CHAT, [("X-Keep-Ratio", "nan")], path="/v1/models")
    assert status == 200 and "mm_processor_kwargs" not in out["body"]
    status, _, out = call(b"[1, 2]", [("X-Keep-Ratio", "0.5")])
    assert status == 200 and out["body"] == [1, 2]
