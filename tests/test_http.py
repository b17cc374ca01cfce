"""The ASGI middleware, driven directly (tests/test_contract.py drives it inside vLLM)."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from vllm_tokenprune.policy import PrunePolicy
from vllm_tokenprune.serving import http
from vllm_tokenprune.serving.http import KeepRatioMiddleware


def fake_app(policy=None, status=200, reply=None, served=("m",)):
    """Downstream app: reads the body like a route, answers with it (or with ``reply``);
    carries the model config the middleware reads its policy from."""

    async def app(scope, receive, send):
        message = await receive()
        try:
            if message["type"] == "http.disconnect":
                raise ValueError
            body = message["body"]
            answer = reply if reply is not None else {
                "body": json.loads(body) if body else None, "raw": body.decode(),
                "content_length": dict(scope["headers"]).get(b"content-length", b"").decode()}
            code = status
        except (ValueError, RecursionError):  # what FastAPI does: a 400 of its own
            answer, code = {"detail": "There was an error parsing the body"}, 400
        payload = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": code,
                    "headers": [(b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    hf_config = SimpleNamespace(**(policy or PrunePolicy()).to_overrides())
    app.state = SimpleNamespace(
        vllm_config=SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config, served_model_name=served[0])),
        openai_serving_models=SimpleNamespace(base_model_paths=[SimpleNamespace(name=n) for n in served]))
    return app


def call(body, headers=(), path="/v1/chat/completions", app=None, root_path=""):
    app = app or fake_app()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    scope = {"type": "http", "method": "POST", "path": root_path + path, "root_path": root_path,
             "app": app, "headers": [(k.encode(), v.encode()) for k, v in headers]
             + [(b"content-length", str(len(raw)).encode())]}
    chunks = [raw[i:i + 1000] for i in range(0, len(raw), 1000)] or [b""]
    sent = []

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    asyncio.run(KeepRatioMiddleware(app)(scope, receive, send))
    start, *bodies = sent
    return start["status"], dict(start["headers"]), json.loads(b"".join(b["body"] for b in bodies))


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_header_becomes_mm_processor_kwargs():
    status, headers, out = call(CHAT, [("X-Keep-Ratio", "0.25"), ("X-Prune-Method", "random")])
    assert status == 200
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": 0.25, "prune_method": "random"}
    assert headers[b"x-keep-ratio-applied"] == b"0.25"
    assert out["content_length"] == ""  # the route reads the body it is given, whatever its length


def test_header_wins_and_other_body_kwargs_stay_for_the_processor():
    body = dict(CHAT, mm_processor_kwargs={"keep_ratio": 0.5, "prune_method": "norm", "max_pixels": 9})
    _, headers, out = call(body, [("x-keep-ratio", "0.1")])
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": 0.1, "prune_method": "norm", "max_pixels": 9}
    assert headers[b"x-keep-ratio-applied"] == b"0.1"


def test_a_body_without_headers_passes_byte_for_byte():
    raw = json.dumps(dict(CHAT, mm_processor_kwargs={"keep_ratio": 0.5})).encode() + b"  "
    _, headers, out = call(raw)
    assert out["raw"].encode() == raw
    assert headers[b"x-keep-ratio-applied"] == b"0.5"


def test_applied_ratio_follows_the_policy_from_the_model_config():
    app = fake_app(PrunePolicy(default_keep_ratio=0.5, min_keep_ratio=0.2, keep_ratio_step=0.1))
    assert call(CHAT, app=app)[1][b"x-keep-ratio-applied"] == b"0.5"
    assert call(CHAT, [("X-Keep-Ratio", "0.05")], app=app)[1][b"x-keep-ratio-applied"] == b"0.2"
    _, headers, out = call(CHAT, [("X-Keep-Ratio", "0.33")], app=app)
    assert headers[b"x-keep-ratio-applied"] == b"0.3"
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": 0.33}  # the processor applies it


@pytest.mark.parametrize("ratio,method,kwargs", [
    ("video=0.25", None, {"video_keep_ratio": 0.25}),
    ("0.5, video=0.25", "divprune, video=evs",
     {"keep_ratio": 0.5, "video_keep_ratio": 0.25, "prune_method": "divprune", "video_prune_method": "evs"}),
    (" Video = .1 ,image=auto;max=0.5", "VIDEO=norm",
     {"keep_ratio": "auto;max=0.5", "video_keep_ratio": 0.1, "video_prune_method": "norm"}),
])
def test_a_header_gives_images_and_videos_their_own_choices(ratio, method, kwargs):
    """A bare value is the images'; ``video=`` the videos'; each lands in its own kwarg."""
    headers = [("X-Keep-Ratio", ratio)] + ([("X-Prune-Method", method)] if method else [])
    _, _, out = call(CHAT, headers)
    assert out["body"]["mm_processor_kwargs"] == kwargs


def test_the_applied_ratio_names_the_videos_where_they_have_one():
    app = fake_app(PrunePolicy(keep_ratio_step=0.1))
    assert call(CHAT, [("X-Keep-Ratio", "0.5")], app=app)[1][b"x-keep-ratio-applied"] == b"0.5"
    assert call(CHAT, [("X-Keep-Ratio", "video=0.33")], app=app)[1][b"x-keep-ratio-applied"] == b"1.0, video=0.3"
    app = fake_app(PrunePolicy(default_video_keep_ratio=0.25))  # the operator's default
    assert call(CHAT, [("X-Keep-Ratio", "0.5")], app=app)[1][b"x-keep-ratio-applied"] == b"0.5, video=0.25"


def test_auto_is_written_in_its_canonical_form_and_reported_as_the_budget():
    _, headers, out = call(CHAT, [("X-Keep-Ratio", " Auto; max=.5 ")])
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": "auto;max=0.5"}
    assert headers[b"x-keep-ratio-applied"] == b"auto;max=0.5"
    # The operator's default may be auto; a lower bound under the floor is no bound.
    app = fake_app(PrunePolicy(default_keep_ratio="auto", min_keep_ratio=0.1))
    assert call(CHAT, app=app)[1][b"x-keep-ratio-applied"] == b"auto"
    body = dict(CHAT, mm_processor_kwargs={"keep_ratio": "auto;min=0.05"})
    assert call(body, app=app)[1][b"x-keep-ratio-applied"] == b"auto"
    assert call(CHAT, [("X-Keep-Ratio", "0.3")], app=app)[1][b"x-keep-ratio-applied"] == b"0.3"


@pytest.mark.parametrize("value", ["auto;min=0", "auto;max=2", "auto;min=0.6;max=0.2", "auto;size=4", "auto;",
                                   "automatic"])
def test_malformed_auto_bounds_are_a_400_naming_the_header(value):
    status, _, out = call(CHAT, [("X-Keep-Ratio", value)])
    assert (status, out["error"]["param"]) == (400, "X-Keep-Ratio header")
    assert "auto" in out["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/responses", "/invocations", "/v1/chat/completions/batch",
                                  "/v1/completions", "/tokenize"])
def test_every_post_route_and_the_root_path(path):
    for root in ("", "/proxy"):
        status, _, out = call(CHAT, [("X-Keep-Ratio", "0.5")], path=path, root_path=root)
        assert status == 200
        assert out["body"]["mm_processor_kwargs"]["keep_ratio"] == 0.5
        status, _, out = call(CHAT, [("X-Keep-Ratio", "nan")], path=path, root_path=root)
        assert (status, out["error"]["param"]) == (400, "X-Keep-Ratio header")


def test_tokenize_is_marked_as_not_served():
    _, _, out = call(CHAT, path="/tokenize")
    assert out["body"]["mm_processor_kwargs"] == {"tokenprune_not_served": True}


@pytest.mark.parametrize("headers,body,param", [
    ([("X-Keep-Ratio", "nan")], CHAT, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "inf")], CHAT, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "0")], CHAT, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "1.5")], CHAT, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "0x1p-2")], CHAT, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "0." + "1" * 5000)], CHAT, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "0.5"), ("x-keep-ratio", "0.25")], CHAT, "X-Keep-Ratio"),
    ([("X-Prune-Method", "magic")], CHAT, "X-Prune-Method header"),
    ([("X-Prune-Method", "evs")], CHAT, "X-Prune-Method header"),  # a video method, for images
    ([("X-Keep-Ratio", "0.5, video=auto")], CHAT, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "video=0.5, video=0.25")], CHAT, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "0.5, 0.25")], CHAT, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "audio=0.5")], CHAT, "X-Keep-Ratio header"),
    ([("X-Keep-Ratio", "video=")], CHAT, "X-Keep-Ratio header"),
    ([("X-Prune-Method", "norm, video=magic")], CHAT, "X-Prune-Method header"),
    ([("X-Keep-Ratio", "0.5")], dict(CHAT, mm_processor_kwargs=[1]), "mm_processor_kwargs"),
    ([("X-Keep-Ratio", "0.5")], b"[1, 2]", None),
    ([], b'{"mm_processor_kwargs": ' * 5000 + b"1" + b"}" * 5000, None),
])
def test_bad_input_is_an_openai_400_naming_the_source(headers, body, param):
    status, _, out = call(body, headers)
    assert status == 400
    assert out["error"]["code"] == 400
    assert out["error"]["type"] == "BadRequestError"
    assert out["error"]["param"] == param
    if param:
        assert param.split()[0] in out["error"]["message"]


def test_bodies_without_our_kwargs_are_not_parsed_but_spliced():
    raw = b' {"a": ' * 5000 + b"1" + b"}" * 5000 + b"\n"  # nested too deeply to parse
    status, _, out = call(raw, [("X-Keep-Ratio", "0.5")])
    assert status == 400 and out == {"detail": "There was an error parsing the body"}  # vLLM's answer
    status, _, out = call({}, [("X-Keep-Ratio", "0.5")])
    assert out["body"] == {"mm_processor_kwargs": {"keep_ratio": 0.5}}
    status, _, out = call(CHAT, [("X-Keep-Ratio", "0.5")])
    assert out["raw"].startswith(json.dumps(CHAT)[:-1])  # the original bytes, the key appended


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32-be", "utf-8-sig"])
def test_a_body_in_any_encoding_vllm_reads_is_read_alike(encoding):
    """JSON in UTF-16 or 32 or after a byte-order mark, which vLLM parses: its kwargs are
    found (so the applied ratio tells the truth), it passes on as sent when nothing is
    written, and in UTF-8 with the header's kwargs when they are."""
    raw = json.dumps(dict(CHAT, mm_processor_kwargs={"keep_ratio": 0.25})).encode(encoding)
    assert http.translate("/v1/chat/completions", {}, raw)[:2] == (raw, {"keep_ratio": 0.25})
    body, kwargs, *_ = http.translate("/v1/chat/completions", {"X-Keep-Ratio": "0.5"}, raw)
    assert kwargs == {"keep_ratio": 0.5} and json.loads(body.decode("utf-8"))["mm_processor_kwargs"] == kwargs
    bare = json.dumps(CHAT).encode(encoding)
    body, kwargs, *_ = http.translate("/v1/chat/completions", {"X-Keep-Ratio": "0.5"}, bare)
    assert json.loads(body.decode("utf-8")) == dict(CHAT, mm_processor_kwargs={"keep_ratio": 0.5})
    assert http.translate("/v1/chat/completions", {}, bare)[:2] == (bare, None)


