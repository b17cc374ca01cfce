"""Pruning when vLLM runs several processes, on CPU: tensor parallelism (two workers
each run the pruned model's `embed_multimodal` and must keep the same tokens), data
parallelism (two engines), and two API server processes (our counters live there, so
/metrics must sum them through prometheus_client's multiprocess mode).

Each server is started once and everything a test checks is recorded while it runs;
servers run one at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from reference import chat, noise_image
from server import Server

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.testbed.tiny import count_image_tokens
from vllm_tokenprune.tools.client import image_url

pytestmark = pytest.mark.server

IMAGE = noise_image(336, 252, seed=1)
CASES = [(0.25, "learned"), (0.25, "norm"), (0.25, "random"), (0.5, "norm"), (1.0, "norm")]
NEW_TOKENS = 8
COMMON_ARGS = ("--dtype", "float32", "--max-model-len", "4096", "--served-model-name", "tiny")


def two_cpu_binding() -> dict[str, str]:
    """vLLM on CPU binds each worker's threads to a NUMA node of its own ("auto"), and
    refuses two workers on a one-node machine: "Not enough allowed NUMA nodes to bind
    threads of 2 local CPUWorkers". One core per worker, given by hand, works."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"two workers need two CPUs, this process may use {cpus}")
    return {"VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"}


@dataclass(frozen=True)
class Answer:
    image_tokens: int
    token_ids: list[int]
    logprobs: list[float]


def ask(server: Server, ratio: float, method: str, headers: dict | None = None) -> Answer:
    """One chat request on a fresh connection (so the kernel may pick either API server)."""
    response = requests.post(server.url + "/chat/completions", timeout=60, headers={
        "X-Keep-Ratio": str(ratio), "X-Prune-Method": method, **(headers or {})}, json={
        "model": "tiny", "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS, "temperature": 0,
        "logprobs": True, "return_token_ids": True,
        "messages": chat([IMAGE], lambda im: {"type": "image_url", "image_url": {"url": image_url(im)}})})
    assert response.status_code == 200, response.text
    body = response.json()
    choice = body["choices"][0]
    return Answer(body["usage"]["prompt_tokens_details"]["multimodal_tokens"]["image"],
                  choice["token_ids"], [t["logprob"] for t in choice["logprobs"]["content"]])


def scrape(server: Server) -> dict[tuple[str, tuple], float]:
    text = requests.get(server.root + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and labels.items() <= dict(ls).items())


def requests_counted_per_process(multiproc_dir: Path) -> dict[str, float]:
    """tokenprune_requests_total as each process's own prometheus_client file holds it."""
    counted = {}
    for path in multiproc_dir.glob("counter_*.db"):
        families = MultiProcessCollector.merge([str(path)], accumulate=True)
        counted[path.stem.removeprefix("counter_")] = sum(
            s.value for f in families if f.name == "tokenprune_requests" for s in f.samples
            if s.name == "tokenprune_requests_total")
    return counted


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("llava")  # 4 attention heads, 2 KV heads: splits over 2 workers


@pytest.fixture(scope="module")
def selector(random_selector):
    return str(random_selector("llava"))


@dataclass
class DataParallelRun:
    per_engine: dict[int, list[Answer]]  # CASES answered by engine 0 and by engine 1
    engine_prompt_tokens: dict[int, float]  # vllm:prompt_tokens_total added per engine
    sent: int  # image requests spread over the API servers
    counted_per_process: dict[str, float]
    scrapes: list[dict]


