"""The question-answering scenes: disjoint splits, answers right by construction (checked
against the pixels, independently of the generator's bookkeeping), the eval-set writer."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pixels import coloured_blobs, split_digests

from vllm_tokenprune.cli import main
from vllm_tokenprune.testbed.synthetic import (
    COUNT_WORDS,
    QUESTIONS,
    SPLITS,
    TASK_COLOURS,
    TASK_PATCH,
    make_scene,
    scene_seed,
)


def _shapes_by_colour(image: Image.Image) -> Counter:
    return Counter(name for name, _ in coloured_blobs(image))


def test_split_seed_ranges_are_disjoint_and_checked():
    ranges = sorted(SPLITS.values())
    assert all(stop <= next_start for (_, stop), (next_start, _) in zip(ranges, ranges[1:]))
    assert scene_seed("train", 0) != scene_seed("test", 0) != scene_seed("val", 0)
    test_size = SPLITS["test"][1] - SPLITS["test"][0]
    with pytest.raises(ValueError, match="outside split"):
        scene_seed("test", test_size)  # would be the first val seed
    with pytest.raises(ValueError, match="outside split"):
        scene_seed("train", -1)
    with pytest.raises(ValueError, match="unknown split"):
        scene_seed("dev", 0)


@pytest.mark.parametrize("variant", ["textured", "plain"])
def test_train_and_test_images_never_coincide(variant):
    train, test = split_digests(variant, "train", 150), split_digests(variant, "test", 150)
    assert len(train) == len(test) == 150 and not train & test


def test_same_seed_same_pixels_and_variants_differ():
    a, b = make_scene("textured", 7), make_scene("textured", 7)
    assert a.image.tobytes() == b.image.tobytes() and a.shapes == b.shapes
    assert make_scene("plain", 7).image.tobytes() != a.image.tobytes()
    with pytest.raises(ValueError, match="unknown variant"):
        make_scene("striped", 0)


@pytest.mark.parametrize("variant", ["textured", "plain"])
def test_answers_are_right_by_construction(variant):
    answers = Counter()
    for i in range(60):
        scene = make_scene(variant, scene_seed("test", i))
        from_pixels = _shapes_by_colour(scene.image)
        assert sum(from_pixels.values()) == len(scene.shapes)
        assert scene.answer("count") == COUNT_WORDS[sum(from_pixels.values()) - 1]
        (top, top_n), *rest = from_pixels.most_common()
        assert not rest or rest[0][1] < top_n, "the most frequent colour must be unique"
        assert scene.answer("colour") == top
        answers.update(scene.answer(q) for q in QUESTIONS)
        assert bool(scene.textures) == (variant == "textured")
    assert set(COUNT_WORDS) <= set(answers) and len(set(TASK_COLOURS) & set(answers)) >= 5


def test_textures_are_patch_aligned_repeating_and_hold_no_content():
    scene = make_scene("textured", scene_seed("test", 3))
    content = scene.content_patches()
    assert content.shape == (12, 12) and content.sum() == len(scene.shapes)  # one token per shape
    pixels = np.asarray(scene.image, np.float32)
    for texture in scene.textures:
        c0, r0, c1, r1 = texture.cells
        assert not content[r0:r1, c0:c1].any()
        if texture.kind == "gradient":
            continue
        patches = [pixels[r * TASK_PATCH:(r + 1) * TASK_PATCH, c * TASK_PATCH:(c + 1) * TASK_PATCH]
                   for r in range(r0, r1) for c in range(c0, c1)]
        # every patch of a periodic texture is the first one, up to the pixel noise
        assert max(np.abs(p - patches[0]).mean() for p in patches) < 8


def test_make_eval_set_writes_images_and_items(tmp_path):
    assert main(["make-eval-set", "--variant", "plain", "--split", "test", "--n", "6", "--out", str(tmp_path)]) == 0
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert [it["kind"] for it in items] == ["count", "colour"] * 3
    for i, item in enumerate(items):
        scene = make_scene("plain", scene_seed("test", i))
        assert item["question"] == QUESTIONS[item["kind"]] and item["answer"] == scene.answer(item["kind"])
        assert Image.open(tmp_path / item["image"]).tobytes() == scene.image.tobytes()


def test_make_eval_set_shows_each_scene_at_its_own_size(tmp_path):
    """--shown-scale: each image a square of the task's side times its own factor in the range,
    the scene resampled into it, the question and answer those of the scene as made."""
    from vllm_tokenprune.testbed.synthetic import TASK_IMAGE_SIZE

    assert main(["make-eval-set", "--variant", "plain", "--n", "12", "--shown-scale", "0.5,4",
                 "--out", str(tmp_path)]) == 0
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    sizes = [it["shown_size"] for it in items]
    assert all(TASK_IMAGE_SIZE // 2 <= s <= 4 * TASK_IMAGE_SIZE for s in sizes) and len(set(sizes)) > 6
    for i, item in enumerate(items):
        scene = make_scene("plain", scene_seed("test", i))
        assert item["answer"] == scene.answer(item["kind"])
        image = Image.open(tmp_path / item["image"])
        assert image.size == (item["shown_size"], item["shown_size"])
        back = np.asarray(image.resize(scene.image.size, Image.Resampling.BICUBIC), dtype=float)
        assert np.abs(back - np.asarray(scene.image, dtype=float)).mean() < 5  # another scene: about 13
    for bad in ("4,0.5", "0,1", "x"):
        with pytest.raises(SystemExit):
            main(["make-eval-set", "--shown-scale", bad, "--out", str(tmp_path / "bad")])
