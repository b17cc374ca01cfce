"""One pruning contract on every route, tried as a careful and as a hostile client would.

One real `vllm-tokenprune serve` of the demo model (144 tokens per image, 155 prompt
tokens at keep 1.0) behind `--root-path /proxy` and `--api-key`, with an operator floor
of 0.1 and a step of 0.05. Every case checks the status, the param an error names, the
prompt-token count, and that the server still answers a normal request afterwards.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import requests
from PIL import Image
from server import Server

from vllm_tokenprune.policy import PrunePolicy, keep_count
from vllm_tokenprune.testbed.synthetic import QUESTIONS, make_scene, scene_seed
from vllm_tokenprune.tools.serve import DEFAULT_SERVED_NAME

pytestmark = pytest.mark.server

KEY = "contract-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
N = 144  # the demo model's image tokens
TEXT = 11  # its prompt tokens besides the image
SCENE = make_scene("plain", scene_seed("test", 7))
QUESTION = QUESTIONS["count"]


def tokens_at(ratio: float) -> int:
    return TEXT + keep_count(N, ratio)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


IMAGE = png(SCENE.image)


def chat_body(raw: bytes = IMAGE, **extra) -> dict:
    return {"model": DEFAULT_SERVED_NAME, "max_tokens": 2, "temperature": 0, **extra,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(raw)}},
                {"type": "text", "text": QUESTION}]}]}


def responses_body(**extra) -> dict:
    return {"model": DEFAULT_SERVED_NAME, "max_output_tokens": 2, "temperature": 0, **extra,
            "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": data_url(IMAGE)},
                {"type": "input_text", "text": QUESTION}]}]}


def messages_body(**extra) -> dict:
    return {"model": DEFAULT_SERVED_NAME, "max_tokens": 2, **extra,
            "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": base64.b64encode(IMAGE).decode()}},
                {"type": "text", "text": QUESTION}]}]}


def tokenize_body(**extra) -> dict:
    return {"model": DEFAULT_SERVED_NAME, "messages": chat_body()["messages"], **extra}


def batch_body(**extra) -> dict:
    return dict(chat_body(**extra), messages=[chat_body()["messages"]] * 2)


def streamed_chat_body(**extra) -> dict:
    return chat_body(stream=True, stream_options={"include_usage": True}, **extra)


def prompt_tokens(path: str, response: requests.Response) -> int:
    """The prompt-token count a route reports."""
    if path.endswith("/tokenize"):
        return response.json()["count"]
    if "stream" in response.headers.get("content-type", ""):
        chunks = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: {")]
        return chunks[-1]["usage"]["prompt_tokens"]
    usage = response.json()["usage"]
    if path.endswith("/v1/responses"):
        return usage["input_tokens"]
    if path.endswith("/v1/messages"):
        return usage["input_tokens"] + usage["cache_read_input_tokens"]
    if path.endswith("/batch"):
        return usage["prompt_tokens"] // 2
    return usage["prompt_tokens"]


# Every route that carries images and the kwargs: (path, body builder).
IMAGE_ROUTES = {
    "chat": ("/v1/chat/completions", chat_body),
    "chat-stream": ("/v1/chat/completions", streamed_chat_body),
    "chat-batch": ("/v1/chat/completions/batch", batch_body),
    "responses": ("/v1/responses", responses_body),
    "invocations": ("/invocations", chat_body),
    "tokenize": ("/tokenize", tokenize_body),
    "root-path": ("/proxy/v1/chat/completions", chat_body),
    "root-path-responses": ("/proxy/v1/responses", responses_body),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("contract") / "server.log"
    with Server(None, "--api-key", KEY, "--root-path", "/proxy", "--min-keep-ratio", "0.1",
                "--keep-ratio-step", "0.05", log_path=log) as srv:
        yield srv


def post(server, path, body=None, headers=(), data=None, auth=True):
    sent = {**(AUTH if auth else {}), "Content-Type": "application/json"}
    sent.update(headers)
    return requests.post(server.root + path, json=body if data is None else None,
                         data=data, headers=sent, timeout=120)


def error_of(response) -> dict:
    return response.json()["error"]


def still_serving(server):
    assert requests.get(server.root + "/health", timeout=10).status_code == 200
    ok = post(server, "/v1/chat/completions", chat_body(), {"X-Keep-Ratio": "0.25"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens"] == tokens_at(0.25)
    assert ok.json()["choices"][0]["message"]["content"] == " " + SCENE.answer("count")


@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_every_route_keeps_what_the_header_or_body_asks(server, route):
    path, body = IMAGE_ROUTES[route]
    cases = [({}, {}, 1.0),
             ({"X-Keep-Ratio": "0.25"}, {}, 0.25),
             ({"x-KEEP-ratio": "2.5e-1", "X-Prune-Method": "Random"}, {}, 0.25),  # any case, exponent
             ({}, {"mm_processor_kwargs": {"keep_ratio": 0.5, "prune_method": "divprune"}}, 0.5),
             ({"X-Keep-Ratio": "0.1"}, {"mm_processor_kwargs": {"keep_ratio": 0.5}}, 0.1),  # header wins
             ({"X-Keep-Ratio": "0.02"}, {}, 0.1),  # the operator's floor
             ({}, {"mm_processor_kwargs": {"keep_ratio": 0.26}}, 0.25)]  # the operator's step
    for headers, extra, applied in cases:
        response = post(server, path, body(**extra), headers)
        assert response.status_code == 200, (headers, extra, response.text)
        assert prompt_tokens(path, response) == tokens_at(applied), (headers, extra)
        if not path.endswith("/tokenize"):
            assert float(response.headers["X-Keep-Ratio-Applied"]) == applied


HOSTILE = [
    # (name, headers, extra body, param)
    ("nan", {"X-Keep-Ratio": "nan"}, {}, "X-Keep-Ratio header"),
    ("infinity", {"X-Keep-Ratio": "inf"}, {}, "X-Keep-Ratio header"),
    ("zero", {"X-Keep-Ratio": "0"}, {}, "X-Keep-Ratio header"),
    ("above-one", {"X-Keep-Ratio": "1.01"}, {}, "X-Keep-Ratio header"),
    ("hex", {"X-Keep-Ratio": "0x1p-2"}, {}, "X-Keep-Ratio header"),
    ("underscore", {"X-Keep-Ratio": "0.2_5"}, {}, "X-Keep-Ratio header"),
    ("long", {"X-Keep-Ratio": "0." + "1" * 400}, {}, "X-Keep-Ratio header"),
    ("unknown-method", {"X-Prune-Method": "magic"}, {}, "X-Prune-Method header"),
    ("body-nan", {}, {"mm_processor_kwargs": {"keep_ratio": "nan"}}, "mm_processor_kwargs.keep_ratio"),
    ("body-400-digits", {}, {"mm_processor_kwargs": {"keep_ratio": 10**400}}, "mm_processor_kwargs.keep_ratio"),
    ("body-fullwidth", {}, {"mm_processor_kwargs": {"keep_ratio": "\uff10.5"}}, "mm_processor_kwargs.keep_ratio"),
    ("body-method", {}, {"mm_processor_kwargs": {"prune_method": ["norm"]}}, "mm_processor_kwargs.prune_method"),
    ("foreign-size", {}, {"mm_processor_kwargs": {"size": {"shortest_edge": 4000}}}, "mm_processor_kwargs.size"),
    ("foreign-with-ours", {"X-Keep-Ratio": "0.5"}, {"mm_processor_kwargs": {"do_resize": False}},
     "mm_processor_kwargs.do_resize"),
    ("not-an-object", {"X-Keep-Ratio": "0.5"}, {"mm_processor_kwargs": "0.5"}, "mm_processor_kwargs"),
]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig", "chunked"])
def test_the_applied_ratio_is_the_truth_for_every_body_vllm_accepts(server, encoding):
    """X-Keep-Ratio-Applied against the prompt tokens, for JSON in the encodings vLLM
    parses and for a body sent in chunks, with the ratio in the body and in the header."""
    for headers, extra, applied in [({}, {"mm_processor_kwargs": {"keep_ratio": 0.25}}, 0.25),
                                    ({"X-Keep-Ratio": "0.5"}, {"mm_processor_kwargs": {"keep_ratio": 0.25}}, 0.5)]:
        raw = json.dumps(chat_body(**extra)).encode("utf-8" if encoding == "chunked" else encoding)
        data = (raw[i:i + 4096] for i in range(0, len(raw), 4096)) if encoding == "chunked" else raw
        response = post(server, "/v1/chat/completions", headers=headers, data=data)
        assert response.status_code == 200, (encoding, headers, response.text)
        assert response.json()["usage"]["prompt_tokens"] == tokens_at(applied), (encoding, headers)
        assert float(response.headers["X-Keep-Ratio-Applied"]) == applied, (encoding, headers)


@pytest.mark.parametrize("route", ["chat", "chat-stream", "responses", "invocations", "tokenize", "root-path"])
@pytest.mark.parametrize("name,headers,extra,param", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_bad_pruning_input_is_a_400_naming_the_param_on_every_route(server, route, name, headers, extra, param):
    path, body = IMAGE_ROUTES[route]
    response = post(server, path, body(**extra), headers)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param
    assert param.split()[0] in error_of(response)["message"]


def test_the_server_keeps_serving_after_every_hostile_case(server):
    for _, headers, extra, _ in HOSTILE:
        post(server, "/v1/chat/completions", chat_body(**extra), headers)
    still_serving(server)


def test_duplicated_header(server):
    # requests folds a dict; send two header lines through a list of tuples instead
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps(chat_body()).encode()
    conn.putrequest("POST", "/v1/chat/completions")
    for name, value in [*AUTH.items(), ("Content-Type", "application/json"), ("X-Keep-Ratio", "0.5"),
                        ("x-keep-ratio", "0.25"), ("Content-Length", str(len(body)))]:
        conn.putheader(name, value)
    conn.endheaders(body)
    response = conn.getresponse()
    payload = json.loads(response.read())
    assert response.status == 400 and payload["error"]["param"] == "X-Keep-Ratio"
    still_serving(server)


def test_text_only_routes_validate_headers_and_ignore_valid_ones(server):
    body = {"model": DEFAULT_SERVED_NAME, "prompt": "how many", "max_tokens": 1}
    assert post(server, "/v1/completions", body, {"X-Keep-Ratio": "0.25"}).status_code == 200
    bad = post(server, "/v1/completions", body, {"X-Keep-Ratio": "nan"})
    assert bad.status_code == 400 and error_of(bad)["param"] == "X-Keep-Ratio header"


def test_the_anthropic_route_refuses_pruning_choices_it_cannot_carry(server):
    plain = post(server, "/v1/messages", messages_body())
    assert plain.status_code == 200 and prompt_tokens("/v1/messages", plain) == tokens_at(1.0)
    for headers, extra, param in [({"X-Keep-Ratio": "0.25"}, {}, "X-Keep-Ratio header"),
                                  ({}, {"mm_processor_kwargs": {"keep_ratio": 0.25}}, "mm_processor_kwargs")]:
        response = post(server, "/v1/messages", messages_body(**extra), headers)
        assert response.status_code == 400 and error_of(response)["param"] == param
        assert "/v1/messages" in error_of(response)["message"]
    still_serving(server)


@pytest.mark.parametrize("data", [b"[" * 5000 + b"]" * 5000, b'{"a": ' * 5000 + b"1" + b"}" * 5000,
                                  b'{"model": "x", "mm_processor_kwargs": ' * 3000 + b"1" + b"}" * 3000,
                                  b"{not json", b""])
@pytest.mark.parametrize("headers", [{}, {"X-Keep-Ratio": "0.5"}])
def test_malformed_and_deeply_nested_bodies_are_400s(server, data, headers):
    response = post(server, "/v1/chat/completions", data=data, headers=headers)
    assert response.status_code == 400, response.text[:300]


def test_a_large_body_is_served(server):
    body = chat_body()
    body["messages"][0]["content"].append({"type": "text", "text": " " * (24 * 2**20)})
    response = post(server, "/v1/chat/completions", body, {"X-Keep-Ratio": "0.25"})
    assert response.status_code in (200, 400), response.text[:300]  # too long a prompt is vLLM's 400
    still_serving(server)


def test_a_wrong_api_key_is_a_401_before_anything_is_parsed(server):
    for headers in ({"X-Keep-Ratio": "0.25"}, {"X-Keep-Ratio": "nan"}):
        response = post(server, "/v1/chat/completions", chat_body(), headers, auth=False)
        assert response.status_code == 401
        response = post(server, "/v1/chat/completions", chat_body(), {**headers, "Authorization": "Bearer no"},
                        auth=False)
        assert response.status_code == 401
    still_serving(server)


def bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (15000, 15000)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name,raw,status", [
    ("decompression-bomb", bomb(), 400),
    ("truncated", IMAGE[: len(IMAGE) // 2], 400),
    ("not-an-image", b"GIF89a" + b"\0" * 64, 400),
    ("one-pixel", png(Image.new("RGB", (1, 1), "red")), 200),  # LLaVA upscales it, as stock vLLM does
    ("extreme-aspect", png(Image.new("RGB", (1, 3000), "red")), 200),
])
def test_bad_images_are_400s_and_the_server_keeps_serving(server, name, raw, status):
    response = post(server, "/v1/chat/completions", chat_body(raw), {"X-Keep-Ratio": "0.25"})
    assert response.status_code == status, response.text[:300]
    if status == 200:
        assert response.json()["usage"]["prompt_tokens"] == tokens_at(0.25)
    still_serving(server)


def test_metrics_count_served_requests_not_tokenized_ones(server):
    key = f'tokenprune_requests_total{{method="learned",model_name="{DEFAULT_SERVED_NAME}"}}'
    before = server.metrics().get(key, 0.0)
    for _ in range(3):
        assert post(server, "/tokenize", tokenize_body(), {"X-Keep-Ratio": "0.25"}).status_code == 200
    assert server.metrics().get(key, 0.0) == before
    assert post(server, "/v1/chat/completions", chat_body(), {"X-Keep-Ratio": "0.25"}).status_code == 200
    assert post(server, "/v1/responses", responses_body()).status_code == 200
    assert server.metrics()[key] == before + 2


def test_model_aliases_choose_for_clients_that_can_only_pick_a_name(server):
    """`make serve`'s aliases: listed, chosen by name through the openai SDK and on the
    raw routes, under the body and the header, counted; unknown ones are vLLM's 404."""
    import openai

    from vllm_tokenprune.tools.serve import DEMO_ALIASES

    published = [f"{DEFAULT_SERVED_NAME}:{tag}" for tag in DEMO_ALIASES.split(",")]
    listed = requests.get(server.root + "/proxy/v1/models", headers=AUTH, timeout=30).json()["data"]
    assert [m["id"] for m in listed] == [DEFAULT_SERVED_NAME, *published]
    client = openai.OpenAI(base_url=server.root + "/proxy/v1", api_key=KEY, max_retries=0)
    alias = f"{DEFAULT_SERVED_NAME}:0.25"
    raw = client.chat.completions.with_raw_response.create(**dict(chat_body(), model=alias))
    assert raw.parse().usage.prompt_tokens == tokens_at(0.25) and raw.headers["X-Keep-Ratio-Applied"] == "0.25"
    key = f'tokenprune_alias_requests_total{{alias="{alias}",model_name="{DEFAULT_SERVED_NAME}"}}'
    before = server.metrics().get(key, 0.0)
    for headers, extra, applied in [({}, {}, 0.25),
                                    ({}, {"mm_processor_kwargs": {"keep_ratio": 0.5}}, 0.5),  # the body wins
                                    ({"X-Keep-Ratio": "0.1"}, {"mm_processor_kwargs": {"keep_ratio": 0.5}}, 0.1)]:
        for path, body in (IMAGE_ROUTES["chat-stream"], IMAGE_ROUTES["responses"]):
            response = post(server, path, body(**extra, model=alias), headers)
            assert response.status_code == 200, response.text[:300]
            assert prompt_tokens(path, response) == tokens_at(applied), (path, headers, extra)
            assert float(response.headers["X-Keep-Ratio-Applied"]) == applied
    assert server.metrics()[key] == before + 6
    auto = post(server, "/v1/chat/completions", chat_body(model=f"{DEFAULT_SERVED_NAME}:auto"))
    assert auto.status_code == 200 and auto.headers["X-Keep-Ratio-Applied"] == "auto"
    assert auto.json()["usage"]["prompt_tokens"] < tokens_at(1.0)
    unknown = post(server, "/v1/chat/completions", chat_body(model=f"{DEFAULT_SERVED_NAME}:0.3"))
    assert unknown.status_code == 404
    refused = post(server, "/v1/messages", messages_body(model=alias))
    assert refused.status_code == 400 and error_of(refused)["param"] == "model"
    still_serving(server)