ALIASED = ("m", "m:0.25", "m:divprune@0.5", "m:learned_query", "m:fast", "other:0.1")


def test_model_aliases_are_the_served_names_that_read_first_colon_tag():
    from vllm_tokenprune.policy import PruneRequestError, model_aliases, parse_alias_tag

    assert model_aliases(ALIASED) == {"m:0.25": {"keep_ratio": 0.25},
                                      "m:divprune@0.5": {"prune_method": "divprune", "keep_ratio": 0.5},
                                      "m:learned_query": {"prune_method": "learned_query"}}
    assert parse_alias_tag("Random@2.5e-1", param="model") == {"prune_method": "random", "keep_ratio": 0.25}
    assert parse_alias_tag("auto; max=.5", param="model") == {"keep_ratio": "auto;max=0.5"}
    for bad in ("fast", "0", "1.5", "@0.5", "divprune@", "x@0.5"):
        with pytest.raises(PruneRequestError):
            parse_alias_tag(bad, param="model")


def test_an_alias_chooses_under_the_body_and_the_header():
    app = fake_app(served=ALIASED)
    _, headers, out = call(dict(CHAT, model="m:divprune@0.5"), app=app)
    assert out["body"]["mm_processor_kwargs"] == {"prune_method": "divprune", "keep_ratio": 0.5}
    assert out["body"]["model"] == "m:divprune@0.5" and headers[b"x-keep-ratio-applied"] == b"0.5"
    body = dict(CHAT, model="m:divprune@0.5", mm_processor_kwargs={"keep_ratio": 0.1})
    _, headers, out = call(body, app=app)  # the body wins over the alias
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": 0.1, "prune_method": "divprune"}
    chosen = http.translate("/v1/chat/completions", {}, json.dumps(body).encode(), http.Aliases.of(ALIASED))
    assert chosen.alias == "m:divprune@0.5" and chosen.sources == {"prune_method": "model"}
    raw = json.dumps(dict(CHAT, model="m:0.25", mm_processor_kwargs={"keep_ratio": 0.5})).encode()
    overridden = http.translate("/v1/chat/completions", {}, raw, http.Aliases.of(ALIASED))
    assert overridden == (raw, {"keep_ratio": 0.5}, "m:0.25", {})  # passed on as sent, the alias still counted
    _, headers, out = call(body, [("X-Keep-Ratio", "0.75")], app=app)  # the header over both
    assert out["body"]["mm_processor_kwargs"] == {"keep_ratio": 0.75, "prune_method": "divprune"}
    for name in ("m", "m:fast", "other:0.1"):  # plain names: untouched, byte for byte
        raw = json.dumps(dict(CHAT, model=name)).encode()
        _, headers, out = call(raw, app=app)
        assert out["raw"].encode() == raw and headers[b"x-keep-ratio-applied"] == b"1.0"
    # a message that quotes an alias is not a request for it
    quoted = dict(CHAT, messages=[{"role": "user", "content": 'say "m:0.25"'}])
    assert "mm_processor_kwargs" not in call(quoted, app=app)[2]["body"]


