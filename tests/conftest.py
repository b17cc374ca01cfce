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
    """``random_selector("llava")`` -> an untrained selector checkpoint that fits that tiny
    model (serving tests need a loadable selector, not a good one)."""
    built = {}

    def get(arch: str):
        if arch not in built:
            import torch
            from transformers import AutoConfig

            from vllm_tokenprune.selection.selector import SelectorConfig, TokenSelector, vision_signature
            from vllm_tokenprune.training.reconstruction import save_selector

            model = tiny_checkpoint(arch)
            signature = vision_signature(AutoConfig.from_pretrained(model))
            torch.manual_seed(0)
            selector = TokenSelector(SelectorConfig(feature_dim=signature["feature_dim"]))
            path = tmp_path_factory.mktemp(f"selector-{arch}") / "selector.safetensors"
            save_selector(path, selector, metadata={
                "source_model": str(model), "feature_layer": signature["vision_feature_layer"],
                "vision_signature": signature})
            built[arch] = path
        return built[arch]

    return get
