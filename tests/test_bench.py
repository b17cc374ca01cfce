"""The load test and vLLM's own `vllm bench serve` against a real pruning server."""

from __future__ import annotations

import json

import pytest
from server import Server

from vllm_tokenprune import cli
from vllm_tokenprune.bench import run_vllm_bench
from vllm_tokenprune.budget import keep_count
from vllm_tokenprune.tiny import count_image_tokens

pytestmark = pytest.mark.server
SIZE = 168


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint("llava")
    log = tmp_path_factory.mktemp("bench") / "server.log"
    with Server(model, "--dtype", "float32", "--max-model-len", "1024",
                "--served-model-name", "tiny", log_path=log) as server:
        yield model, server


def test_vllm_bench_serve_with_a_keep_ratio_header(served):
    """`vllm bench serve --header x-keep-ratio=R` on the offline random-mm image dataset:
    it completes, and its prompt-token total shows exactly N - K fewer tokens per request."""
    model, server = served
    n = count_image_tokens(model, (SIZE, SIZE))
    prompts = 6
    results = {ratio: run_vllm_bench(
        server.root, "tiny", str(model), ratio=ratio, method="norm", concurrency=2,
        prompts=prompts, size=SIZE, text_tokens=16, output_tokens=2, seed=7)
        for ratio in (1.0, 0.25)}
    for result in results.values():
        assert result["completed"] == prompts and result["failed"] == 0
    # Same seed, same text: the only difference is the pruned image tokens.
    saved = results[1.0]["total_input_tokens"] - results[0.25]["total_input_tokens"]
    assert saved == prompts * (n - keep_count(n, 0.25))


def test_bench_command_writes_results_and_soaks_cleanly(served, tmp_path):
    model, server = served
    out = tmp_path / "results"
    code = cli.main(["bench", "--model", str(model), "--url", server.root, "--out", str(out),
                     "--ratios", "1.0,0.25", "--methods", "norm", "--concurrency", "1,4",
                     "--prompts-per-cell", "8", "--paired-rounds", "3", "--prefill-rounds", "2", "--parts-rounds", "2",
                     "--image-size", str(SIZE), "--output-tokens", "2", "--soak-seconds", "10"])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    n = count_image_tokens(model, (SIZE, SIZE))
    paired = {c["keep_ratio"]: c for c in report["paired"]["cells"]}
    assert paired[1.0]["prompt_tokens"] - paired[0.25]["prompt_tokens"] == n - keep_count(n, 0.25)
    assert paired[1.0]["ideal_speedup"] == pytest.approx(1.0)
    assert paired[0.25]["fraction_of_ideal"] == pytest.approx(
        paired[0.25]["speedup_median_paired"] / paired[0.25]["ideal_speedup"])
    assert len(report["prefill"]["points"]) == 5
    parts = report["parts"]
    assert parts["tokens"] == n and parts["tower_s"] > 0 and not parts["trained_selector"]
    assert parts["selector_of_tower"] == pytest.approx(parts["selector_s"] / parts["tower_s"])
    cells = {(c["concurrency"], c["keep_ratio"]) for c in report["sweep"]}
    assert cells == {(1, 1.0), (1, 0.25), (4, 1.0), (4, 0.25)}
    assert all(c["completed"] == 8 and c["failed"] == 0 for c in report["sweep"])
    soak = report["soak"]
    assert soak["good"] > 0 and soak["good_failed"] == 0 and soak["bad_other"] == 0
    assert report["environment"]["commit"]
    assert (out / "results.md").read_text().startswith("# Benchmark")
    assert "% of the tower" in (out / "results.md").read_text()
    assert (out / "ttft_throughput.png").stat().st_size > 10_000