def test_an_alias_is_refused_where_its_choices_cannot_go_and_its_errors_name_model():
    app = fake_app(served=ALIASED)
    status, _, out = call(dict(CHAT, model="m:0.25"), path="/v1/messages", app=app)
    assert status == 400 and out["error"]["param"] == "model"
    refusal = {"error": {"message": "mm_processor_kwargs.prune_method 'learned_query' needs a selector",
                         "type": "BadRequestError", "param": "mm_processor_kwargs.prune_method", "code": 400}}
    status, _, out = call(dict(CHAT, model="m:learned_query"), app=fake_app(served=ALIASED, status=400,
                                                                           reply=refusal))
    assert status == 400 and out["error"]["param"] == "model"
    assert out["error"]["message"] == "model 'learned_query' needs a selector"


@pytest.mark.parametrize("quotes", [0, 3, 63, 64, 65, 500])
def test_the_fast_body_scan_finds_what_in_finds(quotes):
    """``mentions`` jumps from quote to quote, then hands over to the general search: the same
    answer as ``in`` wherever the name sits, before, at or past the hand-over."""
    mark = b'"mm_processor_kwargs"'
    filler = b'x"' * quotes + b"x" * 1000  # one quote each
    for body in (filler, filler + mark, mark + filler, filler[:len(filler) // 2] + mark + filler,
                 filler + b'"mm_processor_kwarg"', b"", b'"'):
        assert http.mentions(body, mark) == (mark in body), body[:40]


def test_anthropic_route_refuses_what_it_cannot_carry():
    for headers, body in [([("X-Keep-Ratio", "0.5")], CHAT), ([], dict(CHAT, mm_processor_kwargs={}))]:
        status, _, out = call(body, headers, path="/v1/messages")
        assert status == 400 and "/v1/messages" in out["error"]["message"]
    assert call(CHAT, path="/v1/messages")[0] == 200


def test_a_body_over_the_limit_is_refused(monkeypatch):
    monkeypatch.setattr(http, "MAX_BODY_BYTES", 5000)
    status, _, out = call(dict(CHAT, pad="x" * 6000), [("X-Keep-Ratio", "0.5")])
    assert status == 413 and "larger than 5000 bytes" in out["error"]["message"]


def test_processor_errors_on_header_values_name_the_header():
    reply = {"error": {"message": "mm_processor_kwargs.prune_method 'learned' needs a selector",
                       "type": "BadRequestError", "param": "mm_processor_kwargs.prune_method", "code": 400}}
    app = fake_app(status=400, reply=reply)
    status, headers, out = call(CHAT, [("X-Prune-Method", "learned")], app=app)
    assert status == 400 and out["error"]["param"] == "X-Prune-Method header"
    assert out["error"]["message"].startswith("X-Prune-Method header 'learned'")
    assert int(headers[b"content-length"]) == len(json.dumps(out))
    # From the body, the processor's own name stands.
    _, _, out = call(dict(CHAT, mm_processor_kwargs={"prune_method": "learned"}), app=app)
    assert out["error"]["param"] == "mm_processor_kwargs.prune_method"


def test_get_and_non_http_pass_through():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    for scope in ({"type": "lifespan"}, {"type": "http", "method": "GET", "path": "/v1/models",
                                         "headers": [(b"x-keep-ratio", b"nan")]}):
        asyncio.run(KeepRatioMiddleware(app)(scope, None, None))
    assert seen == ["lifespan", "http"]
