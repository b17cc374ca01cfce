"""benchmarks/video_vs_evs.py at a small size: our server and stock vLLM with its own EVS
(one server per rate) answer every cell, and at every ratio both prefill the same number of
prompt tokens (N (1 - q) whole here, where vLLM's floor and our rounding agree)."""

from __future__ import annotations

import json

import pytest
from benchmark_script import load

pytestmark = pytest.mark.server


def test_per_request_pruning_and_vllms_evs_keep_the_same_tokens(tiny_checkpoint, tmp_path):
    bench = load("video_vs_evs")
    out = tmp_path / "out"
    assert bench.main(["--model", str(tiny_checkpoint("qwen2.5-vl")), "--ratios", "1.0,0.5",
                       "--concurrency", "1,2", "--requests", "1", "--rounds", "1", "--frames", "8",
                       "--side", "112", "--out", str(out), "--allow-dirty"]) == 0
    report = json.loads((out / "results.json").read_text())
    cells = {(c["keep_ratio"], c["concurrency"]): c for c in report["cells"]}
    assert set(cells) == {(r, c) for r in (1.0, 0.5) for c in (1, 2)}
    full = cells[(1.0, 1)]["stock"]["prompt_tokens"][0]
    for (ratio, _), row in cells.items():
        assert row["ours"]["prompt_tokens"] == row["stock"]["prompt_tokens"], (ratio, row)
        assert row["ours"]["requests"] == row["stock"]["requests"] > 0
        assert row["ttft_ours_over_stock"] > 0 and row["throughput_ours_over_stock"] > 0
    assert cells[(0.5, 1)]["ours"]["prompt_tokens"][0] < full
    assert (out / "video_vs_evs.png").stat().st_size > 0
    assert "vLLM's engine-wide EVS" in (out / "results.md").read_text()
