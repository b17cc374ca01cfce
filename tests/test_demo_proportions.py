"""benchmarks/demo_proportions.py in one round: every selector against every language model,
the modelled TTFT built from the parts it timed, and its three files."""

from __future__ import annotations

import json

import benchmark_script
from stamps import assert_stamped


def test_every_pair_is_modelled_from_its_parts(tmp_path):
    module = benchmark_script.load("demo_proportions")
    out = tmp_path / "out"
    argv = ["--rounds", "1", "--out", str(out), "--allow-dirty"]
    assert module.main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert_stamped(report, "python", "benchmarks/demo_proportions.py", *argv)
    assert report["image_tokens"] == 144 and report["prompt_tokens"]["1.0"] == 155
    assert len(report["models"]) == len(module.SELECTORS) * len(module.LANGUAGE_MODELS)
    s = report["seconds"]
    for row in report["models"]:
        lm, sel = row["language_model"], row["selector"]
        assert row["ttft_s"]["1.0"] == s["tower"] + s[f"{lm} @1.0"]  # keep 1.0 runs no selector
        assert row["ttft_s"]["0.25"] == s["tower"] + s[sel] + s[f"{lm} @0.25"]
        times = [row["ttft_s"][str(r)] for r in module.RATIOS]
        assert row["falls"] == all(a > b for a, b in zip(times, times[1:]))
    assert report["parameters"]["selector 128x3"] > report["parameters"]["selector 16x1"]
    assert "| lm 128x2x256 | selector 128x3 |" in (out / "results.md").read_text()
    assert (out / "proportions.png").stat().st_size > 10_000
