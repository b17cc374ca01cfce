"""The question-reading selector: how it reads a question, its checkpoint section, and
`vllm-tokenprune train-query` on a tiny LLaVA (transformers only, no server)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from vllm_tokenprune.selection.selector import (
    ATTENTION_SECTION,
    QUERY_SECTION,
    SelectorCheckpointError,
    SelectorConfig,
    TokenSelector,
    load_query_selector,
    load_selector,
    query_section,
    read_checkpoint,
)
from vllm_tokenprune.training import query
from vllm_tokenprune.training.reconstruction import save_selector, write_checkpoint


def reader(feature_dim: int = 16, query_dim: int = 8) -> TokenSelector:
    torch.manual_seed(0)
    return TokenSelector(SelectorConfig(feature_dim=feature_dim, width=32, query_dim=query_dim)).eval()


def test_a_padded_question_in_a_batch_scores_as_it_does_alone():
    selector = reader()
    feats, short, long = torch.randn(2, 10, 16), torch.randn(3, 8), torch.randn(5, 8)
    questions = torch.zeros(2, 5, 8)
    questions[0, :3], questions[1] = short, long
    padding = torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    with torch.no_grad():
        batch = selector.scores(feats, query=questions, query_padding=padding)
        alone = [selector.scores(feats[0], query=short), selector.scores(feats[1], query=long)]
    assert torch.allclose(batch[0], alone[0], atol=1e-5) and torch.allclose(batch[1], alone[1], atol=1e-5)
    assert not torch.allclose(alone[0], selector.scores(feats[0], query=long))  # the question matters


def test_an_image_only_selector_refuses_a_question():
    image_only = TokenSelector(SelectorConfig(feature_dim=16, width=32))
    with pytest.raises(ValueError, match="reads no question"):
        image_only.scores(torch.randn(4, 16), query=torch.randn(2, 8))
    assert image_only.scores(torch.randn(4, 16), query=torch.empty(0, 8)).shape == (4,)  # no question: fine


def test_the_question_reader_is_its_own_checkpoint_section(tmp_path):
    metadata = {"source_model": "m", "feature_layer": -2, "vision_signature": {"feature_dim": 16}}
    plain, with_reader = tmp_path / "plain.safetensors", tmp_path / "reader.safetensors"
    image_only = TokenSelector(SelectorConfig(feature_dim=16, width=32))
    save_selector(plain, image_only, metadata=metadata)
    save_selector(with_reader, image_only, query=query_section(reader(), {"k": 1}), metadata=metadata)
    assert load_query_selector(plain) is None
    loaded, header = load_query_selector(with_reader)
    assert header["k"] == 1 and loaded.config.query_dim == 8
    for name, value in reader().state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    assert load_selector(with_reader)[0].config.query_dim == 0  # learned keeps the image-only one
    tensors, meta = read_checkpoint(with_reader, "cpu")
    write_checkpoint(with_reader, tensors, {**meta, QUERY_SECTION: {**meta[QUERY_SECTION], "format_version": 99}})
    with pytest.raises(SelectorCheckpointError, match="format version 99"):
        load_query_selector(with_reader)


@pytest.mark.parametrize("arch", ["llava", "qwen2.5-vl"])
def test_train_query_writes_its_section_and_keeps_the_rest_of_the_checkpoint(
        arch, tiny_checkpoint, random_selector, tmp_path):
    from transformers import AutoConfig

    from vllm_tokenprune.testbed.tasks import write_eval_set

    items = write_eval_set(tmp_path / "items", "clutter", "train", 30)
    start = tmp_path / "start.safetensors"
    tensors, meta = read_checkpoint(random_selector(arch), "cpu")
    write_checkpoint(start, {k: v for k, v in tensors.items() if not k.startswith("query_selector.")},
                     {k: v for k, v in meta.items() if k != QUERY_SECTION})
    out = tmp_path / "trained.safetensors"
    args = argparse.Namespace(model=str(tiny_checkpoint(arch)), selector=start, data=[items], out=out,
                              image_only=False, budget_only=False, steps=40, batch_size=8, lr=3e-3, warmup_steps=5,
                              heldout=0.2, keep_ratio=0.1, eval_every=20, seed=0, threads=1, budget_steps=50,
                              budget_margin=0.2, budget_extra=4.0)
    assert query.run(args) == 0
    assert "budget_predictor" not in read_checkpoint(out, "cpu")[1]  # the question reader fits none
    trained, header = load_query_selector(out)
    shares = header["heldout_recall"]
    assert 0 <= shares["start"] <= shares["attention"] <= 1 and 0 <= shares["trained"] <= shares["attention"]
    assert [h["step"] for h in header["history"]] == [0, 20, 40]
    # It starts from the image-only selector and reads questions as wide as the model's words.
    assert trained.config.query_dim == AutoConfig.from_pretrained(tiny_checkpoint(arch)).get_text_config().hidden_size
    before, after = read_checkpoint(start, "cpu")[0], read_checkpoint(out, "cpu")[0]
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # A reconstruction-trained selector's predictor is refitted by `train`, not here.
    assert query.run(argparse.Namespace(**{**vars(args), "selector": out, "budget_only": True})) == 2
    # --image-only refits the learned method's selector instead, and its budget predictor to
    # what that selector rates above an even share; the question-reading section stays.
    refit = tmp_path / "refit.safetensors"
    assert query.run(argparse.Namespace(**{**vars(args), "selector": out, "out": refit, "image_only": True})) == 0
    tensors, meta = read_checkpoint(refit, "cpu")
    assert meta[ATTENTION_SECTION]["heldout_recall"]["attention"] == shares["attention"]
    assert load_query_selector(refit)[1] == header
    assert not torch.equal(tensors["selector.head.weight"], before["selector.head.weight"])
    assert all(torch.equal(tensors[k], v) for k, v in after.items() if not k.startswith(("selector.", "budget.")))
    budget = meta["budget_predictor"]
    assert budget["target"]["kind"] == "above an even share" and budget["target"]["steps"] == 50
    assert 0 < budget["eval"]["target_fraction"]["mean"] <= 1 and 0 <= budget["eval"]["count_covered"] <= 1
    # --budget-only refits that predictor alone, from the tower's features without the
    # teacher: with the same flags the same fit, with another margin more tokens.
    same = tmp_path / "same.safetensors"
    assert query.run(argparse.Namespace(**{**vars(args), "selector": refit, "out": same, "budget_only": True})) == 0
    again = read_checkpoint(same, "cpu")[1]["budget_predictor"]["eval"]
    for key in ("target_fraction", "predicted_fraction", "count_fraction"):
        assert again[key] == pytest.approx(budget["eval"][key], abs=1e-5), key
    assert again["count_covered"] == budget["eval"]["count_covered"]
    wider = tmp_path / "wider.safetensors"
    assert query.run(argparse.Namespace(**{**vars(args), "selector": refit, "out": wider, "budget_only": True,
                                           "budget_margin": 1.0})) == 0
    tensors_after, meta_after = read_checkpoint(wider, "cpu")
    assert all(torch.equal(tensors_after[k], v) for k, v in tensors.items() if not k.startswith("budget."))
    assert meta_after["budget_predictor"]["target"]["margin"] == 1.0
    assert meta_after["budget_predictor"]["eval"]["target_fraction"]["mean"] > budget["eval"]["target_fraction"]["mean"]


@pytest.mark.parametrize("arch", ["llava", "qwen2.5-vl"])
def test_the_teacher_map_is_a_distribution_over_the_image_tokens(arch, tiny_checkpoint, tmp_path):
    from reference import noise_image

    sizes = [(112, 112), (168, 224), (224, 112)]  # Qwen keeps each size: N varies
    for i, size in enumerate(sizes):
        noise_image(*size, seed=i).save(tmp_path / f"{i}.png")
    lines = [{"image": f"{i}.png", "question": f"what is in corner {i} ?", "answer": "red"} for i in range(3)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = query.read_items(tmp_path / "items.jsonl")
    taught = query.teach(str(tiny_checkpoint(arch)), items, progress=False)
    for features, attention in zip(taught.features, taught.attention):
        assert features.shape[0] == attention.shape[0]
        assert torch.allclose(attention.sum(), torch.tensor(1.0)) and (attention >= 0).all()
    assert len({len(f) for f in taught.features}) == (3 if arch.startswith("qwen") else 1)
    # Without answers the map comes from the question alone; the question is the same words.
    unanswered = query.teach(str(tiny_checkpoint(arch)), [(i, q, None) for i, q, _ in items], progress=False)
    assert not all(torch.allclose(a, b) for a, b in zip(unanswered.attention, taught.attention))
    assert all(torch.equal(a, b) for a, b in zip(unanswered.questions, taught.questions))
    # A padded batch of them trains and scores as each alone.
    selector = TokenSelector(SelectorConfig(feature_dim=taught.features[0].shape[1],
                                            query_dim=taught.questions[0].shape[1])).eval()
    batch = query._batch(taught, range(3))
    with torch.no_grad():
        together = query._scores(selector, batch)
        for i in range(3):
            alone = selector.scores(taught.features[i], query=taught.questions[i])
            assert torch.allclose(together[i, :len(alone)], alone, atol=1e-5)
    assert 0 < query.evaluate(selector, taught, 0.25) <= 1


@pytest.mark.parametrize("arch", ["llava", "qwen2.5-vl"])
def test_a_head_that_writes_nothing_teaches_nothing(arch, tiny_checkpoint):
    """The teacher weights each head's attention by ||W_O^h W_V^h x_j||: zero for a head whose
    output projection is zero, what the projections give by hand for the others."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint(arch), dtype=torch.float32)
    layer = model.model.language_model.layers[0]
    attn, d = layer.self_attn, layer.self_attn.head_dim
    heads = attn.o_proj.weight.shape[1] // d
    with torch.no_grad():
        attn.o_proj.weight[:, :d] = 0  # head 0 writes nothing
        hidden = torch.randn(5, attn.o_proj.weight.shape[0])
        norms = query.moved(layer, hidden)
        assert norms.shape == (heads, 5)
        assert (norms[0] == 0).all() and (norms[1:] > 0).all()
        value = attn.v_proj(layer.input_layernorm(hidden))[2].view(-1, d)[1 // attn.num_key_value_groups]
        torch.testing.assert_close(norms[1, 2], (attn.o_proj.weight[:, d:2 * d] @ value).norm())


def test_families_whose_placeholders_are_not_the_candidates_are_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="one to one"):
        query.teach(str(tiny_checkpoint("llava-next")), [(tmp_path / "x.png", "q", None)], progress=False)
