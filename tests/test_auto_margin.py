"""benchmarks/auto_margin.py on a few scenes: every row covers the same scenes, K follows the
rows' definitions, and it writes its three files."""

from __future__ import annotations

import json

import benchmark_script
from stamps import assert_stamped


def test_rows_and_files(tmp_path):
    module = benchmark_script.load("auto_margin")
    out = tmp_path / "out"
    argv = ["--n", "4", "--train-n", "4", "--margins", "0", "--extras", "0,4", "--threads", "1",
            "--out", str(out), "--allow-dirty"]
    assert module.main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert_stamped(report, "python", "benchmarks/auto_margin.py", *argv)
    rows = {r["row"]: r for r in report["rows"]}
    assert [r["row"] for r in report["rows"]][:5] == [f"keep {r}" for r in module.RATIOS]
    assert rows["keep 1.0"]["image_tokens"]["all sets"] == 144 and rows["keep 0.05"]["image_tokens"]["plain"] == 7
    exact = rows["count x 1 + 4 (exact)"]["image_tokens"]
    assert exact["textured"] == rows["count x 1 + 0 (exact)"]["image_tokens"]["textured"] + 4
    assert all(0 <= v <= 100 for r in report["rows"] for v in r["accuracy"].values())
    assert any(name.startswith("shipped predictor (margin 0.2") for name in rows)
    assert -1 <= report["count_vs_content"]["correlation"] <= 1
    assert "| keep 1.0 |" in (out / "results.md").read_text()
    assert (out / "auto-margin.png").stat().st_size > 10_000
