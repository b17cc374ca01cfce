"""tools/provenance.stamp, the one record of where a result comes from: the commit (clean, or
-dirty only with an explicit --allow-dirty, which it records), and the command as run; and
every command that writes results takes --allow-dirty and stamps them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from vllm_tokenprune.tools import provenance

ROOT = Path(__file__).resolve().parents[1]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_source_commit_is_dirty_only_for_changes_to_tracked_files(tmp_path):
    assert provenance.source_commit(tmp_path) is None  # not a checkout
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("a\n")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    head = git(tmp_path, "rev-parse", "--short", "HEAD")
    assert provenance.source_commit(tmp_path) == head
    (tmp_path / "new.txt").write_text("untracked\n")
    assert provenance.source_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("changed\n")
    assert provenance.source_commit(tmp_path) == head + "-dirty"


def test_a_dirty_checkout_is_refused_without_allow_dirty_and_recorded_with_it(monkeypatch):
    monkeypatch.setattr(provenance, "source_commit", lambda: "abc1234-dirty")
    with pytest.raises(SystemExit, match="--allow-dirty") as refused:
        provenance.stamp("vllm-tokenprune", ["eval", "--data", "x.jsonl"], allow_dirty=False)
    assert "abc1234-dirty" in str(refused.value) and "uncommitted changes" in str(refused.value)
    assert provenance.stamp("vllm-tokenprune", ["eval", "--data", "a b.jsonl"], allow_dirty=True) == {
        "commit": "abc1234-dirty", "command": "vllm-tokenprune eval --data 'a b.jsonl'", "allow_dirty": True}


def test_a_clean_checkout_records_no_allow_dirty_even_when_given(monkeypatch):
    monkeypatch.setattr(provenance, "source_commit", lambda: "abc1234")
    for allow in (False, True):
        assert provenance.stamp("python -m vllm_tokenprune.tools.costs", ["--out", "c.json"], allow) == {
            "commit": "abc1234", "command": "python -m vllm_tokenprune.tools.costs --out c.json"}


def test_a_script_is_recorded_by_its_path_in_the_checkout_and_must_be_of_the_packages_checkout(tmp_path):
    record = provenance.stamp(ROOT / "benchmarks" / "auto_margin.py", ["--out", "x"], allow_dirty=True)
    if record["commit"] is None:
        pytest.skip("not run from a git checkout")
    assert record["command"] == "python benchmarks/auto_margin.py --out x"
    elsewhere = tmp_path / "benchmarks" / "auto_margin.py"
    elsewhere.parent.mkdir()
    elsewhere.write_text("")
    with pytest.raises(SystemExit, match="PYTHONPATH"):
        provenance.stamp(elsewhere, [], allow_dirty=True)


def test_every_command_that_writes_results_takes_allow_dirty_and_stamps_them():
    """A script of benchmarks/ or a tool with an --out for its results parses --allow-dirty and
    calls stamp; and no file records a commit or command line of its own making."""
    writers = [p for p in [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "vllm_tokenprune" / "tools").glob("*.py")]
               if '"--out"' in p.read_text()]
    assert {p.name for p in writers} >= {"bench.py", "eval.py", "costs.py", "auto_margin.py", "keep_coverage.py",
                                        "before_after.py", "budget_cost.py", "train_memory.py"}
    for path in writers:
        text = path.read_text()
        assert "add_allow_dirty(parser)" in text and re.search(r"\bstamp\(", text), path.name
    for path in [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "vllm_tokenprune").rglob("*.py")]:
        if path.name != "provenance.py":
            assert "source_commit" not in path.read_text() and "sys.argv[2:]" not in path.read_text(), path


def test_reports_name_the_checkpoint_not_its_folder(tmp_path):
    from vllm_tokenprune.tools.serve import default_model

    assert provenance.checkpoint_name(str(default_model()[0])) == "vllm-tokenprune demo"
    assert provenance.checkpoint_name("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"  # a hub id
    (tmp_path / "llava-7b-tuned" / "model").mkdir(parents=True)
    assert provenance.checkpoint_name(str(tmp_path / "llava-7b-tuned" / "model")) == "llava-7b-tuned/model"
    assert provenance.checkpoint_name(str(tmp_path / "llava-7b-tuned")) == "llava-7b-tuned"
