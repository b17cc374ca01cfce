"""``vllm-tokenprune eval``'s report: ``results.md`` (a table per data file, accuracy by
question kind and content density, ``auto`` against fixed ratios) and ``accuracy.png``,
from the ``results.json`` that ``tools/eval.py`` writes."""

from __future__ import annotations

from pathlib import Path

from vllm_tokenprune.tools.provenance import checkpoint_name

# What a user would do instead of pruning: as many tokens, by pooling neighbours.
POOLING_METHOD = "pool"


def _cell(result: dict, method: str, ratio: float) -> dict | None:
    return next((c for c in result["cells"] if c["method"] == method and c["keep_ratio"] == ratio), None)


def markdown(report: dict) -> str:
    ratios = report["ratios"]
    lines = [f"# Accuracy vs kept visual tokens: {checkpoint_name(report['model'])}", "",
             f"`{report['command']}` at commit `{report['commit']}`; {report['match']['mode']} match "
             "after normalization; greedy answers through the server's OpenAI API.", ""]
    for name, result in report["datasets"].items():
        methods = [m for m in report["methods"] if m not in result["refused"]]
        tokens = {r: _cell(result, methods[0], r)["mean_prompt_tokens"] for r in ratios} if methods else {}
        lines += [f"## {name} ({result['n']} items)", "",
                  "| method | " + " | ".join(f"keep {r}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for m in methods:
            row = []
            for r in ratios:
                c = _cell(result, m, r)
                row.append("-" if c is None else f"{100 * c['accuracy']:.1f}")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        if tokens and all(v is not None for v in tokens.values()):
            lines.append("| *prompt tokens* | " + " | ".join(f"{tokens[r]:.0f}" for r in ratios) + " |")
        images = {r: _cell(result, methods[0], r).get("mean_image_tokens") for r in ratios} if methods else {}
        if images and all(v is not None for v in images.values()):
            lines.append("| *image tokens* | " + " | ".join(f"{images[r]:.1f}" for r in ratios) + " |")
        lines.append("")
        lines += _density_table(result, methods, ratios)
        lines += _summary(result, ratios)
        for method, error in result["refused"].items():
            lines.append(f"- `{method}`: refused by the server ({error[:120]})")
        errors = sum(c["errors"] for c in result["cells"])
        if errors:
            lines.append(f"- {errors} failed requests counted as wrong")
        lines.append("")
    if POOLING_METHOD not in report["methods"]:
        lines.append(f"No `{POOLING_METHOD}` method on this server (its methods: "
                     f"{', '.join(report['methods'])}), so the pooling baseline is missing.")
    return "\n".join(lines).rstrip() + "\n"


DENSITY_RATIOS = (0.25, 0.1)  # the keep ratios whose accuracy is shown by content density


def _density_table(result: dict, methods: list[str], ratios: list[float]) -> list[str]:
    counts = result.get("density_counts")
    lines = []
    for r in (r for r in (*DENSITY_RATIOS, *(r for r in ratios if isinstance(r, str))) if r in ratios and counts):
        lines += [f"Accuracy at keep {r} by content tokens per image (items per bucket):", "",
                  "| method | " + " | ".join(f"{b} ({n})" for b, n in counts.items()) + " |",
                  "|---|" + "---|" * len(counts)]
        for m in methods:
            by = (_cell(result, m, r) or {}).get("by_density", {})
            lines.append(f"| {m} | " + " | ".join(f"{100 * by[b]:.1f}" if b in by else "-" for b in counts) + " |")
        lines.append("")
    return lines


def _summary(result: dict, ratios: list[float]) -> list[str]:
    """The comparisons the quality targets are about, where the cells exist."""
    full = next((c for c in result["cells"] if c["keep_ratio"] == 1.0), None)
    lines = []
    if full is None:
        return lines
    for r in ratios:
        learned = _cell(result, "learned", r)
        if r == 1.0 or isinstance(r, str) or learned is None:
            continue
        kept = 100 * learned["accuracy"] / max(full["accuracy"], 1e-9)
        parts = [f"learned keeps {kept:.1f}% of the keep-1.0 accuracy"]
        for other in ("random", "norm"):
            c = _cell(result, other, r)
            if c is not None:
                parts.append(f"{100 * (learned['accuracy'] - c['accuracy']):+.1f} points vs {other}")
        lines.append(f"- keep {r}: " + ", ".join(parts))
    for r in (r for r in ratios if isinstance(r, str)):
        lines += [_budget_line(result, m, r, full) for m in _methods_of(result) if _cell(result, m, r)]
    return lines + ([""] if lines else [])


def _methods_of(result: dict) -> list[str]:
    return list(dict.fromkeys(c["method"] for c in result["cells"]))


def kept_fraction(result: dict, cell: dict) -> float | None:
    """The cell's mean image tokens over keep 1.0's (its keep ratio where not reported)."""
    full = next((c for c in result["cells"] if c["keep_ratio"] == 1.0), None)
    mine, whole = cell.get("mean_image_tokens"), (full or {}).get("mean_image_tokens")
    if mine is not None and whole:
        return mine / whole
    return cell["keep_ratio"] if isinstance(cell["keep_ratio"], float) else None


def smallest_as_accurate(result: dict, method: str, accuracy: float) -> dict | None:
    """The fixed-ratio cell of ``method`` (keep 1.0 included) with the fewest image tokens
    whose accuracy is at least ``accuracy``, or None."""
    cells = [c for c in result["cells"] if isinstance(c["keep_ratio"], float)
             and c["method"] == method and c["accuracy"] >= accuracy and kept_fraction(result, c) is not None]
    return min(cells, key=lambda c: kept_fraction(result, c), default=None)


def _budget_line(result: dict, method: str, budget: str, full: dict) -> str:
    """A budget cell against the fixed ratios: accuracy kept, tokens, and the smallest fixed
    ratio of the method that is as accurate."""
    cell = _cell(result, method, budget)
    fraction = kept_fraction(result, cell)
    text = (f"- {budget} ({method}): {100 * cell['accuracy']:.1f}% right, "
            f"{100 * cell['accuracy'] / max(full['accuracy'], 1e-9):.1f}% of the keep-1.0 accuracy")
    if fraction is None:
        return text + " (the server reported no image tokens)"
    text += f", {100 * fraction:.1f}% of the image tokens"
    rival = smallest_as_accurate(result, method, cell["accuracy"])
    if rival is None:
        return text + "; no fixed ratio is as accurate"
    return (text + f"; the smallest fixed ratio as accurate, keep {rival['keep_ratio']}, keeps "
            f"{100 * kept_fraction(result, rival):.1f}%: {budget} needs "
            f"{100 * fraction / kept_fraction(result, rival):.0f}% of its tokens")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["datasets"])
    # one style per method in every panel (past matplotlib's ten, colours it does not cycle
    # to); the learned methods drawn bold, on top
    palette = [f"C{i}" for i in range(10)] + ["black", "darkgoldenrod", "navy"]
    style = {m: {"color": palette[i % len(palette)], "lw": 2.5 if m.startswith("learned") else 1.5,
                 "zorder": 3 if m.startswith("learned") else 2} for i, m in enumerate(report["methods"])}
    density = min((r for r in DENSITY_RATIOS if r in report["ratios"]), default=None)
    rows = 2 if density and any("density_counts" in d for d in report["datasets"].values()) else 1
    fig, axes = plt.subplots(rows, len(names), figsize=(5.2 * len(names), 4.2 * rows), squeeze=False)
    for ax, name in zip(axes[0], names):
        result = report["datasets"][name]
        for m in (m for m in report["methods"] if m not in result["refused"]):
            cells = [c for c in result["cells"] if c["method"] == m and kept_fraction(result, c) is not None]
            fixed = sorted((c for c in cells if isinstance(c["keep_ratio"], float)), key=lambda c: c["keep_ratio"])
            ax.plot([kept_fraction(result, c) for c in fixed], [100 * c["accuracy"] for c in fixed],
                    marker="o", label=m, **style[m])
            for c in (c for c in cells if isinstance(c["keep_ratio"], str)):
                ax.scatter([kept_fraction(result, c)], [100 * c["accuracy"]], marker="*", s=160,
                           color=style[m]["color"], edgecolor="black", zorder=4)
        ax.set(xscale="log", xlabel="kept fraction of image tokens (stars: auto, at its mean)",
               ylabel="accuracy (%)", title=f"{name} ({result['n']} items)", ylim=(0, 102))
        fixed_ratios = [r for r in report["ratios"] if isinstance(r, float)]
        ax.set_xticks(fixed_ratios, [str(r) for r in fixed_ratios])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    for ax, name in zip(axes[1] if rows == 2 else [], names):
        result = report["datasets"][name]
        buckets = list(result.get("density_counts", {}))
        if not buckets:  # e.g. the pooled sets
            ax.axis("off")
            continue
        for m in (m for m in report["methods"] if m not in result["refused"]):
            by = (_cell(result, m, density) or {}).get("by_density", {})
            ax.plot(range(len(buckets)), [100 * by.get(b, float("nan")) for b in buckets], marker="o",
                    **style[m])
        ax.set(xlabel="content tokens per image", ylabel="accuracy (%)", ylim=(0, 102),
               title=f"{name}: keep {density} by content density")
        ax.set_xticks(range(len(buckets)), buckets)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8, frameon=False)
    fig.suptitle(checkpoint_name(report["model"]))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    (out / "results.md").write_text(markdown(report))
    plot(report, out / "accuracy.png")
    print(markdown(report))
    print(f"results in {out}")
