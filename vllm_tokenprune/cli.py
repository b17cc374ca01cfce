"""The ``vllm-tokenprune`` command: ``SUBCOMMANDS`` (serve, train, train-query, bench,
make-tiny, vllm, train-demo, make-eval-set, eval).

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so
``vllm-tokenprune --help`` stays fast and never imports vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vllm_tokenprune.tools.client import ServerUnreachableError
from vllm_tokenprune.tools.launcher import LaunchError

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "serve": ("vllm_tokenprune.tools.serve", "serve a VLM with per-request visual-token pruning"),
    "train": ("vllm_tokenprune.training.train", "train a token selector on a model's vision features"),
    "train-query": ("vllm_tokenprune.training.query", "train the selector that reads the question (learned_query)"),
    "bench": ("vllm_tokenprune.tools.bench", "load-test a pruning server: latency, throughput, limit"),
    "make-tiny": ("vllm_tokenprune.testbed.tiny", "write a small random-weight VLM checkpoint"),
    "vllm": ("vllm_tokenprune.tools.vllm_passthrough", "run vLLM's own CLI (e.g. `vllm bench serve`)"),
    "train-demo": ("vllm_tokenprune.testbed.demo_model", "train the demo VLM and its selector from scratch"),
    "make-eval-set": ("vllm_tokenprune.testbed.tasks", "write synthetic question-answer items for eval"),
    "eval": ("vllm_tokenprune.tools.eval", "answer accuracy per keep ratio x method against a server"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vllm-tokenprune", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        # `vllm` hands everything, --help included, to vLLM's own parser.
        sub = subparsers.add_parser(name, help=help_text, description=help_text,
                                    add_help=name != "vllm")
        sub.set_defaults(_module=module)
        # Only the chosen subcommand's module is imported (its arguments may need it).
        if argv[:1] == [name]:
            importlib.import_module(module).add_arguments(sub)
    args, extra = parser.parse_known_args(argv)
    module = importlib.import_module(args._module)
    if extra and not getattr(module, "ACCEPTS_EXTRA_ARGS", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    args.argv = argv  # as given, for the command results record (provenance.stamp)
    try:
        return module.run(args) or 0
    except (ServerUnreachableError, LaunchError) as err:  # bench or eval pointed at nothing, or unservable
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM while a started server runs (launcher.sigterm_interrupts)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
