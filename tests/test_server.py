"""The serving spine end to end: a real `vllm-tokenprune serve` on every family's tiny
checkpoint, driven by the `openai` client. One server per family (start-up
costs ~25-50 s), started with a selector and an operator policy (floor 0.05, step 0.05)
that the ratios below respect.
"""

from __future__ import annotations

import itertools
import subprocess
import time

import openai
import pytest
import requests
from reference import NEW_TOKENS, QUESTION, chat, noise_image, stock_greedy
from server import Server, serve_command

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection.methods import IMAGE_METHOD_NAMES
from vllm_tokenprune.testbed.tiny import ARCHES, count_image_tokens, cpu_dtype
from vllm_tokenprune.tools.client import image_url

pytestmark = pytest.mark.server

IMAGE = noise_image(336, 252, seed=1)
RATIOS = (1.0, 0.5, 0.25, 0.1)
BLOCK = 32  # KV-cache block: the prefix cache's unit


@pytest.fixture(scope="module", params=ARCHES)  # every family pruning serves
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model(tiny_checkpoint, arch):
    return tiny_checkpoint(arch)


@pytest.fixture(scope="module")
def server(model, arch, random_selector, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with Server(model, "--selector", str(random_selector(arch)), "--dtype", cpu_dtype(arch),
                "--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 2}',
                "--min-keep-ratio", "0.05", "--keep-ratio-step", "0.05",
                "--block-size", str(BLOCK), "--enable-prompt-tokens-details",
                "--served-model-name", "tiny", log_path=log) as srv:
        print(f"\nserver healthy after {srv.startup_s:.1f} s")
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def ask(client, images=(IMAGE,), headers=None, extra_body=None, max_tokens=NEW_TOKENS, question=QUESTION):
    return client.chat.completions.create(
        model="tiny",
        messages=chat(images, lambda im: {"type": "image_url", "image_url": {"url": image_url(im)}}, question),
        max_tokens=max_tokens, temperature=0, extra_headers=headers or {},
        extra_body={"min_tokens": max_tokens, "return_token_ids": True, **(extra_body or {})},
    )


def test_prompt_tokens_fall_by_exactly_n_minus_k_in_any_order(client, model):
    n = count_image_tokens(model, IMAGE.size)
    full = ask(client, headers={"X-Keep-Ratio": "1.0"}).usage.prompt_tokens
    # Every order of the ratios, one after another: a stale cache entry would show up as
    # the count of the ratio asked for just before.
    for order in itertools.islice(itertools.permutations(RATIOS), 0, None, 5):
        for ratio in order:
            got = ask(client, headers={"X-Keep-Ratio": str(ratio)}, max_tokens=1).usage
            assert full - got.prompt_tokens == n - keep_count(n, ratio), (order, ratio)


def test_keep_one_reproduces_the_stock_model(client, model, arch):
    prompt, tokens = stock_greedy(model, [IMAGE], cpu_dtype(arch))
    for method in IMAGE_METHOD_NAMES:
        out = ask(client, headers={"X-Keep-Ratio": "1", "X-Prune-Method": method})
        assert out.choices[0].token_ids == tokens, method
        assert out.prompt_token_ids == prompt


def test_two_images_of_different_sizes(client, model):
    small, wide = noise_image(120, 90, seed=3), noise_image(500, 200, seed=4)
    n_small, n_wide = count_image_tokens(model, small.size), count_image_tokens(model, wide.size)
    full = full_media = None
    for ratio in (1.0, 0.25, 0.1):
        usage = ask(client, images=(small, wide), headers={"X-Keep-Ratio": str(ratio)},
                    max_tokens=1).usage
        kept = keep_count(n_small, ratio) + keep_count(n_wide, ratio)
        full = full or usage.prompt_tokens
        assert full - usage.prompt_tokens == n_small + n_wide - kept
        # vLLM counts an image's markers too (Gemma 3's <start_of_image>, InternVL's <img>), as stock
        media = usage.prompt_tokens_details.multimodal_tokens["image"]
        full_media = full_media or media
        assert full_media - media == n_small + n_wide - kept and media >= kept


def test_every_method_gives_the_same_count_and_is_deterministic(client):
    counts = set()
    for method in IMAGE_METHOD_NAMES:
        first = ask(client, headers={"X-Keep-Ratio": "0.25", "X-Prune-Method": method})
        again = ask(client, headers={"X-Keep-Ratio": "0.25", "X-Prune-Method": method})
        assert first.choices[0].token_ids == again.choices[0].token_ids, method
        counts.add(first.usage.prompt_tokens)
    assert len(counts) == 1


def test_the_question_is_part_of_the_image_for_methods_that_read_it(client, model):
    """Through the prefix cache: the image's blocks are reused by a repeat, and by another
    question only when the method does not read the question."""
    kept = keep_count(count_image_tokens(model, IMAGE.size), 0.5)
    if kept < BLOCK:
        pytest.skip(f"{kept} kept tokens fill no cache block before the question starts")
    for seed, method in enumerate(("norm", "cdpruner", "mmtok"), start=20):
        image = noise_image(*IMAGE.size, seed=seed)  # new to this server

        def cached(question):
            out = ask(client, images=(image,), question=question, max_tokens=1,
                      headers={"X-Keep-Ratio": "0.5", "X-Prune-Method": method})
            return out.usage.prompt_tokens_details.cached_tokens or 0

        assert cached("what is red ?") == 0
        repeat = cached("what is red ?")
        if method == "norm" and repeat == 0:
            # Qwen3.5's linear-attention state is not cached here; Gemma 4's two head sizes make
            # vLLM's hybrid cache blocks 64 tokens (the lcm of its groups'), longer than this prompt.
            pytest.skip("no prefix-cache hit even for a repeat (a hybrid cache this prompt fills no block of)")
        assert repeat >= BLOCK, method
        other = cached("what is blue ?")
        assert other == 0 if method != "norm" else other >= BLOCK, (method, other)


def test_selector_makes_learned_the_default(client):
    default = ask(client, headers={"X-Keep-Ratio": "0.25"})
    learned = ask(client, headers={"X-Keep-Ratio": "0.25", "X-Prune-Method": "learned"})
    assert default.choices[0].token_ids == learned.choices[0].token_ids


def test_operator_floor_and_step(client, model, server):
    n = count_image_tokens(model, IMAGE.size)
    full = ask(client, headers={"X-Keep-Ratio": "1"}, max_tokens=1).usage.prompt_tokens
    for asked, applied in (("0.26", 0.25), ("0.01", 0.05)):
        r = requests.post(server.url + "/chat/completions", headers={"X-Keep-Ratio": asked}, json={
            "model": "tiny", "max_tokens": 1,
            "messages": chat([IMAGE], lambda im: {"type": "image_url",
                                                  "image_url": {"url": image_url(im)}})})
        assert r.status_code == 200, r.text
        assert float(r.headers["x-keep-ratio-applied"]) == applied
        assert full - r.json()["usage"]["prompt_tokens"] == n - keep_count(n, applied)


def test_body_field_works_and_header_wins(client, model):
    n = count_image_tokens(model, IMAGE.size)
    full = ask(client, headers={"X-Keep-Ratio": "1"}, max_tokens=1).usage.prompt_tokens
    body = {"mm_processor_kwargs": {"keep_ratio": 0.5}}
    got = ask(client, extra_body=body, max_tokens=1).usage.prompt_tokens
    assert full - got == n - keep_count(n, 0.5)
    got = ask(client, headers={"X-Keep-Ratio": "0.25"}, extra_body=body, max_tokens=1)
    assert full - got.usage.prompt_tokens == n - keep_count(n, 0.25)


@pytest.mark.parametrize("foreign", [{"size": {"shortest_edge": 28}}, {"max_pixels": 10**9},
                                     {"min_pixels": 1}, {"num_crops": 64}])
def test_foreign_processor_kwargs_are_refused_by_name(client, foreign):
    # Passed to the HF image processor, these would choose the image's token count and memory.
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, extra_body={"mm_processor_kwargs": {"keep_ratio": 0.5, **foreign}}, max_tokens=1)
    (key,) = foreign
    assert err.value.body["param"] == f"mm_processor_kwargs.{key}"
    assert ask(client, headers={"X-Keep-Ratio": "0.5"}, max_tokens=1).usage.prompt_tokens


