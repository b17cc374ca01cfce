"""The shipped demo model: it loads in transformers in the hub layout, prompts are what
it was trained on, it answers held-out scenes, its selector fits it and keeps the shapes;
and training is deterministic (a few steps, twice)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from keep import learned_keep

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.testbed import tasks
from vllm_tokenprune.testbed.demo_build import Prompts, build_config, grow
from vllm_tokenprune.testbed.demo_model import (
    DEMO_DIR,
    Batch,
    DemoConfig,
    answer_logits,
    greedy_right,
    patch_labels,
    pixel_values,
    save_checkpoint,
    train_vlm,
    training_batch,
)

MODEL = DEMO_DIR / "model"
SELECTOR = DEMO_DIR / "selector.safetensors"


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(MODEL)


def _test_items(variant: str, n: int) -> list[tasks.Item]:
    return [tasks.item(variant, "test", i) for i in range(n)]


def test_shipped_files_are_small_and_complete():
    names = {p.name for p in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "processor_config.json"} <= names
    assert (MODEL / "model.safetensors").stat().st_size < 32 * 2**20  # bfloat16, 15M parameters
    assert SELECTOR.stat().st_size < 8 * 2**20
    assert not list(MODEL.glob("*selector*"))  # vLLM loads every safetensors file in the folder


def test_prompt_is_what_training_used(demo):
    """The HF processor's input ids (what vLLM prefills at keep 1.0) are the training prompt
    with the image placeholder expanded to 144 tokens."""
    _, processor = demo
    prompts = Prompts(processor.tokenizer)
    for it in _test_items("plain", 2):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it.question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        ids = processor(text=text, images=[it.scene.image], return_tensors="pt")["input_ids"][0].tolist()
        before, after = prompts.pieces(it.question)
        image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
        assert ids == before + [image_id] * 144 + after
        assert processor.tokenizer.unk_token_id not in prompts.target(it.answer)
    # pixels as training computed them
    image = it.scene.image
    reference = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values([image], processor), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", tasks.VARIANTS)
def test_answers_held_out_scenes_with_all_tokens_and_with_the_content_only(demo, variant):
    """transformers' own generate() at keep 1.0 on a few items; then teacher-forced greedy
    accuracy per question kind, with all tokens and with only the content patches."""
    model, processor = demo
    items = _test_items(variant, 96)
    asked = items[:4]
    right = 0
    for it in asked:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it.question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=text, images=[it.scene.image], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        right += processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == it.answer
    assert right >= len(asked) - 1
    prompts = Prompts(processor.tokenizer)
    everything = [torch.arange(144)] * len(items)
    content = [torch.from_numpy(np.flatnonzero(it.scene.content_patches().reshape(-1))) for it in items]
    for keep in (everything, content):
        with torch.no_grad():
            right = greedy_right(*answer_logits(model, Batch.of(items, keep, processor), prompts))
        for kind in tasks.kinds(variant):
            hits = [r for r, it in zip(right, items) if it.kind == kind]
            assert np.mean(hits) >= 0.85, (kind, np.mean(hits))  # 32 per kind; 400 in docs/quality.md


@pytest.mark.parametrize("variant", ["textured", "plain"])
def test_selector_fits_the_model_and_keeps_the_shapes(demo, variant):
    """At keep 0.25 (random keeps a quarter of the shape tokens) the selector keeps nearly
    all of them, on textured scenes too, where busy texture tokens compete for the budget."""
    from transformers import AutoConfig

    from vllm_tokenprune.selection.selector import check_compatible, load_selector
    from vllm_tokenprune.training.features import extract_features

    selector, metadata = load_selector(SELECTOR)
    check_compatible(metadata, AutoConfig.from_pretrained(MODEL))
    scenes = [it.scene for it in _test_items(variant, 32)]
    features, _ = extract_features(MODEL, [s.image for s in scenes], progress=False)
    kept = shapes = 0
    for scene, feats in zip(scenes, features):
        content = scene.content_patches().reshape(-1)
        keep = learned_keep(selector, feats, 0.25)
        assert len(keep) == keep_count(144, 0.25)
        kept += int(content[keep.numpy()].sum())
        shapes += int(content.sum())
    assert kept / shapes > 0.95


def test_training_is_deterministic_and_saves_the_hub_layout(tmp_path):
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    cfg = DemoConfig(vision_layers=1, text_layers=1, steps=2, batch_size=4, eval_every=0, eval_scenes=4)
    first, processor, report = train_vlm(cfg, progress=False)
    second, _, _ = train_vlm(cfg, progress=False)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert report["history"][-1]["step"] == 2

    path = save_checkpoint(first, processor, tmp_path / "model")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert "language_model.model.embed_tokens.weight" in keys and "language_model.lm_head.weight" in keys
    loaded = LlavaForConditionalGeneration.from_pretrained(path).eval()
    batch = Batch.of(_test_items("clutter", 3), [torch.arange(144)] * 3, processor)
    prompts = Prompts(processor.tokenizer)
    with torch.no_grad():
        (got, _), (want, _) = answer_logits(loaded, batch, prompts), answer_logits(first.eval(), batch, prompts)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_bfloat16_weights_halve_the_file_and_say_so(tmp_path):
    """`--weights-dtype bfloat16`: every tensor stored in bfloat16 (half the bytes), the config
    says so, and the weights read back are the trained ones rounded."""
    import json

    from safetensors.torch import load_file

    cfg = DemoConfig(vision_layers=1, text_layers=1, steps=1, batch_size=2, eval_every=0, eval_scenes=2)
    model, processor, _ = train_vlm(cfg, progress=False)
    full = save_checkpoint(model, processor, tmp_path / "f32") / "model.safetensors"
    half = save_checkpoint(model, processor, tmp_path / "bf16", "bfloat16") / "model.safetensors"
    assert 0.49 < half.stat().st_size / full.stat().st_size < 0.51
    saved, trained = load_file(half), load_file(full)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    for name, value in trained.items():
        assert torch.equal(saved[name], value.to(torch.bfloat16)), name
    config = json.loads((half.parent / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == config["vision_config"]["dtype"] == "bfloat16"


def test_selector_only_retrains_the_selector_of_a_saved_model(tmp_path):
    """`train-demo --selector-only`: the model stays byte for byte, a selector that fits it
    is written, and training.json records the selector settings used."""
    import json

    from transformers import AutoConfig

    from vllm_tokenprune.cli import main
    from vllm_tokenprune.selection.selector import check_compatible, load_selector

    cfg = DemoConfig(vision_layers=1, text_layers=1, steps=1, batch_size=2, eval_every=0, eval_scenes=2)
    model, processor, report = train_vlm(cfg, progress=False)
    save_checkpoint(model, processor, tmp_path / "model")
    (tmp_path / "training.json").write_text(json.dumps(report))
    weights = (tmp_path / "model" / "model.safetensors").read_bytes()
    assert main(["train-demo", "--out", str(tmp_path), "--selector-only", "--no-progress",
                 "--selector-images", "10", "--selector-steps", "2", "--threads", "1"]) == 0
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == weights
    _, metadata = load_selector(tmp_path / "selector.safetensors")
    check_compatible(metadata, AutoConfig.from_pretrained(tmp_path / "model"))
    config = json.loads((tmp_path / "training.json").read_text())["config"]
    assert config["selector_images"] == 10 and config["selector_steps"] == 2 and config["steps"] == 1


def test_continue_from_trains_the_saved_model_on_later_scenes(tmp_path):
    """`train-demo --continue-from DIR`: starts from DIR's weights, counts steps (and so
    scenes) on from where DIR stopped, records DIR's report; other model options are refused."""
    import json

    from vllm_tokenprune.cli import main

    first = tmp_path / "first"
    args = ["--vision-layers", "1", "--text-layers", "1", "--batch-size", "2", "--eval-every", "0",
            "--eval-scenes", "2", "--selector-images", "10", "--selector-steps", "1", "--no-progress"]
    assert main(["train-demo", "--out", str(first), "--steps", "2", *args]) == 0
    second = tmp_path / "second"
    assert main(["train-demo", "--out", str(second), "--continue-from", str(first), "--steps", "3", *args]) == 0
    report = json.loads((second / "training.json").read_text())
    assert report["first_step"] == 2 and report["history"][-1]["step"] == 5
    assert report["continued"]["config"]["steps"] == 2
    before = (first / "model" / "model.safetensors").read_bytes()
    assert (second / "model" / "model.safetensors").read_bytes() != before
    with pytest.raises(SystemExit, match="not the model these options describe, nor grows into it"):
        main(["train-demo", "--out", str(tmp_path / "third"), "--continue-from", str(first),
              "--steps", "1", *args, "--vision-layers", "2"])
    deeper = tmp_path / "deeper"  # a deeper language model: grown from the saved one, then trained
    assert main(["train-demo", "--out", str(deeper), "--continue-from", str(first), "--steps", "1",
                 *args, "--text-layers", "2"]) == 0
    assert json.loads((deeper / "training.json").read_text())["config"]["text_layers"] == 2


