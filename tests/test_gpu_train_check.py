"""benchmarks/gpu_train_check.py, the GPU check of training at real shapes, runs with tiny
shapes on CPU and imports no vLLM (a bare GPU machine has none)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_train_check.py"


def test_gpu_train_check_runs_small_on_cpu_without_vllm(tmp_path):
    code = (f"import runpy, sys; main = runpy.run_path({str(SCRIPT)!r})['main']; "
            f"code = main(['--small', '--device', 'cpu', '--out', {str(tmp_path)!r}]); "
            "sys.exit(code or 3 * ('vllm' in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=SCRIPT.parents[1])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
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
