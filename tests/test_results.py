"""The committed results: every results file under benchmarks/results records the commit and
the command that produced it (tools/provenance.stamp), and the README's figures are the ones
benchmarks/readme_figures.py renders from those files now."""

from __future__ import annotations

import json
from pathlib import Path

import benchmark_script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Results recorded from a checkout with uncommitted changes before stamp refused one, so
# without allow_dirty. Each awaits a rerun from a commit; none is cheap to rerun offline:
LEGACY_DIRTY = {
    # server evaluations and offline coverage of demo models of earlier recipes that are not
    # kept (`train-demo --out DIR` at those commits, 30-50 min each, then the run)
    "quality-clutter/results.json",
    "quality-selector-all-variants/results.json",
    "quality-query/results.json",
    "quality-attention-selector/results.json",
    "quality-auto/tolerance-0.06/results.json",
    "coverage/results.json",
    "coverage-selector-all-variants/results.json",
    "coverage-query/results.json",
    "coverage-attention-selector/results.json",
}


def results_files() -> dict[str, dict]:
    return {str(p.relative_to(RESULTS)): json.loads(p.read_text()) for p in sorted(RESULTS.rglob("*.json"))}


def test_every_results_file_records_its_commit_and_command():
    files = results_files()
    assert len(files) > 10
    for name, report in files.items():
        assert isinstance(report.get("commit"), str) and report["commit"], f"{name}: no commit"
        assert isinstance(report.get("command"), str) and report["command"], f"{name}: no command"
        if report["commit"].endswith("-dirty"):
            assert report.get("allow_dirty") is True or name in LEGACY_DIRTY, (
                f"{name}: commit {report['commit']} without allow_dirty (rerun it from a commit)")
        else:
            assert "allow_dirty" not in report, name


def test_the_legacy_list_holds_only_results_still_awaiting_a_rerun():
    files = results_files()
    for name in LEGACY_DIRTY:
        assert name in files, f"{name} is gone: drop it from LEGACY_DIRTY"
        assert files[name]["commit"].endswith("-dirty") and "allow_dirty" not in files[name], (
            f"{name} was rerun: drop it from LEGACY_DIRTY")


def test_the_readme_figures_are_the_results_files_figures():
    figures = benchmark_script.load("readme_figures")
    readme = (ROOT / "README.md").read_text()
    assert readme.count(figures.BEGIN) == 1 and readme.count(figures.END) == 1
    assert figures.current(readme) == figures.render(), (
        "README.md's figures block is not what the results files say: run python benchmarks/readme_figures.py")
