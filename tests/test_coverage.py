"""benchmarks/keep_coverage.py on a few scenes: every method's keep shares are fractions, the
budget splits into content, texture and background, and the counts follow K."""

from __future__ import annotations

import benchmark_script
import pytest

from vllm_tokenprune.testbed.demo_model import DEMO_DIR


@pytest.fixture(scope="module")
def coverage():
    return benchmark_script.load("keep_coverage")


def test_shares_are_fractions_and_the_budget_adds_up(coverage, tmp_path):
    report = coverage.measure(DEMO_DIR / "model", DEMO_DIR / "selector.safetensors", "clutter", 3)
    assert set(report) == set(coverage.METHODS)  # the demo's selector has a question-reading section
    for by_ratio in report.values():
        assert set(by_ratio) == {str(r) for r in coverage.RATIOS}
        for cell in by_ratio.values():
            assert all(0 <= v <= 1 for v in cell["needed"].values())
            assert sum(cell["budget"].values()) == pytest.approx(1, abs=1e-3)
    # fewer tokens never keep more of what a question needs, for a deterministic method
    learned = report["learned"]
    assert learned["0.05"]["needed"]["count"] <= learned["0.25"]["needed"]["count"]
    full = {"variant": "clutter", "n": 3, "commit": "x", "command": "c", "methods": report}
    assert "| learned | 0.25 |" in coverage.markdown(full)
    coverage.plot(full, tmp_path / "coverage.png")
    assert (tmp_path / "coverage.png").stat().st_size > 10_000
