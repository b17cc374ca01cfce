"""Feature extraction, synthetic images, the training loop and the `train` command, on the tiny LLaVA."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from folders import SIZES, folder_of_sizes
from keep import learned_keep

from vllm_tokenprune.families import FAMILIES
from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection.selector import (
    SelectorMismatchError,
    check_compatible,
    load_selector,
    vision_signature,
)
from vllm_tokenprune.testbed.synthetic import make_shapes_image, write_image_folder
from vllm_tokenprune.training.evaluation import format_report
from vllm_tokenprune.training.features import ImageFolderError, extract_features, find_images, load_images
from vllm_tokenprune.training.ragged import RaggedFeatures
from vllm_tokenprune.training.store import feature_store
from vllm_tokenprune.training.stream import InMemoryFeatures
from vllm_tokenprune.training.train import (
    MIN_STEPS,
    TrainConfig,
    default_steps,
    idle_cpu_threads,
    split_indices,
    train_selector,
)


@pytest.fixture(scope="module")
def tiny_llava(tiny_checkpoint):
    return tiny_checkpoint("llava")


@pytest.fixture(scope="module")
def llava_config(tiny_llava):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_llava)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _content_patches(image, patch: int) -> torch.Tensor:
    """Patches (row-major) holding any pixel far from the background (the image's median colour).

    The canvas noise has std 4, so a deviation of 40 is a shape pixel.
    """
    pixels = np.asarray(image, dtype=np.float32)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    ink = np.abs(pixels - background).max(axis=-1) > 40
    rows, cols = ink.shape[0] // patch, ink.shape[1] // patch
    return torch.from_numpy(ink.reshape(rows, patch, cols, patch).any(axis=(1, 3)).reshape(-1))


# ---------------------------------------------------------------------------------------
# Synthetic images


def test_shapes_images_are_seeded_and_mostly_empty(tmp_path):
    a = write_image_folder(tmp_path / "a", 3, seed=5, size=112)
    b = write_image_folder(tmp_path / "b", 6, seed=5, size=112)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b[:3]]  # image i depends on (seed, i)
    assert a[0].read_bytes() != a[1].read_bytes()
    image = make_shapes_image(np.random.default_rng(0), (120, 80))
    assert image.size == (120, 80) and image.mode == "RGB"
    for i in range(20):
        content = _content_patches(make_shapes_image(np.random.default_rng(i), 112), 14)
        assert 0 < content.float().mean() < 0.5


# ---------------------------------------------------------------------------------------
# Feature extraction


def test_extract_features_are_what_the_projector_receives(tiny_llava, llava_config):
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    from vllm_tokenprune.testbed.tiny import count_image_tokens

    size = llava_config.vision_config.image_size
    images = [make_shapes_image(np.random.default_rng(i), size) for i in range(4)]
    images.append(make_shapes_image(np.random.default_rng(9), (size + 40, size - 30)))  # resized + cropped
    features, info = extract_features(tiny_llava, images, batch_size=2, progress=False)

    num_tokens = count_image_tokens(tiny_llava, (size, size))
    assert features.grids.tolist() == [[size // 14, size // 14]] * 5 and size // 14 * size // 14 == num_tokens
    assert features.tokens.shape == (5 * num_tokens, llava_config.vision_config.hidden_size)
    assert features.tokens.dtype == torch.float32
    assert info == {
        "source_model": str(tiny_llava),
        "feature_layer": llava_config.vision_feature_layer,
        "vision_signature": vision_signature(llava_config),
        "num_tokens": [num_tokens, num_tokens],
        "feature_dim": llava_config.vision_config.hidden_size,
        "image_pixels": None,
    }

    # Direct: the whole HF model, capturing the input of its projector.
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    captured = []
    model.model.multi_modal_projector.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    pixels = AutoImageProcessor.from_pretrained(tiny_llava)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        model.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=llava_config.vision_feature_layer,
            vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        )
    torch.testing.assert_close(torch.stack(list(features)), captured[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [f.name for f in FAMILIES if f.name != "llava"])  # llava: above
def test_extract_features_other_families(tiny_checkpoint, arch):
    """LLaVA-NeXT, OneVision: the projector input of each image's base view (its first patch);
    Gemma 3: the projector's pooled tokens before its norm; Gemma 4: the soft tokens the
    embedder receives, each image at its own size; InternVL: the projector's input for
    the whole image as one tile; Qwen: the merged tokens (Qwen3-VL:
    the main embedding) of each image at its own size."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor

    path = tiny_checkpoint(arch)
    config = AutoConfig.from_pretrained(path)
    images = [make_shapes_image(np.random.default_rng(i), size) for i, size in enumerate([(200, 150), (90, 280),
                                                                                         (200, 150)])]
    features, info = extract_features(path, images, batch_size=2, progress=False)
    model = getattr(transformers, config.architectures[0]).from_pretrained(path).eval()
    processor = AutoImageProcessor.from_pretrained(path)
    with torch.no_grad():
        if arch.startswith("qwen"):
            inputs = processor(images=images, return_tensors="pt")
            merged = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
            ).pooler_output
            reference = torch.cat(list(merged))
            assert features.grids.tolist() == (inputs["image_grid_thw"][:, 1:] // 2).tolist()
            assert features.grids[0].tolist() != features.grids[1].tolist()  # each image at its own size
            assert info["feature_layer"] == "merger" and info["num_tokens"] == [
                int(features.lengths.min()), int(features.lengths.max())]
            assert info["image_pixels"] == {"min_pixels": processor.size["shortest_edge"],
                                            "max_pixels": processor.size["longest_edge"]}
            assert features.feature_dim == config.text_config.hidden_size  # the merger feeds the LM
            features = features.tokens
        elif arch == "gemma4":  # what the embedder receives
            captured = []
            model.model.embed_vision.register_forward_pre_hook(
                lambda module, args, kwargs: captured.append(kwargs["inputs_embeds"]), with_kwargs=True)
            inputs = processor(images=images, return_tensors="pt")
            per_image = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_position_ids"]).pooler_output
            reference = captured[0]
            assert features.lengths.tolist() == [len(p) for p in per_image]
            assert features.grids[0].tolist() != features.grids[1].tolist()  # each image at its own size
            assert info["feature_layer"] == "pooled"
            features = features.tokens
        elif arch in ("gemma3", "internvl"):  # what the projector's norm receives
            projector = model.model.multi_modal_projector
            captured = []
            (projector.mm_soft_emb_norm if arch == "gemma3" else projector).register_forward_pre_hook(
                lambda module, args: captured.append(args[0]))
            one_tile = {"crop_to_patches": False} if arch == "internvl" else {}
            model.model.get_image_features(
                pixel_values=processor(images=images, return_tensors="pt", **one_tile)["pixel_values"],
                **({"vision_feature_layer": -1, "vision_feature_select_strategy": "default"} if one_tile else {}))
            reference = captured[0]
            features = torch.stack(list(features))
            assert info["feature_layer"] == {"gemma3": "pooled", "internvl": "pixel_shuffle"}[arch]
        else:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            captured = []
            model.model.multi_modal_projector.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
            inputs = processor(images=images, return_tensors="pt")
            model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
            patches = [image_size_to_num_patches(tuple(s.tolist()), config.image_grid_pinpoints,
                                                 config.vision_config.image_size) for s in inputs["image_sizes"]]
            first = np.cumsum([0] + patches[:-1]).tolist()
            reference = captured[0][first]
            features = torch.stack(list(features))
            assert info["num_tokens"] == [features.shape[1]] * 2
    assert info["vision_signature"] == vision_signature(config)
    torch.testing.assert_close(features, reference, rtol=1e-5, atol=1e-5)


def test_feature_store_is_sharded_reused_and_invalidated(tiny_llava, tmp_path):
    paths = write_image_folder(tmp_path / "imgs", 5, seed=1, size=168)
    cache = tmp_path / "cache"
    store, hit = feature_store(tiny_llava, paths, cache_dir=cache, shard_images=2, progress=False)
    assert not hit and store.shard_sizes == [2, 2, 1]
    expected, info = extract_features(tiny_llava, load_images(paths), progress=False)
    assert store.info == info
    stored = RaggedFeatures.cat([store.load(i) for i in range(3)])
    torch.testing.assert_close(stored.tokens, expected.tokens, rtol=0, atol=0)
    assert torch.equal(stored.grids, expected.grids)
    count, total, squares = store.sums()  # from each shard's stored sums
    flat = expected.tokens.double()
    assert count == flat.shape[0]
    torch.testing.assert_close(total, flat.sum(0))
    torch.testing.assert_close(squares, flat.pow(2).sum(0))

    again, hit = feature_store(tiny_llava, paths, cache_dir=cache, shard_images=2, progress=False)
    assert hit and again.root == store.root
    stat = paths[0].stat()
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an edited image
    assert not feature_store(tiny_llava, paths, cache_dir=cache, progress=False)[1]
    assert not feature_store(tiny_llava, paths[:3], cache_dir=cache, progress=False)[1]
    assert len(list(cache.glob("*/index.json"))) == 3


def test_interrupted_extraction_keeps_its_finished_shards(tiny_llava, tmp_path, monkeypatch):
    from vllm_tokenprune.training import store as store_module

    paths = write_image_folder(tmp_path / "imgs", 5, seed=1, size=168)
    cache = tmp_path / "cache"
    loaded = []

    def load_or_fail(batch):
        if len(loaded) == 2:
            raise KeyboardInterrupt  # stopped while extracting the second shard
        loaded.append(batch)
        return load_images(batch)

    monkeypatch.setattr(store_module, "load_images", load_or_fail)
    with pytest.raises(KeyboardInterrupt):
        feature_store(tiny_llava, paths, cache_dir=cache, shard_images=2, batch_size=1, progress=False)
    [root] = cache.iterdir()
    assert sorted(p.name for p in root.iterdir()) == ["shard_0000000_0000002.safetensors"]

    loaded.clear()
    monkeypatch.setattr(store_module, "load_images", lambda batch: loaded.append(batch) or load_images(batch))
    store, hit = feature_store(tiny_llava, paths, cache_dir=cache, shard_images=2, batch_size=1, progress=False)
    assert not hit and [p for batch in loaded for p in batch] == paths[2:]  # only the missing shards
    torch.testing.assert_close(RaggedFeatures.cat([store.load(i) for i in range(3)]).tokens,
                               extract_features(tiny_llava, load_images(paths), progress=False)[0].tokens,
                               rtol=0, atol=0)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ImageFolderError, match="not found"):
        find_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ImageFolderError, match="no images"):
        find_images(tmp_path / "empty")
    nested = tmp_path / "nested"
    write_image_folder(nested / "b", 2, seed=0, size=32)
    write_image_folder(nested / "a", 1, seed=0, size=32)
    (nested / "broken.JPG").write_bytes(b"not a jpeg")
    paths = find_images(nested)
    assert [p.relative_to(nested).as_posix() for p in paths] == [
        "a/shapes_00000.png", "b/shapes_00000.png", "b/shapes_00001.png", "broken.JPG",
    ]
    with pytest.raises(ImageFolderError, match="broken.JPG"):
        load_images(paths)


