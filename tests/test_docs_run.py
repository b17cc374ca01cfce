"""The docs' commands, run against `make serve`'s server: the README's quick start (its curl
and its Python example) and every recipe in docs/clients.md, compared with what the page
says they print, so that the docs cannot drift from the demo they ship with."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from server import Server

pytestmark = pytest.mark.server

ROOT = Path(__file__).parents[1]
BLOCK = r"^```(\w*)\n(.*?)^```$"


def blocks(text: str) -> list[re.Match]:
    """The fenced code blocks of a page, in order: (language, code) as groups 1 and 2."""
    return list(re.finditer(BLOCK, text, flags=re.S | re.M))


def recipes(text: str) -> list[tuple[str, str, str]]:
    """(language, code, what it prints) for each code block the page follows with
    "prints" and a block of its output."""
    found = blocks(text)
    return [(code[1], code[2], output[2]) for code, output in zip(found, found[1:])
            if text[code.end():output.start()] == "\n\nprints\n\n" and not output[1]]


def localised(code: str, server: Server, scene: Path) -> str:
    """A command as the docs print it, pointed at the test's server, venv and scene folder."""
    return (code.replace("http://localhost:8000", server.root).replace("localhost:8000", server.root)
            .replace(".venv/bin/", str(Path(sys.executable).parent) + "/").replace("/tmp/scene", str(scene)))


def run(lang: str, code: str, server: Server, scene: Path) -> str:
    command = [sys.executable, "-c"] if lang == "python" else ["bash", "-c"]
    out = subprocess.run([*command, localised(code, server, scene)], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(None, log_path=tmp_path_factory.mktemp("docs") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The README's scene, written by the README's own command."""
    folder = tmp_path_factory.mktemp("scene")
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "make-eval-set" in line and "/tmp/scene" in line)
    subprocess.run(["bash", "-c", command.replace(".venv/bin/", str(Path(sys.executable).parent) + "/")
                    .replace("/tmp/scene", str(folder))], check=True, cwd=ROOT, timeout=120)
    return folder


def test_the_readme_quick_start_prints_what_the_readme_says(server, scene):
    readme = (ROOT / "README.md").read_text()
    curl, end = next((m[2], m.end()) for m in blocks(readme) if m[1] == "bash" and "curl" in m[2])
    prose = readme[end:]
    said = {"content": re.search(r'answers `"content": "([^"]*)"`', prose)[1],
            "prompt_tokens": int(re.search(r'`"prompt_tokens": (\d+)`', prose)[1]),
            "image": int(re.search(r'`"multimodal_tokens": \{"image": (\d+)\}`', prose)[1])}
    printed = run("bash", curl.replace("/tmp/scene", str(scene)), server, scene)
    answer = json.loads(printed[printed.index("{"):])  # after make-eval-set's line
    usage = answer["usage"]
    assert {"content": answer["choices"][0]["message"]["content"], "prompt_tokens": usage["prompt_tokens"],
            "image": usage["prompt_tokens_details"]["multimodal_tokens"]["image"]} == said
    examples = recipes(readme)
    assert [lang for lang, _, _ in examples] == ["python"]
    for lang, code, prints in examples:
        assert run(lang, code, server, scene) == prints


def test_every_client_recipe_prints_what_docs_clients_says(server, scene):
    found = recipes((ROOT / "docs" / "clients.md").read_text())
    assert len(found) == 3  # the openai SDK, LiteLLM, vllm bench serve
    for lang, code, prints in found:
        assert run(lang, code, server, scene) == prints, code[:200]
