"""Qwen's dynamic resolution in training: every image at its own size, as served, on the tiny
Qwen2.5-VL. Features of several token counts are extracted, stored, streamed, trained on and
evaluated with padding masks; a selector trained at some sizes scores another."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_tokenprune.selection import methods
from vllm_tokenprune.selection.methods.topk import topk_sorted
from vllm_tokenprune.selection.selector import (
    SelectorMismatchError,
    check_compatible,
    load_selector,
)
from vllm_tokenprune.serving.policy import keep_count
from vllm_tokenprune.testbed.synthetic import make_shapes_image, write_image_folder
from vllm_tokenprune.training.evaluation import evaluate
from vllm_tokenprune.training.features import FeatureSettingsError, extract_features, load_images
from vllm_tokenprune.training.ragged import RaggedFeatures
from vllm_tokenprune.training.reconstruction import ReconstructorConfig, TokenReconstructor
from vllm_tokenprune.training.store import feature_store
from vllm_tokenprune.training.stream import InMemoryFeatures, batches, mean_std
from vllm_tokenprune.training.train import TrainConfig, train_on_folder, train_selector

SIZES = [(280, 140), (100, 260), (112, 112)]  # (width, height): landscape, portrait, square


@pytest.fixture(scope="module")
def tiny_qwen(tiny_checkpoint):
    return tiny_checkpoint("qwen2.5-vl")


@pytest.fixture(scope="module")
def tiny_llava_path(tiny_checkpoint):
    return tiny_checkpoint("llava")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _folder(root, n_per_size: int, sizes=SIZES):
    """Images of each size in its own subfolder (read in sorted order: size by size)."""
    return [p for i, size in enumerate(sizes)
            for p in write_image_folder(root / f"size{i}", n_per_size, seed=i, size=size)]


def test_features_follow_the_image_processor_and_the_servers_overrides(tiny_qwen, tiny_llava_path, tmp_path):
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

    paths = _folder(tmp_path / "imgs", 1)
    stores = {feature_store(tiny_qwen, paths, cache_dir=tmp_path / "cache", progress=False,
                            processor_kwargs=kw)[0].root for kw in ({}, {"max_pixels": 48 * 56 * 4})}
    assert len(stores) == 2  # other server settings, other features
    with pytest.raises(FeatureSettingsError, match="Qwen"):
        extract_features(tiny_llava_path, images, progress=False, processor_kwargs={"max_pixels": 10**5})
    with pytest.raises(FeatureSettingsError, match="size"):
        extract_features(tiny_qwen, images, progress=False, processor_kwargs={"size": {}})


def test_ragged_store_streams_and_trains_exactly_as_in_memory(tiny_qwen, tmp_path, one_thread):
    """Shards of images of three token counts, all in one shuffle round: the same batches,
    statistics, training and evaluation as the same features in memory."""
    paths = _folder(tmp_path / "imgs", 3)
    store, _ = feature_store(tiny_qwen, paths, cache_dir=tmp_path / "cache", shard_images=4, progress=False)
    features, _ = extract_features(tiny_qwen, load_images(paths), progress=False)
    assert store.shard_sizes == [4, 4, 1] and len(set(features.lengths.tolist())) == 3
    from_store = batches(store, 4, shuffle_shards=3, seed=0)
    in_memory = batches(InMemoryFeatures(features), 4, shuffle_shards=3, seed=0)
    for _ in range(5):  # over two epochs
        a, b = next(from_store), next(in_memory)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.grids, b.grids)
    from_store.close()
    in_memory.close()
    mean, std = mean_std(store)
    torch.testing.assert_close(mean, features.tokens.mean(0))
    torch.testing.assert_close(std, features.tokens.std(0))

    cfg = TrainConfig(steps=4, batch_size=4, eval_every=2, width=32, recon_width=32, shuffle_shards=3)
    held, _ = feature_store(tiny_qwen, paths[::2], cache_dir=tmp_path / "cache", shard_images=2, progress=False)
    runs = [train_selector(train, cfg, eval_features=evals, progress=False, log=print)
            for train, evals in ((store, held), (features, features[::2]))]
    (sel_a, _, report_a), (sel_b, _, report_b) = runs
    for a, b in zip(report_a["history"], report_b["history"], strict=True):
        assert a["loss"] == b["loss"] and a["eval_learned"] == pytest.approx(b["eval_learned"], rel=1e-6)
    for ratio, result in report_a["eval"].items():
        assert result == pytest.approx(report_b["eval"][ratio], rel=1e-6)
    for a, b in zip(sel_a.state_dict().values(), sel_b.state_dict().values()):
        assert torch.equal(a, b)


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
    never saw. It still refuses another family and another size."""
    from transformers import AutoConfig

    _folder(tmp_path / "imgs", 4, sizes=SIZES[:2])
    out = tmp_path / "selector.safetensors"
    cfg = TrainConfig(steps=4, batch_size=4, eval_every=0, width=32, recon_width=32, holdout=0.25,
                      cache_dir=str(tmp_path / "cache"), threads=1)
    assert train_on_folder(str(tiny_qwen), tmp_path / "imgs", out, cfg, progress=False) == 0

    selector, meta = load_selector(out)
    config = AutoConfig.from_pretrained(tiny_qwen)
    check_compatible(meta, config)
    low, high = meta["num_tokens"]
    assert low < high and meta["image_pixels"]["max_pixels"] == 200704

    third, _ = extract_features(tiny_qwen, [make_shapes_image(np.random.default_rng(7), (300, 300))], progress=False)
    features, grid = third[0], tuple(third.grids[0].tolist())
    assert len(features) > high  # a token count training never saw
    with torch.inference_mode():
        scores = selector.scores(features)
        rows = methods.select("learned", methods.Tokens(features, (grid,), seed=0, selector=selector),
                              keep_count(len(features), 0.25))
    assert torch.equal(rows.index, topk_sorted(scores, keep_count(len(features), 0.25)))
    assert torch.isfinite(scores).all() and scores.std() > 0

    with pytest.raises(SelectorMismatchError, match="model_type"):
        check_compatible(meta, AutoConfig.from_pretrained(tiny_checkpoint("qwen3-vl")))
    wider = AutoConfig.from_pretrained(tiny_qwen)
    wider.vision_config.out_hidden_size *= 2
    with pytest.raises(SelectorMismatchError, match="selector input dim"):
        check_compatible(meta, wider)
