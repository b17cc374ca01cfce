"""benchmarks/train_memory.py, the peak-memory benchmark of `train`, at a tiny size: every run
is reported, the warm run really trains from the cold run's store. Its memory target is
checked by the benchmark, not here."""

from __future__ import annotations

import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_memory.py"


def test_train_memory_reports_cold_and_warm_runs_of_every_folder(tiny_checkpoint, tmp_path):
    bench = runpy.run_path(str(SCRIPT))
    args = ("--steps", "2", "--batch-size", "2", "--eval-every", "0", "--shard-images", "2", "--shuffle-shards", "1",
            "--budget-images", "5", "--threads", "1", "--no-progress")
    report = bench["measure"](tiny_checkpoint("llava"), tmp_path, 4, scales=(1, 2), train_args=args)

    assert (report["n"], report["scales"], list(report["runs"])) == (4, [1, 2], ["4", "8"])
    assert report["train_command"].endswith("--cache-dir CACHE " + " ".join(args))
    for images, run in report["runs"].items():
        assert run["images"] == int(images)
        for phase in ("cold", "warm"):
            assert run[phase]["peak_rss_mib"] > 0 and run[phase]["seconds"] > 0
        cold, warm = ((tmp_path / f"train-{images}-{phase}.log").read_text() for phase in ("cold", "warm"))
        assert "extracted" in cold and "from cache" in warm
        # train and held-out stores together hold every image: 12 x 12 tokens of 64 float32 each
        assert run["features"] == {"images": int(images), "tokens": 144 * int(images),
                                   "all_in_memory_mib": round(144 * 64 * 4 * int(images) / 2**20, 1)}
    # 3 and 6 training images, 1 and 2 held out; a window of 3 shards of 2, a sample of 5
    assert [r["held_by_settings"] for r in report["runs"].values()] == [
        {"shuffle_window": 3, "budget_sample": 3, "held_out": 1},
        {"shuffle_window": 6, "budget_sample": 5, "held_out": 2}]
    small, large = report["runs"]["4"], report["runs"]["8"]
    assert report["ratio_to_first"]["4"] == {"cold": 1.0, "warm": 1.0}
    for phase, ratio in report["ratio_to_first"]["8"].items():
        assert ratio == round(large[phase]["peak_rss_mib"] / small[phase]["peak_rss_mib"], 3)

    bench["plot"](report, tmp_path / "memory.png")
    assert (tmp_path / "memory.png").stat().st_size > 0
    lines = bench["table"](report).splitlines()
    assert len(lines) == 4 and lines[-1].startswith("| 8 | 6 / 5 / 2 |")
