"""Videos through a real `vllm-tokenprune serve` on the tiny checkpoints of the families that
prune them (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and its MoE, LLaVA-OneVision), driven over
HTTP with an mp4 in a data URL: each video keeps exactly K of its N tokens under its own ratio
and method, beside images at theirs, requests of several ratios at once answer as each alone,
and hostile video choices are 400s. A family that serves videos whole refuses a video ratio
(InternVL). Qwen's positions are checked offline (tests/test_qwen.py)."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import re

import cv2
import numpy as np
import pytest
import requests
from reference import noise_image
from server import Server

from vllm_tokenprune.families import FAMILIES
from vllm_tokenprune.policy import keep_count, video_keep_count
from vllm_tokenprune.testbed.tiny import cpu_dtype
from vllm_tokenprune.tools.client import image_url

pytestmark = pytest.mark.server

FRAMES, SIDE = 8, 112
IMAGE = noise_image(140, 112, seed=3)


def mp4(path, seed: int) -> str:
    """An 8-frame clip of moving noise as a data URL (OpenCV's mp4v, which vLLM's loader reads)."""
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 2.0, (SIDE, SIDE))
    for _ in range(FRAMES):
        writer.write(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
    writer.release()
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return [mp4(folder / f"{seed}.mp4", seed) for seed in range(3)]


@pytest.fixture(scope="module", params=[f.name for f in FAMILIES if f.videos])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def server(arch, tiny_checkpoint, random_selector, tmp_path_factory):
    with Server(tiny_checkpoint(arch), "--selector", str(random_selector(arch)), "--dtype", cpu_dtype(arch),
                "--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 1, "video": 1}',
                "--min-keep-ratio", "0.05", "--served-model-name", "tiny",
                log_path=tmp_path_factory.mktemp("server") / "server.log") as srv:
        yield srv


def ask(server, clip, headers=None, kwargs=None, image=False, max_tokens=3):
    """(status, response headers, JSON) of a chat request with the clip (after an image if asked)."""
    content = ([{"type": "image_url", "image_url": {"url": image_url(IMAGE)}}] if image else []) + [
        {"type": "video_url", "video_url": {"url": clip}}, {"type": "text", "text": "What moves?"}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "min_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
            **({"mm_processor_kwargs": kwargs} if kwargs else {})}
    r = requests.post(server.url + "/chat/completions", json=body, headers=headers or {}, timeout=120)
    return r.status_code, r.headers, r.json()


def media(out, token: int) -> int:
    """How many of a response's prompt tokens are ``token`` (a video's or an image's
    placeholders; vLLM's multimodal count takes Qwen3-VL's timestamps in too)."""
    return out["prompt_token_ids"].count(token)


@pytest.fixture(scope="module")
def tokens(arch, tiny_checkpoint) -> dict[str, int]:
    config = json.loads((tiny_checkpoint(arch) / "config.json").read_text())
    return {m: config.get(f"{m}_token_id", config.get(f"{m}_token_index")) for m in ("video", "image")}


def shape(server, clip, tokens, arch) -> tuple[int, int, int]:
    """The clip's N on this server (served whole), the tokens its first frame needs whole
    (``video_keep_count``'s frame), and the prompt's length."""
    status, _, out = ask(server, clip)
    assert status == 200, out
    n = media(out, tokens["video"])
    if arch == "llava-onevision":  # a frame a frame, then one newline, which stays
        return n, (n - 1) // FRAMES + 1, out["usage"]["prompt_tokens"]
    return n, n // (FRAMES // 2), out["usage"]["prompt_tokens"]  # Qwen: two frames a temporal patch


def test_a_video_keeps_exactly_k_under_its_own_ratio_and_method(server, clips, tokens, arch):
    n, frame, full = shape(server, clips[0], tokens, arch)
    cases = [({"X-Keep-Ratio": "video=0.5"}, None, 0.5, "evs"),
             ({"X-Keep-Ratio": "video=0.1"}, None, 0.1, "evs"),  # evs keeps the first frame whole
             ({"X-Keep-Ratio": "video=0.25", "X-Prune-Method": "video=norm"}, None, 0.25, "norm"),
             ({}, {"video_keep_ratio": 0.25, "video_prune_method": "learned"}, 0.25, "learned"),
             ({"X-Keep-Ratio": "video=0.5"}, {"video_keep_ratio": 0.25}, 0.5, "evs"),  # the header wins
             ({"X-Keep-Ratio": "video=0.02", "X-Prune-Method": "video=random"}, None, 0.05, "random")]  # floor
    for headers, kwargs, ratio, method in cases:
        status, answer, out = ask(server, clips[0], headers, kwargs)
        assert status == 200, (headers, kwargs, out)
        k = video_keep_count(n, frame, ratio, method == "evs")
        assert media(out, tokens["video"]) == k and full - out["usage"]["prompt_tokens"] == n - k, (headers, kwargs)
        assert answer["x-keep-ratio-applied"] == f"1.0, video={ratio!r}"


def test_keep_one_is_the_video_served_whole(server, clips):
    _, _, plain = ask(server, clips[1], max_tokens=6)
    for method in ("evs", "norm", "learned"):
        _, _, whole = ask(server, clips[1], {"X-Keep-Ratio": "video=1", "X-Prune-Method": f"video={method}"},
                          max_tokens=6)
        assert whole["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"], method
        assert whole["prompt_token_ids"] == plain["prompt_token_ids"], method


def test_images_and_videos_in_one_request_keep_their_own_ratios(server, clips, tokens):
    _, _, whole = ask(server, clips[0], image=True)
    n_image, n = media(whole, tokens["image"]), media(whole, tokens["video"])
    _, _, out = ask(server, clips[0], {"X-Keep-Ratio": "0.5, video=0.25", "X-Prune-Method": "norm, video=norm"},
                    image=True)
    assert media(out, tokens["image"]) == keep_count(n_image, 0.5)
    assert media(out, tokens["video"]) == keep_count(n, 0.25)


def test_requests_of_several_video_ratios_at_once_answer_as_each_alone(server, clips, arch):
    asks = [({"X-Keep-Ratio": f"video={r}", "X-Prune-Method": f"video={m}"}, clip)
            for (r, m), clip in zip([(0.25, "norm"), (1.0, "evs"), (0.5, "evs"), (0.1, "random")] * 2, clips * 3)]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(lambda a: ask(server, a[1], a[0], max_tokens=5), asks))
    for (headers, clip), (status, _, out) in zip(asks, together):
        _, _, alone = ask(server, clip, headers, max_tokens=5)
        assert status == 200 and out["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"], headers
        if cpu_dtype(arch) == "float32":  # bf16 (Qwen3.5 on CPU) may part at a near-tie in a batch
            assert out["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"], headers


@pytest.mark.parametrize("headers,kwargs,param", [
    ({"X-Keep-Ratio": "video=auto"}, None, "X-Keep-Ratio header"),
    ({"X-Keep-Ratio": "video=0"}, None, "X-Keep-Ratio header"),
    ({"X-Keep-Ratio": "video=0.5, video=0.25"}, None, "X-Keep-Ratio header"),
    ({"X-Prune-Method": "video=hiprune"}, None, "X-Prune-Method header"),  # reads the tower's attention
    ({"X-Prune-Method": "evs"}, None, "X-Prune-Method header"),  # a video method, for images
    ({}, {"video_keep_ratio": "nan"}, "mm_processor_kwargs.video_keep_ratio"),
    ({}, {"video_prune_method": 3}, "mm_processor_kwargs.video_prune_method"),
])
def test_hostile_video_choices_are_400s_and_the_server_keeps_serving(server, clips, headers, kwargs, param):
    status, _, out = ask(server, clips[2], headers, kwargs)
    assert status == 400 and out["error"]["param"] == param, out
    assert ask(server, clips[2], {"X-Keep-Ratio": "video=0.5"})[0] == 200


def test_the_metrics_count_video_tokens_in_and_kept(server, clips, tokens, arch):
    def counters():
        text = requests.get(server.root + "/metrics", timeout=10).text
        return [float(re.search(rf'^{name}{{model_name="tiny"}} (\S+)$', text, re.M).group(1))
                for name in ("tokenprune_video_tokens_in_total", "tokenprune_video_tokens_kept_total")]

    n, _, _ = shape(server, clips[0], tokens, arch)
    before = counters()
    ask(server, clips[0], {"X-Keep-Ratio": "video=0.25", "X-Prune-Method": "video=norm"})
    after = counters()
    assert [a - b for a, b in zip(after, before)] == [n, keep_count(n, 0.25)]


def test_a_family_that_serves_videos_whole_refuses_a_video_ratio(tiny_checkpoint, clips, tmp_path):
    with Server(tiny_checkpoint("internvl"), "--dtype", "float32", "--max-model-len", "4096",
                "--limit-mm-per-prompt", '{"video": 1}', "--served-model-name", "tiny",
                log_path=tmp_path / "server.log") as srv:
        status, _, out = ask(srv, clips[0], {"X-Keep-Ratio": "video=0.5"})
        assert status == 400 and out["error"]["param"] == "X-Keep-Ratio header"
        assert "served whole" in out["error"]["message"]
        assert ask(srv, clips[0], {"X-Keep-Ratio": "0.5"})[0] == 200