def test_split_is_deterministic_and_disjoint():
    train, held = split_indices(64, 0.2, seed=3)
    assert (train, held) == split_indices(64, 0.2, seed=3)
    assert len(held) == 13 and sorted(train + held) == list(range(64))
    assert split_indices(2, 0.01, seed=0)[1] != []
    assert split_indices(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    assert len(split_indices(100_000, 0.2, seed=0, max_held=1000)[1]) == 1000
    with pytest.raises(ImageFolderError):
        split_indices(1, 0.2, seed=0)


# ---------------------------------------------------------------------------------------
# Streaming


def _numbered(sizes: list[int]) -> list[RaggedFeatures]:
    """Shards of images whose every value is the image's index."""
    ids = torch.arange(sum(sizes), dtype=torch.float32)
    return [RaggedFeatures.stack(part) for part in ids[:, None, None].expand(-1, 2, 3).split(sizes)]


def _ids(batch: RaggedFeatures) -> list[int]:
    return [int(image[0, 0]) for image in batch]


class _Shards:
    """A feature set of shards held in memory, recording which shards were read."""

    def __init__(self, shards):
        self.shards, self.read = shards, []
        self.key, self.shard_sizes, self.feature_dim = "test", [len(s) for s in shards], 3
        self.shard_tokens = [len(s.tokens) for s in shards]

    def load(self, shard):
        self.read.append(shard)
        return self.shards[shard]


def test_batches_visit_every_image_once_per_epoch_and_skip_by_arithmetic():
    from itertools import islice

    from vllm_tokenprune.training.stream import batches

    shards = _Shards(_numbered([3, 3, 3, 1]))
    stream = batches(shards, 2, shuffle_shards=2, seed=4)
    ids = [i for batch in islice(stream, 15) for i in _ids(batch)]  # three epochs of 10
    stream.close()
    for epoch in range(3):
        assert sorted(ids[10 * epoch:10 * epoch + 10]) == list(range(10))
    assert ids[:10] != ids[10:20]  # reshuffled every epoch

    skipped = _Shards(_numbered([3, 3, 3, 1]))
    stream = batches(skipped, 2, shuffle_shards=2, seed=4, skip=7)
    assert [i for batch in islice(stream, 8) for i in _ids(batch)] == ids[14:30]
    stream.close()
    assert len(skipped.read) < len(shards.read)  # skipped rounds were never read


def test_a_round_is_read_shard_by_shard_into_place():
    """Reading a round holds the round and one shard: each shard is let go once copied, not
    kept for a concatenation at the end."""
    import weakref

    from vllm_tokenprune.training.stream import read_round

    loaded = []

    class Fresh(_Shards):
        """Each load a new tensor, as from disk."""

        def load(self, shard):
            assert all(ref() is None for ref in loaded), "a shard read earlier is still held"
            shard = super().load(shard)
            tokens = shard.tokens.clone()
            loaded.append(weakref.ref(tokens))
            return RaggedFeatures(tokens, shard.grids)

    shards = _numbered([3, 2, 3])
    round_ = read_round(Fresh(shards), (0, 2))
    assert _ids(round_) == [0, 1, 2, 5, 6, 7]
    assert torch.equal(round_.tokens, RaggedFeatures.cat([shards[0], shards[2]]).tokens)
    assert len(loaded) == 2


def test_chunks_give_the_chosen_images_in_stored_order_and_read_only_their_shards():
    from vllm_tokenprune.training.stream import chunks

    shards = _Shards(_numbered([3, 3, 3, 1]))
    assert [_ids(c) for c in chunks(shards, 2)] == [[0, 1], [2], [3, 4], [5], [6, 7], [8], [9]]
    assert shards.read == [0, 1, 2, 3]
    some = _Shards(_numbered([3, 3, 3, 1]))
    assert [i for c in chunks(some, 2, images=[9, 1, 2, 7, 1]) for i in _ids(c)] == [1, 2, 7, 9]
    assert some.read == [0, 2, 3]  # shard 1 holds none of them


def test_the_budget_predictor_is_fitted_on_a_bounded_seeded_sample():
    from vllm_tokenprune.training.budget import fit_sample

    assert fit_sample(10, 10, seed=0) == list(range(10))
    sample = fit_sample(100_000, 4096, seed=3)
    assert len(set(sample)) == 4096 and sample == sorted(sample) and 0 <= sample[0] and sample[-1] < 100_000
    assert sample == fit_sample(100_000, 4096, seed=3) != fit_sample(100_000, 4096, seed=4)
    assert sample[-1] > 90_000 and sample[0] < 10_000  # spread over the folder, not its start


@pytest.mark.parametrize("arch", ["llava", "qwen2.5-vl"])
def test_streaming_from_shards_trains_exactly_as_in_memory(tiny_checkpoint, arch, tmp_path, restore_threads):
    """All shards in one shuffle round: the store's batches and statistics equal those of the
    same features in memory, so training does too. Evaluation sums per shard, so its
    means agree to rounding. Qwen's images are of three sizes, so batches are padded."""
    from vllm_tokenprune.training.stream import batches, mean_std

    torch.set_num_threads(1)
    model = tiny_checkpoint(arch)
    paths = folder_of_sizes(tmp_path / "imgs", 10, sizes=[168] if arch == "llava" else SIZES, seed=3)
    store, _ = feature_store(model, paths, cache_dir=tmp_path / "cache", shard_images=3, progress=False)
    features, _ = extract_features(model, load_images(paths), progress=False)
    assert store.shard_sizes == [3, 3, 3, 1]
    assert len(set(features.lengths.tolist())) == (1 if arch == "llava" else 3)
    from_store = batches(store, 4, shuffle_shards=4, seed=0)
    in_memory = batches(InMemoryFeatures(features), 4, shuffle_shards=4, seed=0)
    for _ in range(6):  # over two epochs
        a, b = next(from_store), next(in_memory)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.grids, b.grids)
    from_store.close()
    in_memory.close()
    flat = features.tokens
    mean, std = mean_std(store)
    torch.testing.assert_close(mean, flat.mean(0))
    torch.testing.assert_close(std, flat.std(0))

    cfg = TrainConfig(steps=6, batch_size=4, eval_every=3, width=32, recon_width=32, shuffle_shards=4)
    held, _ = feature_store(model, paths[::3], cache_dir=tmp_path / "cache", shard_images=3, progress=False)
    runs = [train_selector(train, cfg, eval_features=evals, progress=False, log=print)
            for train, evals in ((store, held), (features, features[::3]))]
    (sel_a, rec_a, report_a), (sel_b, rec_b, report_b) = runs
    for a, b in zip(report_a["history"], report_b["history"], strict=True):
        assert {k: v for k, v in a.items() if not k.startswith(("eval_", "seconds"))} == {
            k: v for k, v in b.items() if not k.startswith(("eval_", "seconds"))}
        assert a["eval_learned"] == pytest.approx(b["eval_learned"], rel=1e-6)
    for ratio, result in report_a["eval"].items():
        assert result == pytest.approx(report_b["eval"][ratio], rel=1e-6)
    for a, b in zip([*sel_a.state_dict().values(), *rec_a.state_dict().values()],
                    [*sel_b.state_dict().values(), *rec_b.state_dict().values()]):
        assert torch.equal(a, b)


