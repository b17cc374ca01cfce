"""The README's measured figures, rendered from the results files that back them.

    python benchmarks/readme_figures.py          # rewrite README.md's figures block
    python benchmarks/readme_figures.py --check  # exit 1 if the block differs from the results

The block lies between ``<!-- figures:begin -->`` and ``<!-- figures:end -->``; each figure in
it links to the results.json it comes from and names the commit that file records.
tests/test_results.py checks that the README's block is what this renders now, so a rerun
that changes a results file must rerun this too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
QUALITY = "benchmarks/results/quality/results.json"
SPEED = "benchmarks/results/cpu-bench-llava/results.json"
DEMO_SPEED = "benchmarks/results/demo-ttft/results.json"
STOCK = "benchmarks/results/against-stock/results.json"
AUTO_COST = "benchmarks/results/budget-cost/results.json"
ALL_SETS = "all sets"  # tools/eval.py's pooled set (imported from there, it would need the package)


def load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def source(path: str) -> str:
    """A link to ``path`` with the commit it records."""
    return f"[{Path(path).parent.name}]({path}), commit `{load(path)['commit']}`"


def number(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def quality() -> list[str]:
    report = load(QUALITY)
    pooled = report["datasets"][ALL_SETS]
    cells = {(c["method"], c["keep_ratio"]): c for c in pooled["cells"]}
    ratios, names = report["ratios"], report["methods"]
    accuracy = {m: [100 * cells[m, r]["accuracy"] for r in ratios] for m in names}
    # the learned methods first, as the results list them, then the rest by mean accuracy
    learned = [m for m in names if m.startswith("learned")]
    names = learned + sorted((m for m in names if m not in learned), key=lambda m: -statistics.fmean(accuracy[m]))
    best = [max(accuracy[m][i] for m in names) for i in range(len(ratios))]

    def cell(m: str, i: int) -> str:
        text = f"{accuracy[m][i]:.1f}"
        everyone = all(f"{accuracy[n][i]:.1f}" == text for n in names)
        return f"**{text}**" if f"{best[i]:.1f}" == text and not everyone else text

    sets = [s for s in report["datasets"] if s != ALL_SETS]
    lines = [f"**Accuracy** (%) of the demo model through the real server, {len(sets)} test sets together "
             f"({', '.join(f'`{s}`' for s in sets)}: {pooled['n']:,} held-out questions), every method at the same "
             f"token count ({source(QUALITY)}):", "",
             "| method | " + " | ".join(f"keep {r}" for r in ratios) + " |", "| --- |" + " --- |" * len(ratios)]
    lines += [f"| `{m}` | " + " | ".join(cell(m, i) for i in range(len(ratios))) + " |" for m in names]
    lines.append("| *image tokens per image* | "
                 + " | ".join(number(round(cells[names[0], r]["mean_image_tokens"], 1)) for r in ratios) + " |")
    return lines


def speed() -> list[str]:
    report = load(SPEED)
    paired, parts = report["paired"], report["parts"]
    method = paired["cells"][-1]["method"]
    top = sorted({c["concurrency"] for c in report["sweep"]})[-2:]
    sweep = {(c["concurrency"], c["keep_ratio"]): c for c in report["sweep"] if c["method"] == method}
    lines = [f"**Speed**: a prefill-bound LLaVA (`make bench`, {parts['tokens']} image tokens, "
             f"{report['environment']['machine']['cpus']} CPUs), the `{method}` selector, in one run "
             f"({source(SPEED)}):", "",
             f"| keep | prompt tokens | TTFT, 1 client ({paired['rounds']} paired rounds) | of ideal | "
             f"requests/s at {' / '.join(map(str, top))} concurrent |", "| --- | --- | --- | --- | --- |"]
    for c in paired["cells"]:
        r = c["keep_ratio"]
        ttft = f"{c['median_s'] * 1e3:.0f} ms" + ("" if r == 1.0 else f" ({c['speedup_median_paired']:.2f}x)")
        ideal = "-" if r == 1.0 else f"{c['fraction_of_ideal']:.2f}"
        rates = " / ".join(f"{sweep[n, r]['throughput_ratio']:.2f}x" for n in top)
        lines.append(f"| {r} | {c['prompt_tokens']} | {ttft} | {ideal} | {rates} |")
    full = next(c for c in paired["cells"] if c["keep_ratio"] == 1.0)
    soak = report.get("soak")
    lines += ["", f"Vision tower {parts['tower_s'] * 1e3:.1f} ms and selector {parts['selector_s'] * 1e3:.1f} ms "
                  f"per image ({100 * parts['selector_s'] / full['median_s']:.2f}% of keep 1.0's TTFT)."
              + (f" A {soak['seconds']:.0f} s soak at concurrency {soak['concurrency']} with mixed ratios, "
                 f"methods and bad requests: {soak['good_failed']} of {soak['good']} good requests failed, "
                 f"{soak['bad_rejected']} of {soak['bad']} bad ones got a 400; server memory "
                 f"{soak['rss_start_bytes'] / 2**30:.2f} GiB at start, {soak['rss_end_bytes'] / 2**30:.2f} GiB "
                 "at end." if soak else "")]
    return lines


def demo_speed() -> list[str]:
    report = load(DEMO_SPEED)
    paired, parts = report["paired"], report["parts"]
    full, *pruned = paired["cells"]
    methods = list(dict.fromkeys(c["method"] for c in pruned))
    budgets = list(dict.fromkeys(c["keep_ratio"] for c in pruned))
    cells = {(c["method"], c["keep_ratio"]): c for c in pruned}

    def cell(c: dict) -> str:
        return f"{c['median_s'] * 1e3:.1f} ms ({c['prompt_tokens']:g})"

    heads = [f"`{b}`" if isinstance(b, str) else f"keep {b}" for b in budgets]
    lines = [f"**Speed on the demo** (`make bench-demo`: what `make serve` gives one client, {paired['rounds']} "
             f"interleaved rounds, a fresh held-out `{paired['images']}` scene each; {source(DEMO_SPEED)}). "
             "Median TTFT (prompt tokens):", "",
             "| method | keep 1.0 | " + " | ".join(heads) + " |",
             "| --- |" + " --- |" * (len(budgets) + 1)]
    lines += [f"| `{m}` | {cell(full)} | " + " | ".join(cell(cells[m, b]) for b in budgets) + " |" for m in methods]
    lines += ["", f"Vision tower {parts['tower_s'] * 1e3:.1f} ms and selector {parts['selector_s'] * 1e3:.1f} ms per "
                  f"image ({100 * parts['selector_s'] / full['median_s']:.0f}% of keep 1.0's TTFT)."]
    return lines


def against_stock() -> list[str]:
    report = load(STOCK)
    cells = {(c["concurrency"], c["images"]): c for c in report["cells"]}
    concurrencies = sorted({c for c, _ in cells})
    images = sorted({i for _, i in cells})
    target = report["target_ratio"]
    rounds = {c["rounds"] for c in report["cells"]}
    ratios = [r for c in report["cells"] for r in c["ratios"]]

    def cell(c: int, i: int) -> str:
        ratio = cells[c, i]["ratio_median_paired"]
        return f"{ratio:.3f}" + ("" if ratio >= target else " (below)")

    lines = [f"**Cost when pruning nothing**: requests/s of the plugin at keep 1.0 over stock `vllm serve`, "
             f"medians of {'/'.join(map(str, sorted(rounds)))} paired rounds, {report['image_size']} px JPEGs "
             f"(`make bench-stock`; {source(STOCK)}); the target is {target}:", "",
             "| concurrency | " + " | ".join(f"{i} image{'s' if i > 1 else ''} / request" for i in images) + " |",
             "| --- |" + " --- |" * len(images)]
    lines += [f"| {c} | " + " | ".join(cell(c, i) for i in images) + " |" for c in concurrencies]
    http = "; ".join(f"{t['ms']:.2f} ms with {n} image{'s' if int(n) > 1 else ''} ({t['body_bytes'] / 2**20:.1f} MiB)"
                     for n, t in report["translation"].items())
    lines += ["", f"Single rounds range {min(ratios):.2f}-{max(ratios):.2f}. The HTTP layer's own work per "
                  f"request: {http}."]
    extra = "; ".join(f"{b['extra_ms']:+.2f} ms with {n} image{'s' if int(n) > 1 else ''}"
                      for n, b in report["breakdown"].items())
    lines[-1] += (f" All the plugin's extra work per request, timed in process (HTTP layer, processor, "
                  f"encoding, batching): {extra}.")
    return lines


def auto_cost() -> list[str]:
    report = load(AUTO_COST)
    api = report["api_server_per_request"]
    arms = "; ".join(f"{c['auto_over_fixed']:.3f}x ({c['auto_minus_fixed_ms']:+.2f} ms) with "
                     f"{n.split('_')[0]} output token{'s' if n.split('_')[0] != '1' else ''}" for n, c in api.items())
    rounds = {c["rounds"] for c in api.values()}
    return [f"**What `auto` costs the API server**: CPU per chat request with a 336 px image against keep 0.25, "
            f"medians of {'/'.join(map(str, sorted(rounds)))} paired rounds: {arms} ({source(AUTO_COST)})."]


def render() -> str:
    parts = [["*Generated by `python benchmarks/readme_figures.py` from the results files linked here; "
              "`tests/test_results.py` checks that the two agree.*"],
             quality(), demo_speed(), speed(), against_stock(), auto_cost()]
    return "\n".join([BEGIN, *"\n\n".join("\n".join(p) for p in parts).splitlines(), END])


def current(text: str) -> str:
    """The README's block, markers included."""
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if README.md's block differs")
    args = parser.parse_args(argv)
    text = README.read_text()
    if current(text) == render():
        return 0
    if args.check:
        print("README.md's figures block differs from the results files: run python benchmarks/readme_figures.py",
              file=sys.stderr)
        return 1
    README.write_text(text.replace(current(text), render()))
    print("README.md's figures block rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
