"""Qwen's dynamic resolution in training: every image at its own size, as served, on the tiny
Qwen2.5-VL. Features of several token counts are extracted, stored, streamed, trained on and
evaluated with padding masks; a selector trained at some sizes scores another."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from folders import SIZES, folder_of_sizes

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection import methods
from vllm_tokenprune.selection.methods.topk import topk_sorted
from vllm_tokenprune.selection.selector import SelectorMismatchError, check_compatible, load_selector
from vllm_tokenprune.testbed.synthetic import make_shapes_image
from vllm_tokenprune.training.evaluation import evaluate
from vllm_tokenprune.training.features import FeatureSettingsError, extract_features
from vllm_tokenprune.training.ragged import RaggedFeatures
from vllm_tokenprune.training.reconstruction import ReconstructorConfig, TokenReconstructor
from vllm_tokenprune.training.store import feature_store
from vllm_tokenprune.training.stream import InMemoryFeatures


@pytest.fixture(scope="module")
def tiny_qwen(tiny_checkpoint):
    return tiny_checkpoint("qwen2.5-vl")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_features_follow_the_image_processor_and_the_servers_overrides(tiny_checkpoint, tiny_qwen, tmp_path):
    from transformers import AutoImageProcessor

    images = [make_shapes_image(np.random.default_rng(i), size) for i, size in enumerate(SIZES)]
    lengths = {}
    settings = {"default": {}, "max": {"max_pixels": 48 * 56 * 4}, "min": {"min_pixels": 300 * 300}}
    for name, overrides in settings.items():
        features, info = extract_features(tiny_qwen, images, progress=False, processor_kwargs=overrides)
        processor = AutoImageProcessor.from_pretrained(tiny_qwen, **overrides)
        grid_thw = processor(images=images, return_tensors="pt")["image_grid_thw"]
        assert features.grids.tolist() == (grid_thw[:, 1:] // 2).tolist()
        assert len(set(map(tuple, features.grids.tolist()))) == 3  # each image keeps its aspect
        assert info["image_pixels"] == {"min_pixels": processor.size["shortest_edge"],
                                        "max_pixels": processor.size["longest_edge"]}
        assert info["num_tokens"] == [int(features.lengths.min()), int(features.lengths.max())]
        lengths[name] = features.lengths
    assert lengths["default"].tolist() == [50, 36, 16]
    assert torch.all(lengths["max"] < lengths["default"]) and torch.all(lengths["min"] > lengths["default"])
    assert info["image_pixels"]["min_pixels"] == 300 * 300

    paths = folder_of_sizes(tmp_path / "imgs", 3)
    stores = {feature_store(tiny_qwen, paths, cache_dir=tmp_path / "cache", progress=False,
                            processor_kwargs=kw)[0].root for kw in ({}, {"max_pixels": 48 * 56 * 4})}
    assert len(stores) == 2  # other server settings, other features
    with pytest.raises(FeatureSettingsError, match="Qwen"):
        extract_features(tiny_checkpoint("llava"), images, progress=False, processor_kwargs={"max_pixels": 10**5})
    with pytest.raises(FeatureSettingsError, match="size"):
        extract_features(tiny_qwen, images, progress=False, processor_kwargs={"size": {}})


def test_evaluation_keeps_k_of_each_image_and_equals_each_image_alone():
    """Evaluated in one padded chunk or image by image (no padding), the same errors; K is
    keep_count(N_i, ratio) of every image."""
    from vllm_tokenprune.selection.selector import SelectorConfig, TokenSelector

    torch.manual_seed(0)
    grids = torch.tensor([[3, 4], [2, 2], [5, 7], [1, 9]])
    images = RaggedFeatures(torch.randn(int(grids.prod(dim=1).sum()), 16), grids)
    selector = TokenSelector(SelectorConfig(16)).eval()
    reconstructor = TokenReconstructor(ReconstructorConfig(16)).eval()
    together = evaluate(selector, reconstructor, InMemoryFeatures(images), chunk=64)
    alone = evaluate(selector, reconstructor, InMemoryFeatures(images), chunk=1)
    for ratio, result in together.items():
        assert result == pytest.approx(alone[ratio], rel=1e-5)
        assert result["k"] == pytest.approx(np.mean([keep_count(n, float(ratio)) for n in [12, 4, 35, 9]]))


def test_a_selector_trained_at_two_sizes_scores_a_third(tiny_checkpoint, tiny_qwen, tmp_path, one_thread):
    """Trained with `train` on landscape and portrait images, the loaded checkpoint fits the
    model and, as the serving hook calls it, keeps K of a square image of a token count it
    never saw (at the checkpoint's default pixel range). It still refuses another family and
    another size."""
    from transformers import AutoConfig

    from vllm_tokenprune.cli import main

    folder_of_sizes(tmp_path / "imgs", 8, sizes=SIZES[:2])
    out = tmp_path / "selector.safetensors"
    assert main(["train", "--model", str(tiny_qwen), "--images", str(tmp_path / "imgs"), "--out", str(out),
                 "--steps", "4", "--batch-size", "4", "--eval-every", "0", "--width", "32", "--recon-width", "32",
                 "--holdout", "0.25", "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress",
                 "--max-pixels", str(100 * 28 * 28)]) == 0  # as a server at up to 100 tokens an image

    selector, meta = load_selector(out)
    check_compatible(meta, AutoConfig.from_pretrained(tiny_qwen))
    low, high = meta["num_tokens"]
    assert (low, high) == (36, 50) and meta["image_pixels"] == {"min_pixels": 3136, "max_pixels": 100 * 28 * 28}

    third, _ = extract_features(tiny_qwen, [make_shapes_image(np.random.default_rng(7), (300, 300))], progress=False)
    features, grid = third[0], tuple(third.grids[0].tolist())
    assert len(features) > high  # a token count training never saw
    with torch.inference_mode():
        scores = selector.scores(features)
        rows = methods.select("learned", methods.Tokens(features, (grid,), seed=0, selector=selector),
                              keep_count(len(features), 0.25))
    assert torch.equal(rows.index, topk_sorted(scores, keep_count(len(features), 0.25)))
    assert torch.isfinite(scores).all() and scores.std() > 0

    wider = AutoConfig.from_pretrained(tiny_qwen)
    wider.vision_config.out_hidden_size *= 2
    for other, differs in ((AutoConfig.from_pretrained(tiny_checkpoint("qwen3-vl")), "model_type"),
                           (wider, "selector input dim")):
        with pytest.raises(SelectorMismatchError, match=differs):
            check_compatible(meta, other)