def _without_seconds(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "seconds"}


# ---------------------------------------------------------------------------------------
# Learning


def test_selector_learns_to_keep_the_shapes(tiny_llava, llava_config, tmp_path, restore_threads):
    """On mostly empty canvases with a few shapes, with features from the random-weight tiny
    tower: a trained selector rebuilds held-out images much better than random selection,
    and the tokens it keeps are the shape patches."""
    torch.set_num_threads(idle_cpu_threads())
    size, patch = llava_config.vision_config.image_size, llava_config.vision_config.patch_size
    paths = write_image_folder(tmp_path / "imgs", 96, seed=0, size=size)
    features, _ = extract_features(tiny_llava, load_images(paths), progress=False)
    content = torch.stack([_content_patches(im, patch) for im in load_images(paths)])
    train_idx, held_idx = split_indices(len(paths), 0.25, seed=0)

    start = time.time()
    selector, _, report = train_selector(
        features[train_idx], TrainConfig(steps=150, eval_every=50),
        eval_features=features[held_idx], progress=False, log=print,
    )
    elapsed = time.time() - start
    results = report["eval"]
    print(format_report(results, f"held-out, {len(held_idx)} images, trained in {elapsed:.0f} s"))

    at_quarter = results["0.25"]
    assert at_quarter["learned"] < 0.5 * at_quarter["random"], results
    for r in results.values():
        assert r["learned"] < r["random"], results

    held_content = content[held_idx]
    held = torch.stack(list(features[held_idx]))
    kept = learned_keep(selector, held, 0.25)
    assert kept.shape == (len(held_idx), keep_count(held.shape[1], 0.25))
    kept_content = held_content.gather(1, kept).float().mean().item()
    base_rate = held_content.float().mean().item()
    recall = (held_content.gather(1, kept).sum() / held_content.sum()).item()
    print(f"content patches among kept: {kept_content:.3f} (base rate {base_rate:.3f}); "
          f"content patches kept: {recall:.3f}")
    assert kept_content > 3 * base_rate
    assert recall > 0.8


