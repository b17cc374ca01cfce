"""The training log next to the output checkpoint: one JSON row per evaluation
(``OUT.log.jsonl``, appended as training goes, so a long run can be watched with
``tail -f``) and a plot of its curves at the end (``OUT.curves.png``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    """Start the log with ``rows`` (those a resumed run already has; later ones are dropped)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def append_log(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def plot_curves(rows: list[dict[str, Any]], path: Path, keep_ratio: float) -> None:
    """Training loss and reconstruction error (left) and held-out reconstruction error of the
    dropped tokens, learned vs random selection at ``keep_ratio`` (right), against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "loss"), ("rec", "dropped-token MSE (selector's masks)"),
                       ("rand_rec", "dropped-token MSE (random masks)")):
        if rows and key in rows[0]:
            left.plot(steps, [row[key] for row in rows], label=label)
    left.set(title="training (means since the previous row)", xlabel="step")
    left.legend()
    held = [row for row in rows if "eval_learned" in row]
    for key, label in (("eval_learned", "learned top-K"), ("eval_random", "random K")):
        right.plot([row["step"] for row in held], [row[key] for row in held], marker="o", label=label)
    right.set(title=f"held-out dropped-token MSE at keep {keep_ratio}", xlabel="step")
    if held:
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