def test_a_grown_model_answers_exactly_as_the_shipped_one(demo):
    """demo_build.grow: a wider, deeper language model with a wider MLP that computes what the
    shipped one does until training moves it; a smaller one, or other heads, is refused."""
    model, processor = demo
    text = model.config.text_config
    shipped = DemoConfig(text_hidden=text.hidden_size, text_layers=text.num_hidden_layers,
                         text_intermediate=text.intermediate_size, text_heads=text.num_attention_heads)
    cfg = replace(shipped, text_hidden=text.hidden_size + 64, text_layers=text.num_hidden_layers + 1,
                  text_intermediate=text.intermediate_size + 256, text_heads=text.num_attention_heads + 2)
    grown = grow(model, build_config(cfg, processor.tokenizer))
    assert grown.config.text_config.num_hidden_layers == cfg.text_layers
    assert grown.config.text_config.hidden_size == cfg.text_hidden
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in model.parameters())
    batch = Batch.of(_test_items("clutter", 4), [torch.arange(144)] * 4, processor)
    prompts = Prompts(processor.tokenizer)
    with torch.no_grad():
        (got, _), (want, _) = answer_logits(grown, batch, prompts), answer_logits(model, batch, prompts)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    narrower = replace(shipped, text_hidden=text.hidden_size - 64, text_heads=text.num_attention_heads - 2)
    for smaller in (narrower, replace(shipped, text_heads=text.num_attention_heads * 2)):
        with pytest.raises(ValueError, match="grows only"):
            grow(model, build_config(smaller, processor.tokenizer))