# ---------------------------------------------------------------------------------------
# The command


def test_cli_train_writes_a_checkpoint_that_loads(tiny_checkpoint, tiny_llava, llava_config, tmp_path, capsys,
                                                  restore_threads):
    from transformers import AutoConfig

    from vllm_tokenprune.cli import main

    write_image_folder(tmp_path / "imgs" / "sub", 12, seed=2, size=168)
    out = tmp_path / "out" / "selector.safetensors"
    argv = [
        "train", "--model", str(tiny_llava), "--images", str(tmp_path / "imgs"), "--out", str(out),
        "--steps", "6", "--eval-every", "3", "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"),
        "--no-progress", "--width", "32",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "extracted" in printed and "learned/random" in printed

    selector, meta = load_selector(out)
    check_compatible(meta, llava_config)
    assert selector.config.width == 32
    assert meta["source_model"] == str(tiny_llava)
    assert meta["training"]["steps"] == 6 and meta["training"]["target_keep_ratio"] == 0.25
    assert (meta["training"]["num_train_images"], meta["training"]["num_heldout_images"]) == (10, 2)
    assert [row["step"] for row in meta["training"]["history"]] == [3, 6]
    assert set(meta["eval"]["results"]) == {"0.1", "0.25", "0.5"}
    n, _ = meta["num_tokens"]
    assert meta["num_tokens"] == [n, n] and meta["image_pixels"] is None
    assert learned_keep(selector, torch.randn(n, meta["feature_dim"]), 0.25).shape == (keep_count(n, 0.25),)

    rows = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert rows == meta["training"]["history"] and {"eval_learned", "eval_random", "loss"} <= rows[0].keys()
    assert out.with_suffix(".curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not out.with_suffix(".state.pt").exists()  # removed once the checkpoint is written

    # The checkpoint still refuses a model of another family or another size.
    with pytest.raises(SelectorMismatchError, match="model_type"):
        check_compatible(meta, AutoConfig.from_pretrained(tiny_checkpoint("qwen2.5-vl")))
    wider = AutoConfig.from_pretrained(tiny_llava)
    wider.vision_config.hidden_size *= 2
    with pytest.raises(SelectorMismatchError, match="selector input dim"):
        check_compatible(meta, wider)

    assert main(argv) == 0
    assert "from cache" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["llava", "qwen2.5-vl"])
