"""The selector model, top-K selection, checkpoints and the compatibility check (fast, no checkpoint)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from keep import learned_keep
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection.methods.topk import topk_sorted
from vllm_tokenprune.selection.selector import (
    SelectorCheckpointError,
    SelectorConfig,
    SelectorMismatchError,
    TokenSelector,
    check_compatible,
    load_selector,
    vision_signature,
)
from vllm_tokenprune.training.reconstruction import (
    ReconstructorConfig,
    TokenReconstructor,
    sample_keep_mask,
    save_selector,
    selector_loss,
)


def _llava_config(**overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 168, "patch_size": 14}
    vision.update(overrides.pop("vision", {}))
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    kwargs = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
    kwargs.update(overrides)
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=text, **kwargs)


def _selector(dim=32, seed=0):
    torch.manual_seed(seed)
    return TokenSelector(SelectorConfig(dim))


def _metadata(hf_config):
    return {
        "source_model": "org/tiny-llava",
        "feature_layer": -2,
        "vision_signature": vision_signature(hf_config),
        "training": {"target_keep_ratio": 0.25, "steps": 7, "eval": {"0.25": {"learned": 0.1, "random": 0.8}}},
    }


# ---------------------------------------------------------------------------------------
# Config


def test_config_defaults_are_slim():
    assert SelectorConfig(1024).width == 256
    assert SelectorConfig(1024).num_heads == 4
    assert SelectorConfig(64).width == 64
    assert SelectorConfig(1024).num_layers == 3
    with pytest.raises(ValueError, match="divisible"):
        SelectorConfig(64, width=60, num_heads=8)


# ---------------------------------------------------------------------------------------
# Gumbel keep mask


def test_mask_is_exactly_binary_and_drops_tokens():
    selector = _selector().train()
    mask = sample_keep_mask(selector, torch.randn(4, 100, 32), tau=0.5)
    assert mask.shape == (4, 100)
    assert torch.all((mask == 0) | (mask == 1))
    # A fresh selector's logits are near even: a real two-class sample drops about half
    # (the broken single-logit snippet returns all ones).
    assert 0.2 < mask.mean().item() < 0.8


def test_mask_samples_follow_the_keep_probability():
    selector = _selector().eval()
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        selector.head.bias.copy_(torch.tensor([0.0, 0.0]))
        probs = torch.sigmoid(selector.scores(x))[0]  # P(keep) of a two-class Gumbel-max sample
        freq = sample_keep_mask(selector, x.expand(4000, -1, -1), tau=1.0).mean(0)  # 4000 independent samples
    assert torch.allclose(freq, probs, atol=0.04), (freq, probs)


def test_gradients_reach_every_selector_parameter_through_the_hard_mask():
    selector = _selector().train()
    mask = sample_keep_mask(selector, torch.randn(2, 50, 32), tau=0.5)
    (mask * torch.randn(2, 50)).sum().backward()
    for name, param in selector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_soft_mask_is_a_probability():
    soft = sample_keep_mask(_selector(), torch.randn(2, 30, 32), tau=1.0, hard=False)
    assert torch.all((soft > 0) & (soft < 1))


def test_loss_gradient_favours_keeping_tokens_that_are_hard_to_rebuild():
    # Two tokens dropped, one with a large error: the loss gradient asks to keep that one.
    keep = torch.tensor([[0.0, 0.0, 1.0, 1.0]], requires_grad=True)
    target = torch.zeros(1, 4, 8)
    recon = target.clone()
    recon[0, 0] = 3.0
    loss, parts = selector_loss(recon, target, keep, target_keep=0.25)
    loss.backward()
    assert keep.grad[0, 0] < keep.grad[0, 1]
    assert parts["kept"] == 0.5 and parts["rec"] == pytest.approx(9.0 / 2)


def test_rate_term_stops_at_the_target():
    target = torch.zeros(1, 8, 4)
    below = torch.tensor([[1.0] + [0.0] * 7], requires_grad=True)  # keeps 1/8 < p
    selector_loss(target, target, below, target_keep=0.25)[0].backward()
    assert torch.all(below.grad == 0)  # perfect reconstruction, no rate pressure below p
    above = torch.tensor([[1.0] * 4 + [0.0] * 4], requires_grad=True)  # keeps 1/2 > p
    selector_loss(target, target, above, target_keep=0.25)[0].backward()
    assert torch.all(above.grad > 0)


def test_rate_term_is_per_image():
    # One image keeps too many, one too few: the batch's mean is at p, yet the first image
    # is still pushed to drop (serving keeps K of each image, not K on average).
    target = torch.zeros(2, 8, 4)
    keep = torch.tensor([[1.0] * 4 + [0.0] * 4, [0.0] * 8], requires_grad=True)
    selector_loss(target, target, keep, target_keep=0.25)[0].backward()
    assert torch.all(keep.grad[0] > 0) and torch.all(keep.grad[1] == 0)


# ---------------------------------------------------------------------------------------
# Top-K


RATIOS = [1e-9, 1e-4, 0.001, 0.01, 0.05, 0.1, 0.125, 0.2, 0.25, 1 / 3, 0.35, 0.5, 0.6, 0.75, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("n", [1, 2, 7, 64, 144, 577])
def test_topk_count_order_and_content(n):
    selector = _selector()
    features = torch.randn(n, 32)
    scores = selector.scores(features)
    assert scores.shape == (n,) and scores.dtype == torch.float32
    for ratio in RATIOS:
        idx = learned_keep(selector, features, ratio)
        k = keep_count(n, ratio)
        assert idx.dtype == torch.long and idx.shape == (k,)
        assert torch.all(idx[1:] > idx[:-1]), "strictly increasing"
        dropped = torch.ones(n, dtype=torch.bool)
        dropped[idx] = False
        if dropped.any():
            assert scores[idx].min() >= scores[dropped].max()


def test_topk_batched_matches_single():
    selector = _selector()
    features = torch.randn(3, 50, 32)
    batched = learned_keep(selector, features, 0.3)
    assert batched.shape == (3, keep_count(50, 0.3))
    for b in range(3):
        assert torch.equal(batched[b], learned_keep(selector, features[b], 0.3))


def test_topk_sorted_ties_go_to_the_lower_index():
    assert topk_sorted(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 2).tolist() == [1, 2]
    assert topk_sorted(torch.zeros(10), 4).tolist() == [0, 1, 2, 3]
    big = torch.zeros(20000)
    big[::7] = 1.0  # many ties on both sides of the cut, large enough for other sort paths
    idx = topk_sorted(big, 3000)  # all 2858 ones, then the first 142 zeros
    assert torch.equal(idx, _reference_topk(big, 3000))
    assert torch.equal(topk_sorted(big, 3000), idx)  # deterministic


def _reference_topk(scores, k):
    ranked = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(ranked[:k]))


def test_topk_sorted_batched_and_per_row_k():
    scores = torch.tensor([[0.0, 5.0, 1.0, 5.0], [9.0, 0.0, 0.0, 8.0]])
    assert topk_sorted(scores, 2).tolist() == [[1, 3], [0, 3]]
    assert topk_sorted(scores, torch.tensor(2)).tolist() == [[1, 3], [0, 3]]
    rows = topk_sorted(scores, torch.tensor([1, 3]))
    assert [r.tolist() for r in rows] == [[1], [0, 1, 3]]
    for bad in (0, 5):
        with pytest.raises(ValueError):
            topk_sorted(scores[0], bad)
    with pytest.raises(ValueError):
        topk_sorted(scores, [1])


# ---------------------------------------------------------------------------------------
# Reconstructor


def test_reconstructor_shapes_and_positions():
    torch.manual_seed(0)
    rec = TokenReconstructor(ReconstructorConfig(32)).eval()
    x = torch.randn(2, 12, 32)
    keep = torch.zeros(2, 12)
    out_grid = rec(x, keep, torch.tensor([[3, 4], [3, 4]]))
    out_row = rec(x, keep)
    assert out_grid.shape == out_row.shape == (2, 12, 32)
    # All tokens masked: only the position encoding tells the slots apart.
    assert not torch.allclose(out_grid[0, 0], out_grid[0, 1])
    assert not torch.allclose(out_grid, rec(x, keep, torch.tensor([[4, 3], [4, 3]])))  # the grid matters
    assert rec(torch.randn(1, 30, 32), torch.ones(1, 30)).shape == (1, 30, 32)  # any N
    with pytest.raises(ValueError, match="grid"):
        rec(x, keep, torch.tensor([[5, 5], [3, 4]]))


# ---------------------------------------------------------------------------------------
# Batches of images of several sizes


def _ragged_batch(grids, dim=32, seed=0):
    from vllm_tokenprune.training.ragged import RaggedFeatures

    gen = torch.Generator().manual_seed(seed)
    grids = torch.tensor(grids)
    return RaggedFeatures(torch.randn(int(grids.prod(dim=1).sum()), dim, generator=gen), grids)


def test_padding_changes_no_score_and_no_reconstruction():
    """Padded images score and rebuild as each does alone; padding scores -inf."""
    torch.manual_seed(0)
    selector, rec = _selector().eval(), TokenReconstructor(ReconstructorConfig(32)).eval()
    images = _ragged_batch([[3, 4], [2, 2], [5, 1]])
    batch = images.padded()
    assert batch.x.shape == (3, 12, 32) and batch.padding.sum(dim=1).tolist() == [0, 8, 7]
    keep = (torch.rand(3, 12) > 0.5).float() * (~batch.padding)
    with torch.no_grad():
        scores = selector.scores(batch.x, batch.padding)
        target = selector.normalize(batch.x)
        recon = rec(target, keep, batch.grids, batch.padding)
        for i, (image, n) in enumerate(zip(images, batch.lengths)):
            torch.testing.assert_close(scores[i, :n], selector.scores(image), rtol=1e-5, atol=1e-5)
            alone = rec(selector.normalize(image)[None], keep[i:i + 1, :n], batch.grids[i:i + 1])
            torch.testing.assert_close(recon[i, :n], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.all(scores[batch.padding] == float("-inf"))
    assert torch.equal(topk_sorted(scores, [keep_count(n, 1.0) for n in batch.lengths])[2], torch.arange(5))


def test_masked_loss_is_the_mean_of_each_image_alone():
    torch.manual_seed(0)
    images = _ragged_batch([[3, 4], [2, 2], [5, 1]])
    batch = images.padded()
    recon = torch.randn(batch.x.shape) * (~batch.padding)[..., None]
    keep = (torch.rand(3, 12) > 0.6).float() * (~batch.padding)
    keep[:, 0] = 1.0
    loss, parts = selector_loss(recon, batch.x, keep, target_keep=0.25, padding=batch.padding)
    alone = [selector_loss(recon[i:i + 1, :n], batch.x[i:i + 1, :n], keep[i:i + 1, :n], target_keep=0.25)
             for i, n in enumerate(batch.lengths)]
    assert loss.item() == pytest.approx(sum(a[0].item() for a in alone) / 3, rel=1e-6)
    assert parts["kept"] == pytest.approx(sum(a[1]["kept"] for a in alone) / 3, rel=1e-6)
    # Garbage at the padding changes nothing.
    noisy = recon + 100.0 * batch.padding[..., None]
    assert selector_loss(noisy, batch.x, keep, 0.25, padding=batch.padding)[0].item() == pytest.approx(loss.item())


def test_keep_masks_never_keep_padding():
    selector = _selector().train()
    batch = _ragged_batch([[4, 5], [2, 3]]).padded()
    selector.head.bias.data = torch.tensor([-20.0, 20.0])  # keep everything it can
    mask = sample_keep_mask(selector, batch.x, tau=0.5, padding=batch.padding)
    assert torch.equal(mask, (~batch.padding).float())


# ---------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip(tmp_path):
    selector = _selector()
    selector.set_normalization(torch.randn(32), torch.rand(32) + 0.5)
    rec = TokenReconstructor(ReconstructorConfig(32))
    hf_config = _llava_config()
    path = tmp_path / "sel.safetensors"
    save_selector(path, selector, reconstructor=rec, metadata=_metadata(hf_config))

    loaded, meta = load_selector(path)
    x = torch.randn(2, 20, 32)
    assert torch.equal(loaded.scores(x), selector.eval().scores(x))
    assert loaded.config == selector.config and not loaded.training
    assert meta["source_model"] == "org/tiny-llava"
    assert meta["feature_layer"] == -2
    assert meta["feature_dim"] == 32
    assert meta["vision_signature"] == vision_signature(hf_config)
    assert meta["training"]["eval"]["0.25"]["random"] == 0.8
    assert meta["format_version"] == 1
    # The reconstructor travels with it, for training to resume from.
    assert meta["reconstructor_config"] == asdict(rec.config)
    with safe_open(str(path), framework="pt") as f:
        saved = {k.removeprefix("reconstructor."): f.get_tensor(k) for k in f.keys() if k.startswith("reconstructor.")}
    assert saved.keys() == rec.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in rec.state_dict().items())
    assert not list(tmp_path.glob("*.tmp"))


def test_save_requires_metadata(tmp_path):
    with pytest.raises(ValueError, match="vision_signature"):
        save_selector(tmp_path / "s.safetensors", _selector(), metadata={"source_model": "x", "feature_layer": -2})


def test_loading_a_pickle_is_refused(tmp_path):
    path = tmp_path / "selector.pt"
    torch.save(_selector().state_dict(), path)
    with pytest.raises(SelectorCheckpointError, match="not a safetensors file") as e:
        load_selector(path)
    assert str(path) in str(e.value)


def test_loading_garbage_is_refused(tmp_path):
    for i, blob in enumerate([b"", b"hello", b"\xff" * 64, b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson"]):
        path = tmp_path / f"garbage{i}.safetensors"
        path.write_bytes(blob)
        with pytest.raises(SelectorCheckpointError) as e:
            load_selector(path)
        assert str(path) in str(e.value)


def test_loading_safetensors_without_our_metadata_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(SelectorCheckpointError, match="not a vllm_tokenprune selector checkpoint") as e:
        load_selector(path)
    assert str(path) in str(e.value)
    save_file({"weight": torch.zeros(3)}, str(path), metadata={"format": '"vllm_tokenprune.selector"',
                                                               "format_version": "1"})
    with pytest.raises(SelectorCheckpointError, match="lacks required metadata"):
        load_selector(path)


def test_loading_mismatched_tensors_is_refused(tmp_path):
    path = tmp_path / "sel.safetensors"
    save_selector(path, _selector(), metadata=_metadata(_llava_config()))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["selector.head.weight"]
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(SelectorCheckpointError, match="head.weight"):
        load_selector(path)


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_selector(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------
# Compatibility


def test_check_compatible_passes_on_the_same_config():
    meta = _metadata(_llava_config())
    meta["feature_dim"] = 64
    check_compatible(meta, _llava_config())


def test_check_compatible_names_every_mismatched_field():
    meta = _metadata(_llava_config())
    meta["feature_dim"] = 64
    served = _llava_config(vision={"hidden_size": 128}, vision_feature_layer=-1)
    with pytest.raises(SelectorMismatchError) as e:
        check_compatible(meta, served)
    msg = str(e.value)
    assert "org/tiny-llava" in msg
    for field in ("feature_dim", "vision_hidden_size", "vision_feature_layer", "selector input dim"):
        assert field in msg
    assert "expected 64, found 128" in msg
    assert "patch_size" not in msg  # only what differs


def test_check_compatible_catches_a_different_tower_geometry():
    meta = _metadata(_llava_config())
    meta["feature_dim"] = 64
    with pytest.raises(SelectorMismatchError, match="image_size: expected 168, found 336"):
        check_compatible(meta, _llava_config(vision={"image_size": 336}))
    with pytest.raises(SelectorMismatchError, match="vision_feature_select_strategy"):
        check_compatible(meta, _llava_config(vision_feature_select_strategy="full"))


def test_vision_signature_of_other_families():
    from transformers import LlavaNextConfig, LlavaOnevisionConfig, Qwen2_5_VLConfig

    qwen = Qwen2_5_VLConfig(vision_config={"hidden_size": 128, "out_hidden_size": 96, "depth": 3})
    sig = vision_signature(qwen)
    assert sig["feature_dim"] == 96 and sig["vision_hidden_size"] == 128
    assert sig["num_vision_layers"] == 3 and sig["spatial_merge_size"] == 2
    assert sig["vision_feature_layer"] is None
    assert vision_signature(LlavaNextConfig())["model_type"] == "llava_next"
    ov = vision_signature(LlavaOnevisionConfig())
    assert ov["vision_model_type"] == "siglip_vision_model" and ov["vision_feature_select_strategy"] == "full"
    stacked = vision_signature(_llava_config(vision_feature_layer=[-2, -1]))
    assert stacked["feature_dim"] == 128 and stacked["vision_feature_layer"] == [-2, -1]


def test_scores_accept_low_precision_features():
    selector = _selector().to(torch.bfloat16)
    scores = selector.scores(torch.randn(10, 32, dtype=torch.bfloat16))
    assert scores.dtype == torch.float32 and scores.shape == (10,)
    assert learned_keep(selector, torch.randn(10, 32), 0.5).shape == (5,)
    with pytest.raises(ValueError, match="dim 32"):
        selector.scores(torch.randn(10, 16))


def test_the_shipped_checkpoint_loads_in_float32_under_a_low_precision_default():
    """vLLM builds the model under its dtype (bf16 here) and device: the selector, the
    question-reading selector and the budget predictor stay in the float32 they were trained
    in, on the CPU until the model moves them, and equal to a plain float32 load."""
    from vllm.utils.torch_utils import set_default_torch_dtype

    from vllm_tokenprune.selection.budget import load_budget_predictor
    from vllm_tokenprune.selection.selector import load_query_selector
    from vllm_tokenprune.testbed.demo_model import DEMO_DIR

    DEMO_SELECTOR = DEMO_DIR / "selector.safetensors"
    plain = [load_selector(DEMO_SELECTOR)[0], load_query_selector(DEMO_SELECTOR)[0],
             load_budget_predictor(DEMO_SELECTOR)[0]]
    with set_default_torch_dtype(torch.bfloat16), torch.device("meta"):
        loaded = [load_selector(DEMO_SELECTOR)[0], load_query_selector(DEMO_SELECTOR)[0],
                  load_budget_predictor(DEMO_SELECTOR)[0]]
        assert torch.get_default_dtype() == torch.bfloat16  # the context is left as it was
    assert torch.get_default_dtype() == torch.float32
    for module, reference in zip(loaded, plain):
        state = module.state_dict()
        assert state and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
        assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
