"""Keep ratio auto through a real `vllm-tokenprune serve`, on the tiny LLaVA and the tiny
Qwen2.5-VL (dynamic resolution), each served with a selector and budget predictor trained
here on images from nearly blank to dense (conftest ``budget_selector``)."""

from __future__ import annotations

import pytest
import requests
from density import density_image
from server import Server

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.testbed.tiny import count_image_tokens
from vllm_tokenprune.tools.client import image_url

pytestmark = pytest.mark.server

FLOOR = 0.05
# Qwen keeps each size (a different N per image); LLaVA makes every image 144 tokens.
SIZES = {"llava": [(168, 168), (168, 168)], "qwen2.5-vl": [(224, 168), (112, 112)]}


@pytest.fixture(scope="module", params=list(SIZES))
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def server(arch, tiny_checkpoint, budget_selector, tmp_path_factory):
    log = tmp_path_factory.mktemp("auto-server") / "server.log"
    with Server(tiny_checkpoint(arch), "--selector", str(budget_selector(arch)), "--dtype", "float32",
                "--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 2}',
                "--min-keep-ratio", str(FLOOR), "--served-model-name", "tiny", log_path=log) as srv:
        yield srv


def ask(server, images, headers=None, kwargs=None):
    """(status, response headers, JSON body) of a one-token chat with ``images``."""
    content = [{"type": "image_url", "image_url": {"url": image_url(im)}} for im in images]
    body = {"model": "tiny", "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "hi"}]}]}
    if kwargs is not None:
        body["mm_processor_kwargs"] = kwargs
    response = requests.post(server.url + "/chat/completions", json=body, headers=headers or {}, timeout=120)
    return response.status_code, response.headers, response.json()


def kept(server, images, n, **request) -> list[int]:
    """Each image's K, asked one image per request: N minus what its prompt lost against keep 1."""
    ks = []
    for image, tokens in zip(images, n):
        full = ask(server, [image], {"X-Keep-Ratio": "1"})[2]["usage"]["prompt_tokens"]
        status, _, out = ask(server, [image], **request)
        assert status == 200, out
        ks.append(tokens - (full - out["usage"]["prompt_tokens"]))
    return ks


def test_auto_gives_a_dense_image_more_tokens_than_a_blank_one_every_time(server, arch, tiny_checkpoint):
    model = tiny_checkpoint(arch)
    sizes = SIZES[arch]
    n = [count_image_tokens(model, size) for size in sizes]
    blank, dense = (density_image(*size, density, seed=11) for size, density in zip(sizes, (0.0, 1.0)))
    k_blank, k_dense = kept(server, [blank, dense], n, headers={"X-Keep-Ratio": "auto"})
    print(f"\n{arch}: blank keeps {k_blank} of {n[0]}, dense {k_dense} of {n[1]}")
    assert keep_count(n[0], FLOOR) <= k_blank and k_blank / n[0] < k_dense / n[1] <= 1
    # The same image again (a processor-cache hit) and a fresh copy of it: the same K.
    again = [density_image(*size, density, seed=11) for size, density in zip(sizes, (0.0, 1.0))]
    assert kept(server, again, n, headers={"X-Keep-Ratio": "auto"}) == [k_blank, k_dense]
    # Both in one request: each keeps its own K.
    status, headers, out = ask(server, [blank, dense], {"X-Keep-Ratio": "auto"})
    full = ask(server, [blank, dense], {"X-Keep-Ratio": "1"})[2]["usage"]["prompt_tokens"]
    assert status == 200 and full - out["usage"]["prompt_tokens"] == (n[0] - k_blank) + (n[1] - k_dense)
    assert headers["X-Keep-Ratio-Applied"] == "auto"
    # Bounds, in the body: the dense image is capped, the blank one raised.
    status, headers, out = ask(server, [blank, dense], kwargs={"keep_ratio": "auto;min=0.3;max=0.4"})
    expected = keep_count(n[0], max(0.3, k_blank / n[0])), min(k_dense, keep_count(n[1], 0.4))
    assert status == 200 and headers["X-Keep-Ratio-Applied"] == "auto;min=0.3;max=0.4"
    assert full - out["usage"]["prompt_tokens"] == sum(t - k for t, k in zip(n, expected))


@pytest.mark.parametrize("headers,kwargs,param", [
    ({"X-Keep-Ratio": "auto;min=0"}, None, "X-Keep-Ratio header"),
    ({"X-Keep-Ratio": "auto;max=0.2;min=0.5"}, None, "X-Keep-Ratio header"),
    ({"X-Keep-Ratio": "auto;top=3"}, None, "X-Keep-Ratio header"),
    (None, {"keep_ratio": "auto;max=nan"}, "mm_processor_kwargs.keep_ratio"),
    (None, {"keep_ratio": "automatic"}, "mm_processor_kwargs.keep_ratio"),
])
def test_malformed_auto_is_a_400_naming_the_header_or_field(server, headers, kwargs, param):
    status, _, out = ask(server, [density_image(112, 112, 0.5, seed=3)], headers, kwargs)
    assert status == 400, out
    assert out["error"]["param"] == param and "auto" in out["error"]["message"]


def test_metrics_observe_each_images_fraction_under_auto(server, arch):
    name = 'tokenprune_auto_keep_fraction_{}{{model_name="tiny"}}'
    before = server.metrics()
    images = [density_image(*size, 0.5, seed=21) for size in SIZES[arch]]
    assert ask(server, images, {"X-Keep-Ratio": "auto"})[0] == 200
    assert ask(server, images[:1], {"X-Keep-Ratio": "0.5"})[0] == 200  # a number: not observed here
    after = server.metrics()
    assert after[name.format("count")] - before.get(name.format("count"), 0) == 2
    added = after[name.format("sum")] - before.get(name.format("sum"), 0)
    assert FLOOR * 2 <= added <= 2
