"""``vllm-tokenprune bench``'s results: the markdown tables and the TTFT / throughput plot,
from ``results.json`` (``--render`` rebuilds them from a saved one)."""

from __future__ import annotations

from pathlib import Path

from vllm_tokenprune.tools.provenance import checkpoint_name


def markdown(report: dict) -> str:
    lines = [f"# Benchmark: {checkpoint_name(report['environment']['model']['path'])}", "",
             f"`{report['command']}` at commit "
             f"`{report['commit']}`, {report['environment']['machine']['cpus']} "
             f"CPUs, {report['environment']['machine']['processor'] or 'unknown CPU'}.", ""]
    pf = report["prefill"]
    lines += ["## Prefill line (text only, 1 output token)", "",
              f"latency = {pf['fixed_s'] * 1e3:.1f} ms + {pf['per_token_s'] * 1e3:.3f} ms x "
              f"prompt tokens (medians of {pf['rounds']} interleaved rounds)", ""]
    if report.get("parts"):
        pa = report["parts"]
        lines += ["## Vision tower and selector, per image", "",
                  f"tower forward ({pa['tower_dtype']}, {pa['tokens']} tokens of {pa['feature_dim']}) "
                  f"{pa['tower_s'] * 1e3:.1f} ms; selector (float32) {pa['selector_s'] * 1e3:.2f} ms = "
                  f"**{100 * pa['selector_of_tower']:.2f}% of the tower** (medians of {pa['rounds']} "
                  f"interleaved rounds{'' if pa['trained_selector'] else ', untrained selector'})", ""]
    pr = report["paired"]
    lines += [f"## One client, interleaved ({pr['rounds']} rounds, {pr['images']})", "",
              "| method | keep | prompt tokens | median ms | p90 ms | speedup (paired median) | ideal | "
              "of ideal |", "|---|---|---|---|---|---|---|---|"]
    for c in pr["cells"]:
        lines.append(f"| {c['method'] or '-'} | {c['keep_ratio']} | {c['prompt_tokens']:g} | "
                     f"{c['median_s'] * 1e3:.1f} | {c['p90_s'] * 1e3:.1f} | {c['speedup_median_paired']:.2f}x | "
                     f"{c['ideal_speedup']:.2f}x | {c['fraction_of_ideal']:.2f} |")
    if report.get("sweep"):
        lines += ["", "## Sweep (`vllm bench serve`, random-mm images)", "",
                  "| conc | method | keep | prompt tok | TTFT mean / p50 / p99 ms | TPOT p50 ms | "
                  "E2E p50 ms | req/s | TTFT speedup | of ideal | throughput x |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in report["sweep"]:
            lines.append(
                f"| {c['concurrency']} | {c['method']} | {c['keep_ratio']} | "
                f"{c['prompt_tokens_per_request']:.0f} | {c['mean_ttft_ms']:.0f} / "
                f"{c['median_ttft_ms']:.0f} / {c['p99_ttft_ms']:.0f} | {c['median_tpot_ms']:.1f} | "
                f"{c['median_e2el_ms']:.0f} | {c['request_throughput']:.2f} | "
                f"{c['ttft_speedup']:.2f}x | {c['ttft_fraction_of_ideal']:.2f} | "
                f"{c['throughput_ratio']:.2f}x |")
    if report.get("soak"):
        s = report["soak"]
        lines += ["", "## Soak", "",
                  f"{s['seconds']:.0f} s at concurrency {s['concurrency']}: {s['good']} good "
                  f"requests, **{s['good_failed']} failed**; {s['bad']} bad requests, "
                  f"{s['bad_rejected']} rejected with 400, {s['bad_other']} not."]
        if s.get("rss_start_bytes"):
            lines.append(f"Server memory (all processes): {s['rss_start_bytes'] / 2**30:.2f} GiB "
                         f"at start, {s['rss_end_bytes'] / 2**30:.2f} GiB at end.")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """One client's median TTFT against prompt tokens per method (every budget, ``auto``
    included), and with a sweep its TTFT and throughput against the keep ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = report.get("sweep") or []
    fig, axes = plt.subplots(1, 3 if sweep else 1, figsize=(16, 4.4) if sweep else (6, 4.4), squeeze=False)
    plot_paired(axes[0][0], report["paired"])
    if sweep:
        plot_sweep(axes[0][1], axes[0][2], sweep)
    fig.suptitle(checkpoint_name(report["environment"]["model"]["path"]))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_paired(ax, paired: dict) -> None:
    full, *pruned = paired["cells"]
    for i, method in enumerate(dict.fromkeys(c["method"] for c in pruned)):
        cells = [c for c in pruned if c["method"] == method]
        numbers = sorted((c for c in cells if not isinstance(c["keep_ratio"], str)),
                         key=lambda c: -c["keep_ratio"])
        line = [full, *numbers]
        ax.plot([c["prompt_tokens"] for c in line], [c["median_s"] * 1e3 for c in line], "o-",
                color=f"C{i}", label=method)
        for c in cells:
            ax.annotate(str(c["keep_ratio"]), (c["prompt_tokens"], c["median_s"] * 1e3), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
            if isinstance(c["keep_ratio"], str):
                ax.plot(c["prompt_tokens"], c["median_s"] * 1e3, "*", color=f"C{i}", markersize=11)
    ax.annotate("1.0", (full["prompt_tokens"], full["median_s"] * 1e3), fontsize=7,
                textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="prompt tokens (median)", ylabel="median TTFT (ms)",
           title=f"One client, {paired['rounds']} interleaved rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_sweep(ax_t, ax_q, sweep: list[dict]) -> None:
    methods = sorted({c["method"] for c in sweep})
    styles = dict(zip(methods, ["-", "--", ":", "-."]))
    colors = {conc: f"C{i}" for i, conc in enumerate(sorted({c["concurrency"] for c in sweep}))}
    for conc, color in colors.items():
        for method in methods:
            cells = sorted((c for c in sweep if c["concurrency"] == conc and c["method"] == method),
                           key=lambda c: c["keep_ratio"])
            ratios = [c["keep_ratio"] for c in cells]
            kw = dict(marker="o", color=color, label=f"c={conc} {method}")
            ax_t.plot(ratios, [c["median_ttft_ms"] for c in cells], styles[method], **kw)
            ax_q.plot(ratios, [c["request_throughput"] for c in cells], styles[method], **kw)
    ax_t.set(xlabel="keep ratio", ylabel="median TTFT (ms)", yscale="log",
             title="Time to first token (vllm bench serve)")
    ax_q.set(xlabel="keep ratio", ylabel="requests / s", title="Throughput")
    for ax in (ax_t, ax_q):
        ax.grid(alpha=0.3)
    ax_q.legend(fontsize=7, ncol=2)
