"""benchmarks/gpu_train_check.py, the GPU check of training at real shapes, runs with tiny
shapes on CPU and imports no vLLM (a bare GPU machine has none)."""

from __future__ import annotations

import json

from stamps import assert_stamped

from scripts import run_without_vllm


def test_gpu_train_check_runs_small_on_cpu_without_vllm(tmp_path):
    argv = ["--small", "--device", "cpu", "--out", str(tmp_path), "--allow-dirty"]
    result = run_without_vllm("gpu_train_check.py", argv)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert_stamped(report, "python", "benchmarks/gpu_train_check.py", *argv)
    assert list(report["towers"]) == ["clip-l-336", "siglip-so400m-384", "qwen2.5-vl-7b"]
    clip = report["towers"]["clip-l-336"]
    # 4 x 4 patches (CLIP's CLS token dropped, as LLaVA does); Qwen merges them 2 x 2
    assert (clip["tokens"], clip["feature_dim"], clip["tower_dtype"]) == (16, 32, "float32")
    assert report["towers"]["qwen2.5-vl-7b"]["tokens"] == 4
    for r in report["towers"].values():
        assert r["train_step_s"] > 0 and r["extract_images_per_s"] > 0
        e = r["estimate"]
        assert (e["train_images"], e["heldout_images"], e["steps"]) == (9000, 1000, 6750)  # 3 epochs, batch 4
        assert e["total_s"] == e["extract_s"] + e["train_s"] + e["eval_s"]
    assert "| clip-l-336 | 16 x 32 |" in result.stdout
