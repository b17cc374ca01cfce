"""Every family in the one table (families.py) builds, trains and serves, and its
engine keeps 1 and N - 1 tokens with every method.

Serving is tested for every family by tests/test_server.py (its families come from the
same table); here each family's tiny checkpoint is built,
a selector is trained on it with `vllm-tokenprune train`, and vLLM's own processor for its
pruned architecture, with that selector in the model config, sizes an image to K.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
from PIL import Image
from reference import chat, noise_image
from transformers import AutoConfig

from vllm_tokenprune.families import FAMILIES, by_name, of_architectures, of_model_type
from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection.methods import IMAGE_METHOD_NAMES
from vllm_tokenprune.selection.selector import check_compatible, load_selector
from vllm_tokenprune.testbed import tiny
from vllm_tokenprune.testbed.synthetic import write_image_folder
from vllm_tokenprune.training.train import TrainConfig, train_on_folder


def test_every_table_reads_the_family_table():
    assert tiny.ARCHES == tuple(f.name for f in FAMILIES)
    for family in FAMILIES:
        assert by_name(family.name) is of_architectures([family.stock]) is of_model_type(family.model_type)
        assert family.pruned == "Pruned" + family.stock
    with pytest.raises(ValueError, match="llava-onevision"):  # the message lists the families
        by_name("paligemma")
    with pytest.raises(ValueError, match="not one pruning serves"):
        of_model_type("paligemma")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_name_a_row_holds_resolves(family):
    """A family's row names its parts in serving, training and the testbed (docs/architecture.md,
    "Adding a family"); each must exist, without importing vLLM."""
    from vllm_tokenprune.testbed.tiny.parts import Arch
    from vllm_tokenprune.training.features import READERS

    assert family.features in READERS, f"{family.name}: training/features.py READERS has no {family.features!r}"
    module, name = family.tiny_builder.split(":")
    assert isinstance(getattr(importlib.import_module(module), name, None), Arch), \
        f"{family.name}: no tiny builder {family.tiny_builder}"
    module, name = family.target.split(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{family.name}: no module {module}"
    assert f"class {name}(" in Path(spec.origin).read_text(), f"{family.name}: {module} defines no {name}"


@pytest.mark.vllm
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_builds_trains_and_is_served(family, tiny_checkpoint, tmp_path):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from vllm_tokenprune.serving import plugin

    path = tiny_checkpoint(family.name)  # builds
    config = AutoConfig.from_pretrained(path)
    assert config.architectures == [family.stock] and config.model_type == family.model_type

    images = tmp_path / "images"
    write_image_folder(images, 6, seed=0, size=168)
    selector = tmp_path / "selector.safetensors"
    cfg = TrainConfig(steps=2, batch_size=2, holdout=0.34, cache_dir=str(tmp_path / "cache"), eval_every=0)
    assert train_on_folder(str(path), images, selector, cfg, progress=False) == 0  # trains
    _, metadata = load_selector(selector)
    check_compatible(metadata, config)

    plugin.register()
    model_config = ModelConfig(model=str(path), hf_overrides={
        "architectures": [family.pruned], "tokenprune_selector": str(selector)})
    processor = MULTIMODAL_REGISTRY.create_processor(model_config)
    items = processor.info.parse_mm_data({"image": [Image.open(next(images.iterdir()))]})
    n = processor._unpruned_tokens(items["image"].get_image_size(0), {})
    out = processor(processor.dummy_inputs.get_dummy_text({"image": 1}), items,
                    hf_processor_mm_kwargs={"keep_ratio": 0.5, "prune_method": "learned"})
    assert [p.get_num_embeds() for p in out["mm_placeholders"]["image"]] == [keep_count(n, 0.5)]  # served: K


# --- in the worker (sent by `LLM.apply_model`) -------------------------------------------

def _count_host_syncs(model) -> None:
    """Count, per ``embed_multimodal`` call, the ops outside the stock tower that would make a
    GPU wait (tests/syncs.py)."""
    from syncs import HostSyncs

    embed, model.probe_syncs = model.embed_multimodal, []

    # Stock code's host work is vLLM's, not pruning's: the tower, its input parsing (InternVL
    # reads a CPU field), Qwen2.5-VL's window index (which pruning reads for statistics).
    towers = [m for name in ("visual", "vision_tower", "vision_model") if (m := getattr(model, name, None))]
    stock = [(m, "forward") for m in towers] + [
        (owner, name) for owner in (model, *towers)
        for name in ("_parse_and_validate_multimodal_inputs", "_parse_and_validate_image_input", "get_window_index_thw")
        if hasattr(owner, name)]

    def counted(**kwargs):
        with HostSyncs(skip=tuple(stock)) as syncs:
            out = embed(**kwargs)
        model.probe_syncs.append(dict(syncs.seen))
        return out

    model.embed_multimodal = counted


def _taken_syncs(model) -> list[dict[str, int]]:
    seen, model.probe_syncs = model.probe_syncs, []
    return seen


# Where embed_multimodal may still read the device, and why. Gemma 4 reads each image's patch
# grid from its patch positions, which vLLM keeps on the device (one read per call).
ALLOWED_SYNCS = {"gemma4": 1}


@pytest.mark.vllm
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_method_keeps_one_and_all_but_one_token(family, tiny_checkpoint, random_selector, monkeypatch):
    """The extremes of K in the engine, for every method: the prompt loses exactly N - K
    tokens and the model answers, and the encoder call runs no op that would make a GPU
    wait for the host. On the anyres families N - 1 exceeds the image's real tokens, so
    newline markers fill the count."""
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends functions
    path = tiny_checkpoint(family.name)
    image = noise_image(336, 252, seed=1)
    n = tiny.count_image_tokens(path, image.size)
    llm = LLM(model=str(path), dtype=tiny.cpu_dtype(family.name), enforce_eager=True, max_model_len=4096, seed=0,
              hf_overrides={"architectures": [family.pruned],
                            "tokenprune_selector": str(random_selector(family.name))})
    try:
        llm.apply_model(_count_host_syncs)

        def prompt_tokens(**mm_kwargs) -> int:
            (out,) = llm.chat(chat([image], lambda im: {"type": "image_pil", "image_pil": im}),
                              SamplingParams(temperature=0, max_tokens=2, min_tokens=2),
                              use_tqdm=False, mm_processor_kwargs=mm_kwargs)
            assert len(out.outputs[0].token_ids) == 2
            return len(out.prompt_token_ids)

        full = prompt_tokens(keep_ratio=1.0)
        llm.apply_model(_taken_syncs)
        for k in (1, n - 1):
            for method in IMAGE_METHOD_NAMES:
                assert full - prompt_tokens(keep_ratio=k / n, prune_method=method) == n - k, (method, k)
                (calls,) = llm.apply_model(_taken_syncs)
                assert len(calls) == 1 and sum(calls[0].values()) <= ALLOWED_SYNCS.get(family.name, 0), (
                    method, k, calls)
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.vllm
@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.mrope], ids=lambda f: f.name)
def test_a_batch_a_cache_hit_and_chunks_answer_as_each_request_alone(family, tiny_checkpoint, random_selector):
    """Requests of several ratios and methods answer the same alone in 32-token prefill
    chunks, together in one batch, and again from the prefix cache. (The M-RoPE families,
    whose positions make this harder, are tested so in tests/test_qwen.py.)"""
    from vllm import LLM, SamplingParams

    path = tiny_checkpoint(family.name)
    image = noise_image(336, 252, seed=5)
    # visionzip reads tower attention, which some towers probe apart from the batch (Gemma 4)
    asks = [{"keep_ratio": 0.25, "prune_method": "norm"}, {"keep_ratio": 1.0},
            {"keep_ratio": 0.5, "prune_method": "random"}, {"keep_ratio": 0.1, "prune_method": "learned"},
            {"keep_ratio": 0.5, "prune_method": "visionzip"}]
    greedy = SamplingParams(temperature=0, max_tokens=4, min_tokens=4)

    def engine(**args):
        return LLM(model=str(path), dtype=tiny.cpu_dtype(family.name), enforce_eager=True, max_model_len=4096, seed=0,
                   hf_overrides={"architectures": [family.pruned],
                                 "tokenprune_selector": str(random_selector(family.name))}, **args)

    def requests(llm):
        text = llm.get_tokenizer().apply_chat_template(
            # a question long enough that even keep 0.1 fills a 32-token block holding the image
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it ? " * 12}]}],
            tokenize=False, add_generation_prompt=True)
        return [{"prompt": text, "multi_modal_data": {"image": image}, "mm_processor_kwargs": ask} for ask in asks]

    def answers(outs):
        return [(out.prompt_token_ids, list(out.outputs[0].token_ids)) for out in outs]

    chunked = engine(enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=4,
                     enable_prefix_caching=False)
    try:
        alone = [answers(chunked.generate([r], greedy, use_tqdm=False))[0] for r in requests(chunked)]
    finally:
        chunked.llm_engine.engine_core.shutdown()
    llm = engine(block_size=32)
    try:
        assert answers(llm.generate(requests(llm), greedy, use_tqdm=False)) == alone
        for request, want in zip(requests(llm), alone):
            (again,) = llm.generate([request], greedy, use_tqdm=False)
            first_image_token = again.prompt_token_ids.index(tiny.image_token_id(path))
            assert again.num_cached_tokens > first_image_token, request["mm_processor_kwargs"]
            assert answers([again])[0] == want, request["mm_processor_kwargs"]
    finally:
        llm.llm_engine.engine_core.shutdown()


def image_runs(llm, image, placeholder: str, method: str, ratios=(1.0, 0.5, 0.1)):
    """Per ratio, the lengths of the image's placeholder runs in the prompt, and the prompt's
    text without them (its markers and text between runs)."""
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    soft = tokenizer.convert_tokens_to_ids(placeholder)
    runs, text = {}, {}
    for ratio in ratios:
        (out,) = llm.chat(chat([image], lambda im: {"type": "image_pil", "image_pil": im}),
                          SamplingParams(temperature=0, max_tokens=2, min_tokens=2), use_tqdm=False,
                          mm_processor_kwargs={"keep_ratio": ratio, "prune_method": method})
        ids = out.prompt_token_ids
        runs[ratio] = [len(list(run)) for is_soft, run in itertools.groupby(ids, key=soft.__eq__) if is_soft]
        text[ratio] = tokenizer.decode([t for t in ids if t != soft])
    return runs, text


@pytest.mark.vllm
def test_gemma3_pan_and_scan_crops_share_k(tiny_checkpoint, random_selector):
    """With pan-and-scan on, a wide image is the whole image plus crops, each in its own framed
    run with text between them: the processor cuts each run to its share of K
    (``policy.split_keep``), keeps the text, and the model fills each run with that many tokens."""
    from vllm import LLM

    from vllm_tokenprune.policy import split_keep

    path = tiny_checkpoint("gemma3")
    image = noise_image(500, 200, seed=4)
    crops = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 64}
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=4096, seed=0,
              mm_processor_kwargs=crops, hf_overrides={"architectures": [by_name("gemma3").pruned],
                                                       "tokenprune_selector": str(random_selector("gemma3"))})
    try:
        runs, text = image_runs(llm, image, "<image_soft_token>", "norm")
        for ratio in runs:
            assert text[ratio].count("<start_of_image>") == len(runs[ratio])
        per_crop = runs[1.0][0]
        assert len(runs[1.0]) > 2 and set(runs[1.0]) == {per_crop}  # the whole image and its crops
        n = per_crop * len(runs[1.0])
        for ratio in (0.5, 0.1):
            assert runs[ratio] == split_keep(keep_count(n, ratio), runs[1.0]), ratio
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.vllm
def test_gemma4_k_follows_the_servers_soft_token_budget(tiny_checkpoint, random_selector):
    """Gemma 4's N is the image's soft tokens under the budget the server sets
    (``--mm-processor-kwargs '{"max_soft_tokens": ...}'``): K = keep_count(N, ratio) of that N,
    in one run between the markers, which stay."""
    from vllm import LLM

    path = tiny_checkpoint("gemma4")
    image = noise_image(336, 252, seed=4)
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=4096, seed=0,
              mm_processor_kwargs={"max_soft_tokens": 140},
              hf_overrides={"architectures": [by_name("gemma4").pruned],
                            "tokenprune_selector": str(random_selector("gemma4"))})
    try:
        runs, text = image_runs(llm, image, "<|image|>", "visionzip")
        assert all(t.count("<|image><image|>") == 1 for t in text.values())
        (n,) = runs[1.0]
        assert n > tiny.count_image_tokens(path, image.size)  # more than under the checkpoint's budget of 70
        for ratio in (0.5, 0.1):
            assert runs[ratio] == [keep_count(n, ratio)], ratio
    finally:
        llm.llm_engine.engine_core.shutdown()
