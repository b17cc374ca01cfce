"""Video requests: per-request pruning against vLLM's own engine-wide EVS at the same rate.

    PYTHONPATH=. .venv/bin/python benchmarks/video_vs_evs.py --out benchmarks/results/video-vs-evs

The model is a prefill-bound Qwen2.5-VL (``make-tiny --arch qwen2.5-vl --preset bench``: a
~300M-parameter language model behind a cheap tower, bf16), built here unless ``--model``
names one. Servers, all up at once: ``vllm-tokenprune serve`` (one server, every ratio chosen
per request: ``X-Keep-Ratio: video=R``, method ``evs``) and stock ``vllm serve``, one per rate
since vLLM's rate is engine-wide (``--video-pruning-rate 1 - R``; at keep 1.0 the stock model
unpruned). Each cell, a keep ratio at a number of concurrent clients, sends the same number of
requests to each system, every request a clip of its own (random frames: no encoder or
prefix-cache hits), in rounds whose order of systems and cells rotates, so the host's slow
stretches hit every arm alike. A request asks one output token, streamed: its time to first
token is its prefill. Reported per cell and system: median TTFT, requests/s, and the prompt
tokens the server counted, and per cell the ratio ours / stock of each (each server's first
request, its warm-up, is not counted). Writes results.json, results.md and video_vs_evs.png.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from vllm_tokenprune.tools.launcher import Server
from vllm_tokenprune.tools.provenance import add_allow_dirty, environment, stamp, write_results

# Several servers share the host: 1 GiB of KV cache each holds 32 clips of ~600 tokens many times over.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}


def clip_url(rng: np.random.Generator, frames: int, side: int, folder: Path) -> str:
    """A clip of random frames as an mp4 data URL (OpenCV's mp4v, which vLLM's loader reads)."""
    path = folder / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 2.0, (side, side))
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    writer.release()
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


async def one(client, url: str, headers: dict) -> tuple[float, int]:
    """(TTFT in seconds, prompt tokens) of one streamed request for one output token."""
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model="bench", max_tokens=1, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_headers=headers, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What moves?"}]}])
    first, tokens = None, 0
    async for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.prompt_tokens
    return first, tokens


async def cell(base_url: str, headers: dict, urls: list[str], concurrency: int) -> dict:
    """``urls`` sent by ``concurrency`` clients: TTFTs, prompt tokens and requests/s."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    queue = list(urls)
    out: list[tuple[float, int]] = []

    async def worker():
        while queue:
            out.append(await one(client, queue.pop(), headers))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return {"ttft": [t for t, _ in out], "prompt_tokens": [n for _, n in out], "requests_per_s": len(out) / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Qwen2.5-VL checkpoint (default: make-tiny's bench preset, built here)")
    parser.add_argument("--ratios", default="1.0,0.5,0.25,0.1")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2, help="requests per client per cell and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--side", type=int, default=224, help="frame side in pixels")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/video-vs-evs"))
    parser.add_argument("--seed", type=int, default=0)
    add_allow_dirty(parser)
    args = parser.parse_args(argv)
    record = stamp(Path(__file__), sys.argv[1:] if argv is None else argv, args.allow_dirty)
    ratios = [float(r) for r in args.ratios.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="video-vs-evs-"))
    model = args.model
    if model is None:
        from vllm_tokenprune.testbed.tiny import build_tiny

        model = str(build_tiny("qwen2.5-vl", work / "model", seed=args.seed, preset="bench"))
    rng = np.random.default_rng(args.seed)

    def clips(count: int) -> list[str]:  # made before each cell, outside its timing
        return [clip_url(rng, args.frames, args.side, work) for _ in range(count)]

    args.out.mkdir(parents=True, exist_ok=True)
    serve = ["--served-model-name", "bench", "--max-model-len", "4096", "--limit-mm-per-prompt",
             json.dumps({"image": 0, "video": 1}), "--dtype", "bfloat16", "--enforce-eager"]
    results: dict = {}
    with Server(model, *serve, log_path=args.out / "ours.log", env=CPU_ENV) as ours:
        stock = {}
        try:
            for ratio in ratios:
                rate = [] if ratio == 1.0 else ["--video-pruning-rate", repr(round(1 - ratio, 6))]
                stock[ratio] = Server(model, *serve, *rate, log_path=args.out / f"stock-{ratio}.log",
                                      env=CPU_ENV, stock=True)
            arms = {("ours", r): (ours.url, {"X-Keep-Ratio": f"video={r}", "X-Prune-Method": "video=evs"})
                    for r in ratios}
            arms |= {("stock", r): (stock[r].url, {}) for r in ratios}
            for url, headers in arms.values():  # each server's first request pays its warm-up
                asyncio.run(cell(url, headers, clips(1), 1))
            cells = [(r, c) for r in ratios for c in concurrencies]
            progress = tqdm(total=len(cells) * 2 * args.rounds, desc="cells", unit="cell")
            for round_ in range(args.rounds):
                order = cells[round_ % len(cells):] + cells[:round_ % len(cells)]
                for ratio, concurrency in order:
                    systems = ("ours", "stock") if round_ % 2 == 0 else ("stock", "ours")
                    for system in systems:
                        url, headers = arms[(system, ratio)]
                        got = asyncio.run(cell(url, headers, clips(concurrency * args.requests), concurrency))
                        slot = results.setdefault(f"{ratio}@{concurrency}", {}).setdefault(
                            system, {"ttft": [], "prompt_tokens": [], "requests_per_s": []})
                        slot["ttft"] += got["ttft"]
                        slot["prompt_tokens"] += got["prompt_tokens"]
                        slot["requests_per_s"].append(got["requests_per_s"])
                        progress.update()
        finally:
            for server in stock.values():
                server.stop()
    report = {**record, "environment": environment(model), "frames": args.frames, "side": args.side,
              "cells": summarize(results)}
    write_results(args.out, report, markdown(report))
    plot(report, args.out / "video_vs_evs.png")
    return 0