BAD_HEADERS = [
    ({"X-Keep-Ratio": "nan"}, "X-Keep-Ratio"),
    ({"X-Keep-Ratio": "inf"}, "X-Keep-Ratio"),
    ({"X-Keep-Ratio": "0"}, "X-Keep-Ratio"),
    ({"X-Keep-Ratio": "-0.5"}, "X-Keep-Ratio"),
    ({"X-Keep-Ratio": "1.5"}, "X-Keep-Ratio"),
    ({"X-Keep-Ratio": "a quarter"}, "X-Keep-Ratio"),
    ({"X-Keep-Ratio": "0." + "2" * 4000}, "X-Keep-Ratio"),
    ({"X-Prune-Method": "magic"}, "X-Prune-Method"),
]


@pytest.mark.parametrize("headers,named", BAD_HEADERS, ids=[str(i) for i in range(len(BAD_HEADERS))])
def test_bad_input_is_a_400_and_the_server_keeps_serving(client, headers, named):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, headers=headers, max_tokens=1)
    assert err.value.status_code == 400
    assert named in err.value.message
    assert ask(client, headers={"X-Keep-Ratio": "0.5"}, max_tokens=1).choices[0].finish_reason


def test_bad_body_field_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="mm_processor_kwargs.keep_ratio"):
        ask(client, extra_body={"mm_processor_kwargs": {"keep_ratio": "lots"}}, max_tokens=1)


