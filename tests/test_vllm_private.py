"""The private vLLM names the project relies on (``serving/vllm_private.py``) are all in the
installed vLLM, and the package uses no private vLLM name that list lacks."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import vllm_tokenprune
from vllm_tokenprune.serving.vllm_private import PRIVATE

pytestmark = pytest.mark.vllm
PACKAGE = Path(vllm_tokenprune.__file__).parent


@pytest.mark.parametrize("module,name,kind,user", PRIVATE, ids=lambda v: v if isinstance(v, str) else None)
def test_every_listed_private_name_is_in_the_installed_vllm(module, name, kind, user):
    found = importlib.import_module(module)
    for part in name.split("."):
        assert hasattr(found, part), f"vLLM moved {module}.{name}, which {user} relies on ({kind})"
        found = getattr(found, part)
    assert (PACKAGE / user).is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_the_package_uses_no_private_vllm_name_the_list_lacks():
    """Private names imported from vLLM, and private attributes the package reads that it
    does not define itself (a stock model's method, a vLLM hook it overrides), are listed."""
    listed = {name.rsplit(".", 1)[-1] for _, name, _, _ in PRIVATE}
    ours, used = set(), {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                ours.add(node.name)
            elif isinstance(node, (ast.Name, ast.arg)):
                ours.add(getattr(node, "id", None) or node.arg)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                ours.add(node.attr)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm."):
                for alias in node.names:
                    if _private(alias.name):
                        used.setdefault(alias.name, path.relative_to(PACKAGE))
    for path in (PACKAGE / "serving").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                used.setdefault(node.attr, path.relative_to(PACKAGE))
    overrides = set()
    for path in (PACKAGE / "serving" / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                overrides |= {f.name for f in node.body if isinstance(f, ast.FunctionDef) and _private(f.name)}
    hooks = {name.rsplit(".", 1)[-1] for _, name, kind, _ in PRIVATE if kind == "override"}
    unlisted = {name: where for name, where in used.items()
                if name not in listed and (name not in ours or name in hooks)}
    assert not unlisted, f"private vLLM names used but not in serving/vllm_private.py: {unlisted}"
    assert hooks <= overrides
