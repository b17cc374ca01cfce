"""benchmarks/gpu_serving_check.py, the GPU check of serving's selection at real shapes, runs
with tiny shapes on CPU and imports no vLLM (a bare GPU machine has none)."""

from __future__ import annotations

import json

from stamps import assert_stamped

from scripts import run_without_vllm
from vllm_tokenprune.selection.methods import IMAGE_METHOD_NAMES


def test_gpu_serving_check_runs_small_on_cpu_without_vllm(tmp_path):
    argv = ["--small", "--device", "cpu", "--rounds", "2", "--out", str(tmp_path), "--allow-dirty"]
    result = run_without_vllm("gpu_serving_check.py", argv)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert_stamped(report, "python", "benchmarks/gpu_serving_check.py", *argv)
    assert report["small"] and report["ratio"] == 0.25
    for rows in report["selection"].values():
        assert list(rows) == list(IMAGE_METHOD_NAMES)
        assert all(row["seconds"] > 0 and row["syncs"] == "not checked (cpu)" for row in rows.values())
    assert all(0 <= share <= 1 for share in report["bf16_agreement"].values())
    chunk, unchunked = report["tower"]["chunk"], report["tower"]["unchunked at keep 0.25"]
    assert unchunked["images"] == 4 * chunk["images"]
    assert "| clip-l-336 x 64 | mmtok |" in (tmp_path / "results.md").read_text()
