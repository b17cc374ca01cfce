"""The training state behind ``train --resume``: everything the loop needs to go on exactly
as if it had never stopped.

Saved every ``save_every`` steps next to the output (``OUT.state.pt``): step, selector and
reconstructor weights, optimizer state, the loop's mask generator, torch's CPU and CUDA
random states (the Gumbel noise), the history and the running means since the last logged
row. The data order needs nothing saved: it is a function of the seed and the step
(``stream.batches``). The file is read with ``torch.load(weights_only=True)``, which
builds tensors and plain containers only, never objects from code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class ResumeError(ValueError):
    """The saved state belongs to another run (other settings or other images)."""


def save_state(path: Path, *, step: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
               generator: torch.Generator, fingerprint: dict[str, Any], **progress: Any) -> None:
    """Write the state after ``step`` steps; ``progress`` holds the loop's own values (history, ...)."""
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "modules": {name: module.state_dict() for name, module in modules.items()},
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "progress": progress,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous state


def restore_state(path: Path, *, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                  generator: torch.Generator, fingerprint: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Load the state into the run's objects and random generators; returns (step, progress)."""
    state = torch.load(path, weights_only=True)
    differ = sorted(k for k in fingerprint.keys() | state["fingerprint"].keys()
                    if fingerprint.get(k) != state["fingerprint"].get(k))
    if differ:
        raise ResumeError(f"{path} is the state of another run; it differs in "
                          + ", ".join(f"{k} ({state['fingerprint'].get(k)!r} there, {fingerprint.get(k)!r} now)"
                                      for k in differ))
    for name, module in modules.items():
        module.load_state_dict(state["modules"][name])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["progress"]
