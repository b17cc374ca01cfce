"""The load test and vLLM's own `vllm bench serve` against a real pruning server."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from server import Server
from stamps import assert_stamped

from vllm_tokenprune import cli
from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.testbed.tiny import count_image_tokens
from vllm_tokenprune.tools.bench import run_vllm_bench

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
    argv = ["bench", "--model", str(model), "--url", server.root, "--out", str(out),
            "--ratios", "1.0,0.25", "--methods", "norm", "--paired-methods", "norm,random",
            "--paired-images", "clutter", "--concurrency", "1,4",
            "--prompts-per-cell", "8", "--paired-rounds", "3", "--prefill-rounds", "2", "--parts-rounds", "2",
            "--image-size", str(SIZE), "--output-tokens", "2", "--soak-seconds", "10", "--allow-dirty"]
    code = cli.main(argv)
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    n = count_image_tokens(model, (SIZE, SIZE))
    paired = {(c["method"], c["keep_ratio"]): c for c in report["paired"]["cells"]}
    assert list(paired) == [(None, 1.0), ("norm", 0.25), ("random", 0.25)]
    assert report["paired"]["images"] == "clutter"
    for method in ("norm", "random"):
        assert paired[None, 1.0]["prompt_tokens"] - paired[method, 0.25]["prompt_tokens"] == n - keep_count(n, 0.25)
        assert paired[method, 0.25]["fraction_of_ideal"] == pytest.approx(
            paired[method, 0.25]["speedup_median_paired"] / paired[method, 0.25]["ideal_speedup"])
    assert paired[None, 1.0]["ideal_speedup"] == pytest.approx(1.0)
    assert len(report["prefill"]["points"]) == 5
    parts = report["parts"]
    assert parts["tokens"] == n and parts["tower_s"] > 0 and not parts["trained_selector"]
    assert parts["selector_of_tower"] == pytest.approx(parts["selector_s"] / parts["tower_s"])
    cells = {(c["concurrency"], c["keep_ratio"]) for c in report["sweep"]}
    assert cells == {(1, 1.0), (1, 0.25), (4, 1.0), (4, 0.25)}
    assert all(c["completed"] == 8 and c["failed"] == 0 for c in report["sweep"])
    soak = report["soak"]
    assert soak["good"] > 0 and soak["good_failed"] == 0 and soak["bad_other"] == 0
    assert_stamped(report, "vllm-tokenprune", *argv)
    assert report["environment"]["model"]["path"] == str(model)
    assert (out / "results.md").read_text().startswith("# Benchmark")
    assert "% of the tower" in (out / "results.md").read_text()
    assert (out / "ttft_throughput.png").stat().st_size > 10_000


def test_paired_arms_share_keep_one_and_rotate_fresh_images():
    """Keep 1.0 is one arm for every method; the one-client comparison rotates its arms every
    round and sends each request a scene no other request had."""
    from vllm_tokenprune.tools.bench import measure_paired, paired_arms, paired_messages

    arms = paired_arms([1.0, 0.5, "auto"], ["learned", "learned_query"])
    assert arms == [(1.0, None), (0.5, "learned"), ("auto", "learned"), (0.5, "learned_query"),
                    ("auto", "learned_query")]
    sent = []

    class Completions:
        def create(self, *, messages, extra_headers, **_):
            sent.append((extra_headers.get("X-Keep-Ratio"), extra_headers.get("X-Prune-Method"),
                         messages[0]["content"][0]["image_url"]["url"]))
            usage = type("Usage", (), {"prompt_tokens": 10})
            return type("Response", (), {"usage": usage})

    client = type("Client", (), {"chat": type("Chat", (), {"completions": Completions()})})
    result = measure_paired(client, "m", arms, 2, paired_messages("clutter", 0, np.random.default_rng(0)))
    assert len({url for *_, url in sent}) == len(sent) == 3 * len(arms)
    firsts = [sent[r * len(arms)][:2] for r in range(3)]
    assert firsts == [("1.0", None), ("0.5", "learned"), ("auto", "learned")]
    assert [(c["keep_ratio"], c["method"]) for c in result["cells"]] == arms


def test_the_prefill_line_fits_the_context_and_salts_every_request():
    """Prompts up to 80% of the served context, the same words every round (a word-level
    tokenizer reads any fresh word as its unknown token), each request its own cache salt."""
    from vllm_tokenprune.tools.bench import measure_prefill_line

    sent = []

    class Completions:
        def create(self, *, messages, extra_body, **_):
            text = messages[0]["content"]
            sent.append((text, extra_body["cache_salt"]))
            return type("Response", (), {"usage": type("Usage", (), {"prompt_tokens": len(text.split())})})

    card = type("Card", (), {"id": "m", "max_model_len": 512})
    models = type("Models", (), {"list": lambda self: type("Page", (), {"data": [card]})})()
    client = type("Client", (), {"chat": type("Chat", (), {"completions": Completions()}), "models": models})
    line = measure_prefill_line(client, "m", 2)
    assert max(p["prompt_tokens"] for p in line["points"]) <= 0.8 * 512
    assert len({salt for _, salt in sent}) == len(sent) == 3 * 5
    assert len({text for text, _ in sent}) == 5


def test_unique_images_differ_in_bytes_not_pixels():
    from vllm_tokenprune.tools.overhead import base_images, unique

    jpeg = base_images(64, 1, seed=0)[0]
    a, b = unique(jpeg, 1), unique(jpeg, 2)
    assert len({jpeg, a, b}) == 3
    decoded = [np.asarray(Image.open(io.BytesIO(x))) for x in (jpeg, a, b)]
    assert (decoded[0] == decoded[1]).all() and (decoded[0] == decoded[2]).all()


def test_against_stock_compares_interleaved_rounds(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llava")
    out = tmp_path / "against-stock"
    argv = ["bench", "--against-stock", "--model", str(model), "--out", str(out),
            "--stock-rounds", "2", "--stock-images", "1,2", "--stock-concurrency", "2",
            "--stock-image-size", "256", "--stock-requests", "2", "--allow-dirty", "--dtype", "float32",
            "--max-model-len", "1024"]
    assert cli.main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert_stamped(report, "vllm-tokenprune", *argv)
    n = count_image_tokens(model, (256, 256))
    assert [(c["concurrency"], c["images"]) for c in report["cells"]] == [(2, 1), (2, 2)]
    for cell in report["cells"]:
        assert cell["failed"] == 0 and len(cell["ratios"]) == 2
        # keep 1.0 through the plugin prefills exactly what stock does
        assert cell["prompt_tokens"]["stock"] == cell["prompt_tokens"]["plugin"]
        assert cell["prompt_tokens"]["plugin"][0] > cell["images"] * n
        assert cell["ratio_median_paired"] == pytest.approx(sum(cell["ratios"]) / 2)
        # CPU per request, read from each server's processes: the engine's work shows in it
        assert 0 < cell["stock_cpu_ms_per_request"] and 0 < cell["plugin_cpu_ms_per_request"]
        assert cell["cpu_ratio_median_paired"] == pytest.approx(sum(cell["cpu_ratios"]) / 2)
    assert set(report["translation"]) == {"1", "2"} and all(t["ms"] > 0 for t in report["translation"].values())
    # the per-request breakdown: every stage timed on both processors, the HTTP layer the plugin's alone
    for count, cell in report["breakdown"].items():
        stages = cell["stages_ms"]
        assert set(stages) == {"http", "processor", "encode", "batch"}
        assert all(v["stock"] > 0 and v["plugin"] > 0 for k, v in stages.items() if k != "http")
        assert stages["http"] == {"stock": 0.0, "plugin": report["translation"][count]["ms"]}
        assert cell["extra_ms"] == pytest.approx(sum(v["plugin"] - v["stock"] for v in stages.values()))
    text = (out / "results.md").read_text()
    assert text.startswith("# The plugin at keep 1.0 against stock vLLM") and "extra per request" in text
    assert (out / "against_stock.png").stat().st_size > 10_000


def test_workload_compares_budgets_on_an_eval_files_images(served, tmp_path):
    """`bench --workload`: every request answered under each budget, image tokens as the
    server counted them (N at keep 1.0, K at 0.25), and its three files written."""
    model, server = served
    assert cli.main(["make-eval-set", "--variant", "textured", "--n", "6", "--out", str(tmp_path / "set")]) == 0
    out = tmp_path / "workload"
    argv = ["bench", "--model", str(model), "--url", server.root, "--out", str(out),
            "--workload", str(tmp_path / "set" / "items.jsonl"), "--workload-ratios", "1.0,0.25",
            "--workload-requests", "4", "--workload-rounds", "2", "--workload-concurrency", "2",
            "--output-tokens", "2", "--allow-dirty"]
    assert cli.main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert_stamped(report, "vllm-tokenprune", *argv)
    n = count_image_tokens(model, (SIZE, SIZE))
    cells = {c["budget"]: c for c in report["cells"]}
    assert cells["1.0"]["mean_image_tokens"] == n and cells["0.25"]["mean_image_tokens"] == keep_count(n, 0.25)
    assert all(c["requests"] == 8 and c["failed"] == 0 and c["median_ttft_ms"] > 0 for c in cells.values())
    assert (out / "workload.png").stat().st_size > 10_000 and "| 0.25 |" in (out / "results.md").read_text()


def test_before_after_pairs_rounds_of_two_servers_and_checks_out_clean_commits(served, tmp_path):
    """benchmarks/before_after.py against one real server under two names: every round pairs
    both, the latencies of one-token requests are their TTFT, the report renders; and a
    commit is served from a clean worktree of it."""
    import subprocess

    import benchmark_script

    bench = benchmark_script.load("before_after")
    _, server = served
    result = bench.measure({"a": server.root, "b": server.root}, "tiny", keep=0.25, concurrency=2, rounds=2,
                           per_slot=2, size=SIZE, seed=0)
    assert [len(result["runs"][name]) for name in "ab"] == [2, 2] and len(result["per_round"]) == 2
    for s in result["summary"].values():
        assert s["completed"] == 8 and s["failed"] == 0 and 0 < s["ttft_ms_p50"] <= s["ttft_ms_p90"]
        assert len(s["prompt_tokens"]) == 1  # every request the same prompt, pruned alike
    assert result["requests_per_s_ratio_paired"] > 0 and result["ttft_p50_ratio_paired"] > 0
    report = {"model": "tiny", "keep": 0.25, "concurrency": 2, "rounds": 2, "image_size": SIZE, "cpus": 2,
              "command": "python benchmarks/before_after.py", **result}
    assert bench.markdown(report).startswith("# tiny at keep 0.25, 2 clients: a against b")
    bench.plot(report, tmp_path / "before_after.png")
    assert (tmp_path / "before_after.png").stat().st_size > 10_000

    commit, tree = bench.checkout("HEAD", tmp_path / "trees")
    try:
        assert (tree / "vllm_tokenprune" / "__init__.py").is_file()
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
        assert head.stdout.strip() == commit
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=bench.ROOT, check=True)
