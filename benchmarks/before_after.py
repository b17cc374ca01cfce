"""The served model at two commits of this project, side by side: requests/s and TTFT.

Each commit is checked out into its own git worktree and served by its own
`vllm-tokenprune serve` process (the same Python environment, that checkout's package
first on the path; the embedded demo model unless ``--model``). Then rounds of a closed
loop, ``--concurrency`` requests in flight, each with one new JPEG (unique bytes, so no
cache serves it), one output token and ``X-Keep-Ratio``; the two servers alternate within
a round, in an order that flips every round, so the host's slow stretches hit both alike.
A request of one output token ends with its first token: its latency is its TTFT.

    PYTHONPATH=. python benchmarks/before_after.py --before 17385bc --out benchmarks/results/before-after

Writes results.json (every round), results.md and before_after.png. Round 0 warms both
servers up and is not kept.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path

from vllm_tokenprune.tools.provenance import add_allow_dirty, stamp, write_results

ROOT = Path(__file__).resolve().parents[1]


def checkout(rev: str, work: Path) -> tuple[str, Path]:
    """(short commit, a clean worktree of it under ``work``), made once and reused."""
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    tree = work / commit
    if not (tree / "vllm_tokenprune").is_dir():
        subprocess.run(["git", "worktree", "add", "--force", "--detach", str(tree), commit], cwd=ROOT,
                       check=True, capture_output=True)
    return commit, tree


def summary(runs: list[dict]) -> dict:
    latencies = sorted(x for r in runs for x in r["latencies"])
    return {"requests_per_s": statistics.median(r["requests_per_s"] for r in runs),
            "ttft_ms_p50": 1000 * statistics.median(latencies),
            "ttft_ms_p90": 1000 * latencies[int(0.9 * (len(latencies) - 1))],
            "completed": sum(r["completed"] for r in runs), "failed": sum(r["failed"] for r in runs),
            "failures": [f for r in runs for f in r["failures"]][:3],
            "prompt_tokens": sorted({t for r in runs for t in r["prompt_tokens"]})}


def measure(servers: dict[str, str], model: str, *, keep: float, concurrency: int, rounds: int, per_slot: int,
            size: int, seed: int) -> dict:
    """Interleaved rounds; per server its runs, and the paired per-round ratios second / first."""
    from tqdm import tqdm

    from vllm_tokenprune.tools.client import prune_headers
    from vllm_tokenprune.tools.overhead import Bodies, base_images, closed_loop

    bodies = Bodies(model, base_images(size, 8, seed))
    names = list(servers)
    runs = {name: [] for name in names}
    with tqdm(total=(rounds + 1) * len(names), desc="before / after", unit="run") as bar:
        for round_ in range(rounds + 1):
            for name in names if round_ % 2 == 0 else names[::-1]:
                batch = [bodies.make(1) for _ in range(per_slot * concurrency)]
                result = asyncio.run(closed_loop(servers[name], batch, concurrency, prune_headers(keep)))
                if round_:
                    runs[name].append(result)
                bar.update()
    first, second = (runs[name] for name in names)
    return {
        "runs": {name: [{k: v for k, v in r.items() if k != "latencies"} for r in rs] for name, rs in runs.items()},
        "summary": {name: summary(rs) for name, rs in runs.items()},
        "requests_per_s_ratio_paired": statistics.median(
            b["requests_per_s"] / a["requests_per_s"] for a, b in zip(first, second)),
        "ttft_p50_ratio_paired": statistics.median(
            statistics.median(b["latencies"]) / statistics.median(a["latencies"]) for a, b in zip(first, second)),
        "per_round": [{"requests_per_s": [a["requests_per_s"], b["requests_per_s"]],
                       "ttft_ms_p50": [1000 * statistics.median(r["latencies"]) for r in (a, b)]}
                      for a, b in zip(first, second)],
    }


def markdown(report: dict) -> str:
    (before, a), (after, b) = report["summary"].items()
    lines = [f"# {report['model']} at keep {report['keep']}, {report['concurrency']} clients: {before} against {after}",
             "", f"`{report['command']}`, {report['cpus']} CPUs. {report['image_size']} px JPEGs, every one new, "
             f"1 output token (latency = TTFT); {report['rounds']} rounds, the two servers alternating.", "",
             "| commit | requests/s (median of rounds) | TTFT p50 ms | TTFT p90 ms | requests | failed |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, s in report["summary"].items():
        lines.append(f"| {name} | {s['requests_per_s']:.2f} | {s['ttft_ms_p50']:.1f} | {s['ttft_ms_p90']:.1f} "
                     f"| {s['completed']} | {s['failed']} |")
    lines += ["", f"{after} / {before}, median of paired rounds: requests/s "
              f"{report['requests_per_s_ratio_paired']:.3f}, TTFT p50 {report['ttft_p50_ratio_paired']:.3f}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["summary"])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, key, label in ((axes[0], "requests_per_s", "requests/s"), (axes[1], "ttft_ms_p50", "TTFT p50 (ms)")):
        for r in report["per_round"]:
            ax.plot([0, 1], r[key], color="0.7", marker="o", markersize=3, linewidth=0.8)
        ax.bar([0, 1], [statistics.median(r[key][i] for r in report["per_round"]) for i in (0, 1)], width=0.5,
               color=["tab:gray", "tab:blue"], alpha=0.6)
        ax.set_xticks([0, 1], names)
        ax.set_ylabel(label)
    fig.suptitle(f"keep {report['keep']}, {report['concurrency']} clients (bars: medians; lines: paired rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier commit")
    parser.add_argument("--after", default="HEAD", help="the later commit (default: HEAD)")
    parser.add_argument("--model", default=None, help="checkpoint to serve (default: the embedded demo)")
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=6, help="requests per run, as a multiple of the concurrency")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "before-after", help="worktrees and logs")
    parser.add_argument("--out", type=Path, required=True)
    add_allow_dirty(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    from vllm_tokenprune.tools.launcher import Server

    record = stamp(Path(__file__), argv, args.allow_dirty)

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (before, before_tree), (after, after_tree) = (checkout(rev, args.work) for rev in (args.before, args.after))
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    with (Server(args.model, "--served-model-name", "bench", log_path=args.work / f"{before}.log",
                 env={**env, "PYTHONPATH": str(before_tree)}) as first,
          Server(args.model, "--served-model-name", "bench", log_path=args.work / f"{after}.log",
                 env={**env, "PYTHONPATH": str(after_tree)}) as second):
        result = measure({before: first.root, after: second.root}, "bench", keep=args.keep,
                         concurrency=args.concurrency, rounds=args.rounds, per_slot=args.requests,
                         size=args.image_size, seed=args.seed)
    report = {"model": args.model or "the embedded demo", "keep": args.keep, "concurrency": args.concurrency,
              "rounds": args.rounds, "image_size": args.image_size, **record,
              "cpus": len(os.sched_getaffinity(0)), **result}
    write_results(args.out, report, markdown(report))
    plot(report, args.out / "before_after.png")
    return 1 if any(s["failed"] for s in report["summary"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