def summarize(results: dict) -> list[dict]:
    out = []
    for key, systems in results.items():
        ratio, concurrency = key.split("@")
        row = {"keep_ratio": float(ratio), "concurrency": int(concurrency)}
        for system, got in systems.items():
            row[system] = {"ttft_median_s": statistics.median(got["ttft"]),
                           "requests_per_s": statistics.median(got["requests_per_s"]),
                           "prompt_tokens": sorted(set(got["prompt_tokens"])), "requests": len(got["ttft"])}
        row["ttft_ours_over_stock"] = row["ours"]["ttft_median_s"] / row["stock"]["ttft_median_s"]
        row["throughput_ours_over_stock"] = row["ours"]["requests_per_s"] / row["stock"]["requests_per_s"]
        out.append(row)
    return sorted(out, key=lambda r: (-r["keep_ratio"], r["concurrency"]))


def markdown(report: dict) -> str:
    lines = ["# Video requests: per-request pruning against vLLM's engine-wide EVS", "",
             f"`{report['command']}` at commit {report['commit']}; {report['frames']} frames of "
             f"{report['side']} px a clip, one output token, streamed.", "",
             "| keep | clients | prompt tokens (ours / stock) | TTFT ours / stock (s) | ratio | "
             "requests/s ours / stock | ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["cells"]:
        ours, stock = row["ours"], row["stock"]
        lines.append(
            f"| {row['keep_ratio']} | {row['concurrency']} | {ours['prompt_tokens']} / {stock['prompt_tokens']} | "
            f"{ours['ttft_median_s']:.3f} / {stock['ttft_median_s']:.3f} | {row['ttft_ours_over_stock']:.3f} | "
            f"{ours['requests_per_s']:.2f} / {stock['requests_per_s']:.2f} | {row['throughput_ours_over_stock']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrencies = sorted({r["concurrency"] for r in report["cells"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for concurrency, style in zip(concurrencies, ("o-", "s--", "^:", "d-.")):
        rows = sorted((r for r in report["cells"] if r["concurrency"] == concurrency), key=lambda r: r["keep_ratio"])
        keep = [r["keep_ratio"] for r in rows]
        for system, color in (("ours", "tab:blue"), ("stock", "tab:orange")):
            label = f"{'per request' if system == 'ours' else 'vLLM EVS'}, {concurrency} clients"
            axes[0].plot(keep, [r[system]["ttft_median_s"] for r in rows], style, color=color, label=label)
            axes[1].plot(keep, [r[system]["requests_per_s"] for r in rows], style, color=color, label=label)
    axes[0].set(xlabel="keep ratio (video)", ylabel="median TTFT (s)", yscale="log")
    axes[1].set(xlabel="keep ratio (video)", ylabel="requests / s")
    axes[1].legend(fontsize=7)
    fig.suptitle("Video requests: per-request pruning vs vLLM's engine-wide EVS (same rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