def test_resume_continues_exactly_where_training_stopped(tiny_checkpoint, arch, tmp_path, monkeypatch, capsys,
                                                         restore_threads):
    """A run stopped after step 7 (its last state is from step 6) and resumed ends with the
    same weights, history and log as the run that was never stopped; Qwen's images, at
    two sizes, have two token counts."""
    from vllm_tokenprune.cli import main
    from vllm_tokenprune.training import train

    folder_of_sizes(tmp_path / "imgs", 12, sizes=SIZES[:2], seed=2)
    common = ["--model", str(tiny_checkpoint(arch)), "--images", str(tmp_path / "imgs"), "--steps", "10",
              "--eval-every", "2", "--save-every", "3", "--batch-size", "4", "--width", "32",
              "--recon-width", "32", "--shard-images", "4", "--shuffle-shards", "1", "--threads", "1",
              "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    whole, resumed = tmp_path / "whole.safetensors", tmp_path / "resumed.safetensors"
    assert main(["train", *common, "--out", str(whole)]) == 0

    step, calls = train.training_step, []

    def stop_at_step_8(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(train, "training_step", stop_at_step_8)
    assert main(["train", *common, "--out", str(resumed)]) == 130  # interrupted, as Ctrl-C reports it
    assert [json.loads(line)["step"] for line in resumed.with_suffix(".log.jsonl").read_text().splitlines()] == [
        2, 4, 6]
    monkeypatch.setattr(train, "training_step", step)
    assert main(["train", *common, "--out", str(resumed), "--lr", "0.001", "--resume"]) == 2  # another run's state
    capsys.readouterr()
    assert main(["train", *common, "--out", str(resumed), "--resume"]) == 0
    assert "at step 6" in capsys.readouterr().out

    (sel_a, meta_a), (sel_b, meta_b) = load_selector(whole), load_selector(resumed)
    for a, b in zip(sel_a.state_dict().values(), sel_b.state_dict().values()):
        assert torch.equal(a, b)
    history = [_without_seconds(r) for r in meta_a["training"]["history"]]
    assert [r["step"] for r in history] == [2, 4, 6, 8, 10]
    assert [_without_seconds(r) for r in meta_b["training"]["history"]] == history
    assert meta_a["eval"] == meta_b["eval"]
    logged = [_without_seconds(json.loads(line)) for line in resumed.with_suffix(".log.jsonl").read_text().splitlines()]
    assert logged == history


def test_steps_follow_the_folder_when_not_given():
    assert TrainConfig().steps is None
    assert default_steps(72, 32, 3.0) == MIN_STEPS == 300  # small folders: the measured 300
    assert default_steps(10_000, 32, 3.0) == 938
    assert default_steps(100_000, 32, 3.0) == 9375


def test_cli_train_reports_a_folder_without_images(tmp_path, capsys):
    from vllm_tokenprune.cli import main

    (tmp_path / "empty").mkdir()
    argv = ["train", "--model", "unused", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "s.safetensors")]
    assert main(argv) == 2
    assert "no images" in capsys.readouterr().err
    assert not (tmp_path / "s.safetensors").exists()
