"""Shared fixtures: tiny checkpoints built once per test session, CPU settings for vLLM."""

from __future__ import annotations

import os

import pytest

# vLLM on this CPU: a KV-cache size is required, and the engine must bind loopback.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint("llava")`` -> path of a tiny random-weight checkpoint, built once."""
    built = {}

    def get(arch: str):
        if arch not in built:
            from vllm_tokenprune.testbed.tiny import build_tiny

            built[arch] = build_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), seed=0)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def random_selector(tiny_checkpoint, tmp_path_factory):
    """``random_selector("llava")`` -> an untrained selector checkpoint, with a question-reading
    section, that fits that tiny model (serving tests need a loadable selector, not a good one)."""
    built = {}

    def get(arch: str):
        if arch not in built:
            import torch
            from transformers import AutoConfig

            from vllm_tokenprune.selection.selector import (
                SelectorConfig,
                TokenSelector,
                query_section,
                vision_signature,
            )
            from vllm_tokenprune.training.reconstruction import save_selector

            model = tiny_checkpoint(arch)
            config = AutoConfig.from_pretrained(model)
            signature = vision_signature(config)
            torch.manual_seed(0)
            selector = TokenSelector(SelectorConfig(feature_dim=signature["feature_dim"]))
            reader = TokenSelector(SelectorConfig(feature_dim=signature["feature_dim"],
                                                  query_dim=config.get_text_config().hidden_size))
            path = tmp_path_factory.mktemp(f"selector-{arch}") / "selector.safetensors"
            save_selector(path, selector, query=query_section(reader, {}), metadata={
                "source_model": str(model), "feature_layer": signature["vision_feature_layer"],
                "vision_signature": signature})
            built[arch] = path
        return built[arch]

    return get


# Image sizes of the budget selectors' training folders: LLaVA squares them; Qwen keeps each
# size (dynamic resolution), so its predictor sees several token counts.
BUDGET_SIZES = {"llava": [(168, 168)], "qwen2.5-vl": [(224, 168), (168, 224), (112, 112)]}


@pytest.fixture(scope="session")
def budget_selector(tiny_checkpoint, tmp_path_factory):
    """``budget_selector("llava")`` -> a selector checkpoint with a budget predictor, both
    trained (`train_on_folder`) on images from nearly blank to dense for that tiny model."""
    built = {}

    def get(arch: str):
        if arch not in built:
            from density import write_density_folder

            from vllm_tokenprune.training.train import TrainConfig, train_on_folder

            root = tmp_path_factory.mktemp(f"budget-{arch}")
            sizes = BUDGET_SIZES[arch]
            for i, size in enumerate(sizes):
                write_density_folder(root / "images" / f"size{i}", 96 // len(sizes), size, seed=i)
            out = root / "selector.safetensors"
            config = TrainConfig(steps=100, eval_every=0, budget_steps=300, threads=1, cache_dir=str(root / "cache"))
            assert train_on_folder(str(tiny_checkpoint(arch)), root / "images", out, config, progress=False) == 0
            built[arch] = out
        return built[arch]

    return get