def test_scenes_shown_at_other_sizes_reach_the_tower_resized_as_the_server_resizes_them(demo):
    """--shown-frac 1: every scene of a batch shown at another size, then resized by the
    checkpoint's own image processor: the same scenes and questions, near the task-sized
    pixels but not equal to them (and scenes of another step are far)."""
    _, processor = demo
    rng = np.random.default_rng
    shown = training_batch(0, DemoConfig(batch_size=4, shown_frac=1.0, aux_weight=0), processor, rng(0))
    plain = training_batch(0, DemoConfig(batch_size=4, aux_weight=0), processor, rng(0))
    other = training_batch(1, DemoConfig(batch_size=4, aux_weight=0), processor, rng(0))
    assert shown.questions == plain.questions and shown.answers == plain.answers
    assert shown.pixels.shape == plain.pixels.shape and not torch.equal(shown.pixels, plain.pixels)
    near, far = (shown.pixels - plain.pixels).abs().mean(), (other.pixels - plain.pixels).abs().mean()
    assert near < far / 4, (near, far)


@pytest.mark.parametrize("variant", ["clutter", "textured"])
def test_patch_labels_mark_each_shapes_kind_and_centre(variant):
    """The auxiliary labels, from the scene's construction: one centre per shape, in a patch
    labelled with that shape's kind; kinds only where shapes put ink."""
    from vllm_tokenprune.testbed.synthetic import SHAPES

    for item in _test_items(variant, 20):
        scene = item.scene
        labels = patch_labels(scene)
        kind, centre = labels[:, 0].numpy(), labels[:, 1].numpy()
        assert centre.sum() == len(scene.shapes)
        assert sorted(kind[centre == 1]) == sorted(1 + SHAPES.index(s.kind) for s in scene.shapes)
        assert (scene.content_patches().reshape(-1)[kind > 0]).all()
        assert {int(k) for k in kind if k} == {1 + SHAPES.index(s.kind) for s in scene.shapes}
