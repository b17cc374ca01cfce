"""Every family in the one table (serving/families.py) builds, trains and serves, and its
engine keeps 1 and N - 1 tokens with every method.

Serving is tested for every family by tests/test_server.py (its families come from the
same table); here each family's tiny checkpoint is built,
a selector is trained on it with `vllm-tokenprune train`, and vLLM's own processor for its
pruned architecture, with that selector in the model config, sizes an image to K.
"""

from __future__ import annotations

import pytest
from PIL import Image
from reference import chat, noise_image
from transformers import AutoConfig

from vllm_tokenprune.selection.methods import METHOD_NAMES
from vllm_tokenprune.selection.selector import check_compatible, load_selector
from vllm_tokenprune.serving.families import FAMILIES, by_name, of_architectures, of_model_type
from vllm_tokenprune.serving.policy import keep_count
from vllm_tokenprune.testbed import tiny
from vllm_tokenprune.testbed.synthetic import write_image_folder
from vllm_tokenprune.training.train import TrainConfig, train_on_folder


def test_every_table_reads_the_family_table():
    assert tiny.ARCHES == tuple(f.name for f in FAMILIES)
    for family in FAMILIES:
        assert by_name(family.name) is of_architectures([family.stock]) is of_model_type(family.model_type)
        assert family.pruned == "Pruned" + family.stock and family.features in ("llava", "gemma3", "internvl", "qwen")
    with pytest.raises(ValueError, match="llava-onevision"):  # the message lists the families
        by_name("paligemma")
    with pytest.raises(ValueError, match="not one pruning serves"):
        of_model_type("paligemma")


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


@pytest.mark.vllm
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_method_keeps_one_and_all_but_one_token(family, tiny_checkpoint, random_selector):
    """The extremes of K in the engine, for every method: the prompt loses exactly N - K
    tokens and the model answers. On the anyres families N - 1 exceeds the image's real
    tokens, so newline markers fill the count."""
    from vllm import LLM, SamplingParams

    path = tiny_checkpoint(family.name)
    image = noise_image(336, 252, seed=1)
    n = tiny.count_image_tokens(path, image.size)
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=4096, seed=0,
              hf_overrides={"architectures": [family.pruned],
                            "tokenprune_selector": str(random_selector(family.name))})
    try:
        def prompt_tokens(**mm_kwargs) -> int:
            (out,) = llm.chat(chat([image], lambda im: {"type": "image_pil", "image_pil": im}),
                              SamplingParams(temperature=0, max_tokens=2, min_tokens=2),
                              use_tqdm=False, mm_processor_kwargs=mm_kwargs)
            assert len(out.outputs[0].token_ids) == 2
            return len(out.prompt_token_ids)

        full = prompt_tokens(keep_ratio=1.0)
        for k in (1, n - 1):
            for method in METHOD_NAMES:
                assert full - prompt_tokens(keep_ratio=k / n, prune_method=method) == n - k, (method, k)
    finally:
        llm.llm_engine.engine_core.shutdown()

