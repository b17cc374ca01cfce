"""The budget predictor behind keep ratio auto: its input, its checkpoint section, and its
training on a tiny model (tests/test_auto_server.py serves it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from density import density_image
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_tokenprune.selection.budget import (
    CELLS,
    FEATURES,
    SECTION_VERSION,
    THUMBNAIL,
    BudgetConfig,
    BudgetPredictor,
    cell_features,
    load_budget_predictor,
    reduced,
    section,
    thumbnail,
)
from vllm_tokenprune.selection.selector import (
    ATTENTION_SECTION,
    SelectorCheckpointError,
    load_selector,
    read_checkpoint,
)
from vllm_tokenprune.training.budget import RATIOS, above_even_share, share_targets, tolerance_targets
from vllm_tokenprune.training.reconstruction import write_checkpoint


@pytest.mark.parametrize("size", [(1, 1), (336, 336), (3000, 40), (40, 3000)])
def test_thumbnail_is_one_size_and_deterministic(size):
    image = density_image(*size, density=0.5, seed=1)
    a, b = thumbnail(image), thumbnail(image.copy())
    assert a.shape == (THUMBNAIL, THUMBNAIL, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.array_equal(thumbnail(np.asarray(image)), a)  # vLLM may hold images as arrays
    assert np.array_equal(thumbnail(image.convert("RGBA")), a)  # any mode is read as RGB


def _area_means(image: np.ndarray, side: int) -> np.ndarray:
    """Each output pixel the mean of the input area it covers, rounded half up: exact
    integers, written plainly (weights of each input row and column, in units of 1 / side)."""
    def weights(length):
        return np.array([[max(0, min((o + 1) * length, (i + 1) * side) - max(o * length, i * side))
                          for i in range(length)] for o in range(side)], np.int64)

    height, width = image.shape[:2]
    total = np.einsum("oh,hwc,xw->oxc", weights(height), image.astype(np.int64), weights(width))
    return (2 * total + height * width) // (2 * height * width)


@pytest.mark.parametrize("shape", [(64, 64), (68, 68), (127, 65), (84, 100), (1, 1), (30, 50)])
def test_area_resample_is_the_exact_area_mean(shape):
    from vllm_tokenprune.selection.budget_kernel import area_resample

    rng = np.random.default_rng(sum(shape))
    for image in (rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
                  (rng.integers(0, 2, (*shape, 3)) * 255).astype(np.uint8)):  # means on rounding edges
        assert np.array_equal(area_resample(image, THUMBNAIL), _area_means(image, THUMBNAIL))


def test_the_thumbnail_is_the_box_reduction_then_the_area_mean():
    image = density_image(336, 200, density=0.5, seed=4)  # reduced by 5 x 3 to 68 x 67
    box = np.asarray(image.reduce((5, 3)))
    assert box.shape == (67, 68, 3)
    assert np.array_equal(thumbnail(image), _area_means(box, THUMBNAIL))


def test_cell_features_describe_each_cell():
    flat = np.full((1, THUMBNAIL, THUMBNAIL, 3), 128, np.uint8)
    striped = flat.copy()
    striped[0, :8, :8:2] = 255  # vertical stripes in the first cell only
    a, b = cell_features(flat)[0], cell_features(striped)[0]
    assert a.shape == (CELLS * CELLS, FEATURES)
    assert not a.any()  # a flat image: nothing stands out, no spread, no change between pixels (exactly)
    assert (b[0, :9] > 0.05).all() and (b[0, 9:] < 0.05).all()  # contrast, spread, change across; little down
    assert np.array_equal(b[1:, 3:], a[1:, 3:]) and (b[1:, :3] < 0.01).all()  # the other cells barely see it
    assert np.allclose(cell_features(np.zeros_like(flat)), 0)  # any flat colour is alike


def test_cell_features_are_the_statistics_they_name():
    thumbnails = np.random.default_rng(5).integers(0, 256, (2, THUMBNAIL, THUMBNAIL, 3), dtype=np.uint8)
    x = thumbnails.astype(np.float64) / 255
    step = THUMBNAIL // CELLS

    def per_cell(values):  # (B, S, S, 3) -> (B, cells, 3), row-major cells
        return values.reshape(2, CELLS, step, CELLS, step, 3).mean(axis=(2, 4)).reshape(2, CELLS * CELLS, 3)

    mean = per_cell(x)
    expected = np.concatenate([
        np.abs(mean - mean.mean(axis=1, keepdims=True)),
        np.sqrt(per_cell((x - np.repeat(np.repeat(mean.reshape(2, CELLS, CELLS, 3), step, 1), step, 2)) ** 2)),
        per_cell(np.abs(np.diff(x, axis=2, append=x[:, :, -2:-1]))),  # the last column: its neighbour before
        per_cell(np.abs(np.diff(x, axis=1, append=x[:, -2:-1]))),
    ], axis=2)
    assert np.allclose(cell_features(thumbnails), expected, atol=1e-6)
    assert np.array_equal(cell_features(thumbnails[:, :, ::-1]), cell_features(thumbnails[:, :, ::-1].copy()))


def test_serving_forward_equals_training_forward():
    torch.manual_seed(0)
    predictor = BudgetPredictor(BudgetConfig(log_tokens=[4.0, 6.0]))
    predictor.feature_mean.uniform_(0, 0.5)
    predictor.feature_std.uniform_(0.1, 1)
    predictor.feature_low[:3], predictor.feature_high[3:6] = 0.3, 0.05  # clipping a blank and a dense image
    images = [density_image(w, h, d, seed=3) for (w, h), d in zip([(96, 64), (336, 336), (1000, 90)], (0.0, 0.4, 1.0))]
    counts = [20, 100, 10**6]
    with torch.no_grad():
        logits = predictor(torch.from_numpy(cell_features(np.stack([thumbnail(i) for i in images]))), counts)
    assert predictor.fractions(images, counts) == pytest.approx(torch.sigmoid(logits).tolist(), abs=1e-5)

    from vllm_tokenprune.selection.budget_kernel import fraction
    with pytest.raises(ValueError, match="layout"):  # a slip between the two layouts is loud
        fraction(reduced(images[0]), THUMBNAIL, 0.0, CELLS, 32, predictor._kernel_params()[:-1], 1e-4)


def test_the_predictor_is_a_section_of_the_selector_checkpoint(random_selector, tmp_path):
    old = random_selector("llava")
    assert load_budget_predictor(old) is None  # checkpoints from before it load as they were

    torch.manual_seed(0)
    predictor = BudgetPredictor(BudgetConfig(log_tokens=[4.0, 6.0])).eval()
    header, tensors = section(predictor, {"target": {"kind": "test"}})
    with safe_open(str(old), "pt") as f:
        meta, old_tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    path = tmp_path / "with_budget.safetensors"
    save_file({**old_tensors, **tensors}, str(path), metadata={**meta, "budget_predictor": json.dumps(header)})

    loaded, loaded_header = load_budget_predictor(path)
    assert loaded_header["target"] == {"kind": "test"} and loaded_header["format_version"] == SECTION_VERSION
    images = [density_image(64, 48, d, seed=2) for d in (0.0, 1.0)]
    assert loaded.fractions(images, [20, 300]) == predictor.fractions(images, [20, 300])
    assert all(0.0 < f <= 1.0 for f in loaded.fractions(images, [1, 10**6]))  # N out of range is clamped
    load_selector(path)  # the selector still loads beside it

    for bad in ({**header, "format_version": 2}, {**header, "config": {"channels": "x"}}, 3):
        save_file({**old_tensors, **tensors}, str(path), metadata={**meta, "budget_predictor": json.dumps(bad)})
        with pytest.raises(SelectorCheckpointError, match="budget predictor") as err:
            load_budget_predictor(path)
        # A section of another format says how to mend it; a damaged one of this format is reported as damaged.
        assert ("--budget-only" in str(err.value)) == (bad != {**header, "config": {"channels": "x"}})


def test_the_target_is_the_smallest_fraction_within_the_tolerance():
    ratios = torch.tensor(RATIOS)
    errors = torch.stack([1 - ratios, (1 - ratios) * 0.1, torch.where(ratios < 0.9, 1.0, 0.0)])
    targets = tolerance_targets(errors, 0.5).tolist()
    assert targets[0] == pytest.approx(0.5)  # error 1 - r meets 0.5 at r = 0.5
    assert targets[1] == pytest.approx(RATIOS[0])  # within tolerance from the start
    assert targets[2] == pytest.approx(0.875)  # between 0.85 (1.0) and 0.9 (0.0), interpolated


def test_the_attention_target_counts_the_tokens_rated_above_an_even_share():
    scores = torch.tensor([[5.0, 5.0, 0.0, 0.0, 0.0, 0.0],  # two tokens stand out
                           [1.0, 1.0, 1.0, 1.0, 0.0, 0.0],  # four tokens of four: none above an even share
                           [3.0, 0.0, 0.0, 9.0, 9.0, 9.0]])  # one of three; the rest is padding
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 3 + [True] * 3])
    assert above_even_share(scores, padding).tolist() == [2, 0, 1]
    assert above_even_share(scores + 100, padding).tolist() == [2, 0, 1]  # the level is free
    counts, lengths = torch.tensor([2, 0, 100]), torch.tensor([100, 100, 144])
    assert share_targets(counts, lengths, margin=0.5, extra=4).tolist() == pytest.approx([0.07, 0.04, 1.0])


def test_train_fits_a_predictor_that_gives_dense_images_more_tokens(budget_selector, tiny_checkpoint):
    from transformers import AutoConfig

    from vllm_tokenprune.selection.selector import check_compatible

    path = budget_selector("llava")
    _, meta = load_selector(path)
    check_compatible(meta, AutoConfig.from_pretrained(tiny_checkpoint("llava")))
    predictor, header = load_budget_predictor(path)
    report = header["eval"]
    print(json.dumps(report, indent=1))
    assert header["target"]["kind"] == "reconstruction tolerance" and report["images"] == "held-out"
    assert report["correlation"] > 0.8 and report["mean_abs_error"] < 0.1
    # At the same mean fraction, adaptive K rebuilds the held-out images better than one ratio.
    assert report["error_at_predicted"] < report["error_at_mean_fraction"]
    blank, sparse, dense = (density_image(168, 168, d, seed=7) for d in (0.0, 0.3, 1.0))
    fractions = predictor.fractions([blank, sparse, dense], [144] * 3)
    assert fractions[0] < fractions[1] < fractions[2]
    assert fractions[2] > 2 * fractions[0]


def test_budget_only_refits_the_predictor_and_keeps_the_selector(budget_selector, tiny_checkpoint, tmp_path,
                                                                 capsys):
    from vllm_tokenprune.cli import main

    path = budget_selector("llava")
    out = tmp_path / "refit.safetensors"
    out.write_bytes(path.read_bytes())
    images, cache = path.parent / "images", path.parent / "cache"
    args = ["train", "--model", str(tiny_checkpoint("llava")), "--images", str(images), "--out", str(out),
            "--budget-only", "--budget-tolerance", "0.05", "--budget-steps", "100", "--budget-images", "40",
            "--threads", "1",
            "--cache-dir", str(cache), "--no-progress"]
    assert main(args) == 0
    before, after = (safe_open(str(p), "pt") for p in (path, out))
    assert {k for k in after.keys() if not k.startswith("budget.")} == {k for k in before.keys()
                                                                        if not k.startswith("budget.")}
    for name in (k for k in before.keys() if not k.startswith("budget.")):
        assert torch.equal(before.get_tensor(name), after.get_tensor(name)), name
    (_, old), (_, new) = load_budget_predictor(path), load_budget_predictor(out)
    assert new["target"]["tolerance"] == 0.05 != old["target"]["tolerance"]
    # fitted on a sample of 40 of the 77 training images, the first fit on all of them
    assert (new["target"]["train_images"], old["target"]["train_images"]) == (40, 77)
    # A lower tolerance asks for more tokens per image.
    assert new["eval"]["target_fraction"]["mean"] > old["eval"]["target_fraction"]["mean"]

    args[args.index("--model") + 1] = str(tiny_checkpoint("qwen2.5-vl"))  # another tower: refused
    assert main(args) == 2 and "does not fit" in capsys.readouterr().err
    # A selector fitted to the attention has another target: `train-query --budget-only` refits it.
    tensors, meta = read_checkpoint(out, "cpu")
    write_checkpoint(out, tensors, {**meta, ATTENTION_SECTION: {}})
    args[args.index("--model") + 1] = str(tiny_checkpoint("llava"))
    assert main(args) == 2 and "train-query" in capsys.readouterr().err
