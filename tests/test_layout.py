"""The package's layout holds: what imports what (vllm_tokenprune/__init__.py explains it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vllm_tokenprune

PACKAGE = Path(vllm_tokenprune.__file__).parent
# Modules the vLLM-free parts of the project use: importing them must not import vLLM.
VLLM_FREE = ["vllm_tokenprune", "vllm_tokenprune.cli", "vllm_tokenprune.serving.plugin",
             "vllm_tokenprune.policy", "vllm_tokenprune.serving.http", "vllm_tokenprune.serving.metrics",
             "vllm_tokenprune.families", "vllm_tokenprune.selection.methods",
             "vllm_tokenprune.selection.selector", "vllm_tokenprune.selection.budget", "vllm_tokenprune.training.train",
             "vllm_tokenprune.training.features", "vllm_tokenprune.testbed.synthetic", "vllm_tokenprune.tools.serve"]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that ``name`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
    return {m for m in found if m in known and m != name}


def test_no_import_cycles():
    known = modules()
    graph = {name: imports(name, path, set(known)) for name, path in known.items()}
    # A package's __init__ may import its own modules (the methods registry does).
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(name, trail):
        if state.get(name) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(name):], name]))
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in sorted(graph[name]):
            visit(dep, [*trail, name])
        state[name] = 2

    for name in sorted(graph):
        visit(name, [])


def test_shared_core_serving_and_selection_never_import_training_testbed_or_tools():
    known = modules()
    inside = [m for m in known if m.startswith(("vllm_tokenprune.serving", "vllm_tokenprune.selection",
                                                "vllm_tokenprune.policy", "vllm_tokenprune.families"))
              and not m.endswith("runner_v2")]  # V2 internals import only with a GPU runner's Triton
    code = (f"import sys; [__import__(m) for m in {inside!r}]; "
            "bad = sorted(m for m in sys.modules if m.startswith(('vllm_tokenprune.training', "
            "'vllm_tokenprune.testbed', 'vllm_tokenprune.tools'))); print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_the_vllm_free_parts_never_import_vllm():
    code = f"import sys; [__import__(m) for m in {VLLM_FREE!r}]; sys.exit('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_architecture_doc_names_every_module_and_only_real_files():
    """docs/architecture.md's module map: every module of the package is named (a file of a
    group may be named alone, after its directory's first path), and every path it names exists."""
    import re

    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    named, folder = set(), None
    for path in re.findall(r"`([\w/]+\.py)`", doc):
        if "/" in path:
            folder = path.rsplit("/", 1)[0]
            named.add(path)
        elif folder is not None and not (PACKAGE / path).exists():
            named.add(f"{folder}/{path}")  # a sibling named after its directory's first path
        else:
            named.add(path)
    package = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if p.name != "__init__.py" or p.parent.name == "methods"}
    assert not package - named, f"modules missing from docs/architecture.md: {sorted(package - named)}"
    assert all((PACKAGE / n).exists() or (PACKAGE.parent / n).exists() for n in named), [
        n for n in named if not (PACKAGE / n).exists() and not (PACKAGE.parent / n).exists()]