def test_metrics_move_by_the_right_amounts(client, server, model):
    n = count_image_tokens(model, IMAGE.size)
    labels = 'model_name="tiny"'
    before = server.metrics()
    ask(client, headers={"X-Keep-Ratio": "0.25", "X-Prune-Method": "random"}, max_tokens=1)
    ask(client, images=(IMAGE, IMAGE), headers={"X-Keep-Ratio": "0.5",
                                                "X-Prune-Method": "random"}, max_tokens=1)
    time.sleep(0.5)
    after = server.metrics()

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta(f"tokenprune_image_tokens_in_total{{{labels}}}") == 3 * n
    assert delta(f"tokenprune_image_tokens_kept_total{{{labels}}}") == (
        keep_count(n, 0.25) + 2 * keep_count(n, 0.5))
    assert delta(f'tokenprune_requests_total{{method="random",{labels}}}') == 2
    assert delta(f'tokenprune_images_total{{method="random",{labels}}}') == 3
    assert delta(f"tokenprune_keep_ratio_count{{{labels}}}") == 2
    assert delta(f"tokenprune_keep_ratio_sum{{{labels}}}") == pytest.approx(0.75)
    assert delta(f'tokenprune_keep_ratio_bucket{{le="0.25",{labels}}}') == 1


def test_an_image_sent_again_as_its_uuid_alone_is_served_and_counted(client, server, model):
    """vLLM lets a client send an image its cache holds as the uuid alone, without pixels:
    served as when the pixels came, and counted with the N the image had when processed."""
    n = count_image_tokens(model, IMAGE.size)
    sent = {"type": "image_url", "image_url": {"url": image_url(IMAGE)}, "uuid": "tokenprune-uuid-test"}
    labels = 'model_name="tiny"'
    before = server.metrics()
    usage = [client.chat.completions.create(
        model="tiny", messages=chat([IMAGE], lambda _: part, QUESTION), max_tokens=1,
        extra_headers={"X-Keep-Ratio": "0.5"}).usage.prompt_tokens
        for part in (sent, {**sent, "image_url": None})]
    time.sleep(0.5)
    after = server.metrics()
    assert usage[0] == usage[1]
    assert after[f"tokenprune_image_tokens_in_total{{{labels}}}"] - before.get(
        f"tokenprune_image_tokens_in_total{{{labels}}}", 0.0) == 2 * n


def test_mismatched_selector_stops_startup(model, arch, random_selector):
    other = random_selector("llava" if arch.startswith("qwen") else "qwen2.5-vl")
    proc = subprocess.run(serve_command(model, "--selector", str(other), port=1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "does not fit the served model" in proc.stderr
    assert "vision_model_type: expected" in proc.stderr


def test_a_question_reader_of_another_width_stops_startup(model, arch, random_selector, tmp_path):
    from vllm_tokenprune.selection.selector import (
        QUERY_SECTION,
        SelectorConfig,
        TokenSelector,
        load_query_selector,
        query_section,
        read_checkpoint,
    )
    from vllm_tokenprune.training.reconstruction import write_checkpoint

    tensors, meta = read_checkpoint(random_selector(arch), "cpu")
    config = load_query_selector(random_selector(arch))[0].config
    header, wider = query_section(TokenSelector(SelectorConfig(feature_dim=config.feature_dim,
                                                               query_dim=config.query_dim + 8)), {})
    path = tmp_path / "selector.safetensors"
    write_checkpoint(path, {**{k: v for k, v in tensors.items() if not k.startswith("query_selector.")}, **wider},
                     {**meta, QUERY_SECTION: header})
    proc = subprocess.run(serve_command(model, "--selector", str(path), port=1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"reads questions of width {config.query_dim + 8}" in proc.stderr


def test_unreadable_selector_stops_startup(model, tmp_path):
    bogus = tmp_path / "selector.pt"
    bogus.write_bytes(b"\x80\x04not a safetensors file")
    proc = subprocess.run(serve_command(model, "--selector", str(bogus), port=1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "not a safetensors file" in proc.stderr