def test_the_batch_runner_follows_the_same_contract(tmp_path):
    """`vllm run-batch` (no HTTP layer): body kwargs and the policy in --hf-overrides."""
    import os
    import subprocess
    import sys

    from vllm_tokenprune.tools.serve import build_vllm_args, default_model

    model, selector = map(str, default_model())
    asked = [{"keep_ratio": 0.25}, {"keep_ratio": 0.02}, {"size": {"shortest_edge": 9}}, {}]
    lines = [{"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions",
              "body": chat_body(mm_processor_kwargs=kwargs)} for i, kwargs in enumerate(asked)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = build_vllm_args(model, selector, [], PrunePolicy(min_keep_ratio=0.1))
    overrides = args[args.index("--hf-overrides") + 1]
    subprocess.run([sys.executable, "-m", "vllm_tokenprune.cli", "vllm", "run-batch",
                    "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--model", model,
                    "--served-model-name", DEFAULT_SERVED_NAME, "--hf-overrides", overrides,
                    "--trust-request-mm-kwargs", "--enforce-eager"],
                   check=True, capture_output=True, timeout=600, env=os.environ)
    out = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert [out[str(i)]["response"]["status_code"] for i in range(4)] == [200, 200, 400, 200]
    assert [out[str(i)]["response"]["body"]["usage"]["prompt_tokens"] for i in (0, 1, 3)] == [
        tokens_at(0.25), tokens_at(0.1), tokens_at(1.0)]
    assert out["2"]["error"]["error"]["param"] == "mm_processor_kwargs.size"
