"""Training configs as dataclasses whose fields are also command-line options.

A field made with ``opt(default, help)`` becomes ``--field-name``; ``from_args`` builds
the dataclass back from the parsed namespace. Shared by ``train`` and ``train-demo``, with
the learning-rate schedule both use.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import field, fields

_ARG_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float}


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


def add_options(parser: argparse.ArgumentParser, config_cls) -> None:
    for f in fields(config_cls):
        parser.add_argument(
            "--" + f.name.replace("_", "-"), type=_ARG_TYPES[f.type], default=f.default,
            help=(f.metadata["help"] + ("" if f.default is None else f" (default: {f.default})")).replace("%", "%%"),
        )


def from_args(config_cls, args: argparse.Namespace):
    return config_cls(**{f.name: getattr(args, f.name) for f in fields(config_cls)})


def warmup_cosine(step: int, steps: int, peak: float, warmup: int) -> float:
    """Learning rate at ``step``: linear warmup to ``peak``, then cosine decay to peak / 10."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
