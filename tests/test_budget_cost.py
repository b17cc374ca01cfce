"""benchmarks/budget_cost.py's premises: its predictor says the same fraction for every image
(so both arms of a round keep the same K and differ by the predictor's work alone), and the
paired statistics pair each round's two requests."""

from __future__ import annotations

import io

import benchmark_script
import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def bench():
    return benchmark_script.load("budget_cost")


def test_the_fixed_predictor_says_one_fraction_for_every_image(bench):
    rng = np.random.default_rng(0)
    images = [Image.open(io.BytesIO(bench.random_png(size, rng))) for size in ((336, 336), (1024, 768), (50, 900))]
    images.append(Image.new("RGB", (336, 336), "white"))
    fractions = bench.fixed_predictor(0.25).fractions(images, [576, 576, 100, 2000])
    assert fractions == pytest.approx([0.25] * 4, abs=1e-6)


def test_rounds_are_paired(bench):
    stats = bench.paired([10.0, 20.0, 30.0], [11.0, 20.5, 33.0])
    assert stats["fixed_ms"] == 20.0 and stats["auto_ms"] == 20.5 and stats["rounds"] == 3
    assert stats["auto_over_fixed"] == pytest.approx(1.1)  # ratios 1.1, 1.025, 1.1
    assert stats["auto_minus_fixed_ms"] == 1.0  # differences 1.0, 0.5, 3.0