@pytest.fixture(scope="module")
def data_parallel(model, selector, tmp_path_factory):
    """Two engines and two API servers, with a PROMETHEUS_MULTIPROC_DIR of our own (as
    production-stack's chart sets one) so that each process's counters can be read."""
    multiproc_dir = tmp_path_factory.mktemp("prometheus")
    log = tmp_path_factory.mktemp("dp") / "server.log"
    env = {**two_cpu_binding(), "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    with Server(model, "--selector", selector, *COMMON_ARGS, "--data-parallel-size", "2",
                "--api-server-count", "2", env=env, log_path=log) as server:
        print(f"\ndata-parallel server healthy after {server.startup_s:.1f} s")
        before = scrape(server)
        per_engine = {rank: [ask(server, r, m, {"X-data-parallel-rank": str(rank)})
                             for r, m in CASES] for rank in (0, 1)}
        after = scrape(server)
        prompt_tokens = {rank: total(after, "vllm:prompt_tokens_total", engine=str(rank))
                         - total(before, "vllm:prompt_tokens_total", engine=str(rank))
                         for rank in (0, 1)}
        # Which API server takes a connection is the kernel's choice (SO_REUSEPORT); send
        # until both have counted a request, within a bound.
        sent = 0
        while sent < 40:
            ask(server, 0.25, "norm")
            sent += 1
            counted = requests_counted_per_process(multiproc_dir)
            if sent >= 4 and sum(v > 0 for v in counted.values()) >= 2:
                break
        scrapes = [scrape(server) for _ in range(6)]
    return DataParallelRun(per_engine, prompt_tokens, sent, counted, scrapes)


@pytest.fixture(scope="module")
def tensor_parallel(model, selector, tmp_path_factory, data_parallel):
    """Answers of a server whose model is split over two workers (started after the
    data-parallel server has stopped)."""
    log = tmp_path_factory.mktemp("tp") / "server.log"
    with Server(model, "--selector", selector, *COMMON_ARGS, "--tensor-parallel-size", "2",
                env=two_cpu_binding(), log_path=log) as server:
        print(f"\ntensor-parallel server healthy after {server.startup_s:.1f} s")
        return [ask(server, r, m) for r, m in CASES]


def test_data_parallel_engines_prune_alike(data_parallel, model):
    n = count_image_tokens(model, IMAGE.size)
    engine0, engine1 = data_parallel.per_engine[0], data_parallel.per_engine[1]
    for (ratio, method), a, b in zip(CASES, engine0, engine1):
        assert a.image_tokens == b.image_tokens == keep_count(n, ratio), (ratio, method)
        assert a.token_ids == b.token_ids, (ratio, method)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4), (ratio, method)
    # Each engine did prefill the pruned prompts it was sent (the rank header was honoured).
    for rank in (0, 1):
        assert data_parallel.engine_prompt_tokens[rank] > 0, rank
    assert data_parallel.engine_prompt_tokens[0] == data_parallel.engine_prompt_tokens[1]


def test_tensor_parallel_workers_keep_the_same_tokens(tensor_parallel, data_parallel):
    # A worker that kept other tokens than its peer would feed the shared attention and
    # MLP different hidden states, and the result would drift from the one-worker engine.
    for (ratio, method), tp, single in zip(CASES, tensor_parallel, data_parallel.per_engine[0]):
        assert tp.image_tokens == single.image_tokens, (ratio, method)
        assert tp.token_ids == single.token_ids, (ratio, method)
        assert tp.logprobs == pytest.approx(single.logprobs, abs=1e-3), (ratio, method)


def test_metrics_sum_over_api_server_processes(data_parallel, model):
    counted = {pid: v for pid, v in data_parallel.counted_per_process.items() if v > 0}
    assert len(counted) >= 2, f"one API server took all {data_parallel.sent} requests: {counted}"
    n = count_image_tokens(model, IMAGE.size)
    requests_sent = data_parallel.sent + 2 * len(CASES)
    assert sum(counted.values()) == requests_sent
    labels = {"model_name": "tiny"}
    for samples in data_parallel.scrapes:  # whichever process answers the scrape
        assert total(samples, "tokenprune_requests_total", **labels) == requests_sent
        assert total(samples, "tokenprune_image_tokens_in_total", **labels) == n * requests_sent
        kept = data_parallel.sent * keep_count(n, 0.25) + 2 * sum(
            keep_count(n, ratio) for ratio, _ in CASES)
        assert total(samples, "tokenprune_image_tokens_kept_total", **labels) == kept
        assert total(samples, "tokenprune_keep_ratio_count", **labels) == requests_sent
