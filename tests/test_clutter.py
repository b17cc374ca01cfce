"""The clutter task: answers right by construction, checked from the pixels (shapes counted
and classified, digits read back), content that ranges past the budget, textures that are
periodic per region and distinct across regions, disjoint splits, the eval-set writer."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pixels import coloured_blobs, shape_kind, split_digests

from vllm_tokenprune.cli import main
from vllm_tokenprune.testbed.clutter import (
    _FONT,
    COUNT_WORDS,
    DIGITS,
    GLYPH_SCALE,
    MAX_CONTENT,
    QUESTIONS,
    TEXT_LENGTH,
    glyph_origins,
    make_clutter_scene,
)
from vllm_tokenprune.testbed.synthetic import SHAPES, TASK_PATCH, scene_seed
from vllm_tokenprune.testbed.tasks import item

VARIANTS = ["clutter", "clutter-plain"]


def _read_box(image: Image.Image, box: tuple[int, int, int, int]) -> str:
    """The digits in the box, read by matching each glyph cell's dark pixels against the font."""
    pixels = np.asarray(image, np.float32).mean(axis=-1)
    text = ""
    for x, y in glyph_origins(box):
        cell = pixels[y:y + 5 * GLYPH_SCALE, x:x + 3 * GLYPH_SCALE] < 128
        bits = cell.reshape(5, GLYPH_SCALE, 3, GLYPH_SCALE).mean(axis=(1, 3)) > 0.5
        matches = [d for d in DIGITS if (np.array([[c == "1" for c in row] for row in _FONT[d]]) == bits).all()]
        assert len(matches) == 1
        text += matches[0]
    return text


@pytest.mark.parametrize("variant", VARIANTS)
def test_answers_are_right_by_construction(variant):
    answers = Counter()
    for i in range(40):
        scene = make_clutter_scene(variant, scene_seed("test", i))
        found = coloured_blobs(scene.image)
        assert scene.answer("count") == COUNT_WORDS[len(found) - 1]
        kinds = Counter(shape_kind(blob) for _, blob in found)
        assert kinds[scene.asked_shape] == 1, "the asked shape must be the only one of its kind"
        assert scene.question("shape-colour") == f"what colour is the {scene.asked_shape} ?"
        assert scene.answer("shape-colour") == next(c for c, b in found if shape_kind(b) == scene.asked_shape)
        assert scene.answer("read") == " ".join(_read_box(scene.image, scene.box))
        x0, y0, x1, y1 = scene.box  # one glyph per token: the box is TEXT_LENGTH patches on the grid
        assert x0 % TASK_PATCH == y0 % TASK_PATCH == 0
        assert (x1 + 1 - x0, y1 + 1 - y0) == (TEXT_LENGTH * TASK_PATCH, TASK_PATCH)
        assert scene.patches_of("read").sum() == TEXT_LENGTH
        answers.update(scene.answer(k) for k in QUESTIONS)
        assert bool(scene.textures) == (variant == "clutter")
    assert set(COUNT_WORDS) <= set(answers)


def test_content_ranges_past_the_budget_and_covers_what_questions_need():
    density = []
    for i in range(200):
        scene = make_clutter_scene("clutter", scene_seed("test", i))
        content = scene.content_patches()
        density.append(int(content.sum()))
        for kind in QUESTIONS:
            needed = scene.patches_of(kind)
            assert needed.any() and not (needed & ~content).any()
        for _, blob in coloured_blobs(scene.image):  # every shape pixel is in a content patch
            assert content[blob[:, 0] // TASK_PATCH, blob[:, 1] // TASK_PATCH].all()
    # keep 0.1 of 144 is 14 tokens: most scenes hold more content than that
    assert min(density) <= 10 and max(density) >= 40 and max(density) <= MAX_CONTENT
    assert np.mean(np.array(density) > 14) > 0.5


def test_textures_are_periodic_per_region_distinct_across_regions_and_hold_no_content():
    scene = make_clutter_scene("clutter", scene_seed("test", 5))
    assert 4 <= len(scene.textures) <= 9
    content = scene.content_patches()
    pixels = np.asarray(scene.image, np.float32)
    firsts = []
    for texture in scene.textures:
        c0, r0, c1, r1 = texture.cells
        assert not content[r0:r1, c0:c1].any()
        patches = [pixels[r * TASK_PATCH:(r + 1) * TASK_PATCH, c * TASK_PATCH:(c + 1) * TASK_PATCH]
                   for r in range(r0, r1) for c in range(c0, c1)]
        firsts.append(patches[0])
        if texture.kind.endswith("gradient"):
            continue
        # every patch of a periodic texture is the first one, up to the pixel noise
        assert max(np.abs(p - patches[0]).mean() for p in patches) < 8
    for i, a in enumerate(firsts):  # no two regions alike
        assert all(np.abs(a - b).mean() > 8 for b in firsts[i + 1:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_splits_are_disjoint_and_scenes_deterministic(variant):
    train, test = split_digests(variant, "train", 100), split_digests(variant, "test", 100)
    assert len(train) == len(test) == 100 and not train & test
    a, b = make_clutter_scene(variant, 11), make_clutter_scene(variant, 11)
    assert a.image.tobytes() == b.image.tobytes() and a.shapes == b.shapes and a.text == b.text


def test_questions_cycle_and_every_kind_is_asked_about():
    items = [item("clutter", "test", i) for i in range(30)]
    assert [it.kind for it in items] == list(QUESTIONS) * 10
    assert {it.scene.asked_shape for it in items} == set(SHAPES)
    with pytest.raises(ValueError, match="unknown variant"):
        make_clutter_scene("textured", 0)


def test_make_eval_set_writes_clutter_items_with_their_density(tmp_path):
    assert main(["make-eval-set", "--variant", "clutter", "--n", "6", "--out", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    for i, line in enumerate(lines):
        it = item("clutter", "test", i)
        assert (line["question"], line["answer"], line["kind"]) == (it.question, it.answer, it.kind)
        assert line["content_tokens"] == int(it.scene.content_patches().sum())
        assert Image.open(tmp_path / line["image"]).tobytes() == it.scene.image.tobytes()
