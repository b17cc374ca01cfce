"""``vllm-tokenprune bench --workload ITEMS.jsonl``: budgets against each other on a workload.

``auto`` gives each image its own K, so what it saves depends on the images: random-noise
images (the sweep's) all look alike to the budget predictor. This load test sends the
images of an eval file (``make-eval-set``; a mix of sparse and dense ones is the case that
matters) under each budget of ``--workload-ratios`` (e.g. ``auto`` and the fixed ratio it is
compared with): a closed loop of streamed chat requests at ``--workload-concurrency``,
rounds interleaved with the budgets' order alternating. Per budget: TTFT (mean, p50, p99),
requests/s, and the mean image tokens the server reported.

Every request's image is new to the server: each is sent as a JPEG whose comment segment
names the request (``overhead.unique``), so no encoder or prefix cache answers, and the
predictor runs on every request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vllm_tokenprune.tools.client import image_question, image_tokens, prune_headers
from vllm_tokenprune.tools.overhead import unique
from vllm_tokenprune.tools.provenance import checkpoint_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--workload")
    group.add_argument("--workload", type=Path, metavar="ITEMS.jsonl",
                       help="instead, load-test the budgets of --workload-ratios on these images")
    group.add_argument("--workload-ratios", default="auto,0.5", help="budgets compared (numbers or auto)")
    group.add_argument("--workload-concurrency", type=int, default=8)
    group.add_argument("--workload-rounds", type=int, default=4, help="interleaved rounds per budget")
    group.add_argument("--workload-requests", type=int, default=64, help="requests per round")


def jpeg_images(path: Path, limit: int) -> list[tuple[bytes, str]]:
    """(JPEG bytes, question) for ``limit`` items spread evenly over an eval file (files
    often hold one kind of image after another)."""
    from vllm_tokenprune.tools.eval import load_items

    items = load_items(path)
    out = []
    for item in items[::max(1, len(items) // limit)][:limit]:
        encoded = item.image_url.split(",", 1)[1] if item.image_url.startswith("data:") else None
        if encoded is None:
            raise ValueError(f"{path}: --workload needs local images or data URLs, not {item.image_url[:60]}")
        buf = io.BytesIO()
        Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB").save(buf, "JPEG", quality=95)
        out.append((buf.getvalue(), item.question))
    return out


async def closed_loop(url: str, model: str, images: list[tuple[bytes, str]], budget: str, concurrency: int,
                      output_tokens: int, tags) -> dict:
    """Every image once under ``budget``, ``concurrency`` in flight: TTFTs, requests/s, image tokens."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    queue = list(images)
    ttfts, kept, failures = [], [], []

    async def one(jpeg: bytes, question: str) -> None:
        url_ = "data:image/jpeg;base64," + base64.b64encode(unique(jpeg, next(tags))).decode()
        start = time.perf_counter()
        first = None
        stream = await client.chat.completions.create(
            model=model, max_tokens=output_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_headers=prune_headers(budget),
            extra_body={"ignore_eos": True},
            messages=image_question(url_, question))
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if (found := image_tokens(chunk.usage)) is not None:  # the last chunk carries usage
                kept.append(found)
        ttfts.append(first if first is not None else time.perf_counter() - start)

    async def worker():
        while queue:
            jpeg, question = queue.pop()
            try:
                await one(jpeg, question)
            except openai.OpenAIError as err:
                failures.append(repr(err)[:200])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return {"ttfts": ttfts, "requests_per_s": len(ttfts) / elapsed, "image_tokens": kept,
            "failed": len(failures), "failures": failures[:3]}


def measure(url: str, model: str, images, budgets: list[str], concurrency: int, rounds: int,
            output_tokens: int) -> list[dict]:
    from tqdm import tqdm

    tags = itertools.count()
    runs = {b: [] for b in budgets}
    with tqdm(total=(rounds + 1) * len(budgets), desc="workload", unit="run") as bar:
        for round_ in range(rounds + 1):  # round 0 warms up and is not kept
            for budget in (budgets if round_ % 2 == 0 else list(reversed(budgets))):
                result = asyncio.run(closed_loop(url, model, images, budget, concurrency, output_tokens, tags))
                if round_:
                    runs[budget].append(result)
                bar.update()
    cells = []
    for budget, results in runs.items():
        ttfts = [t for r in results for t in r["ttfts"]]
        tokens = [t for r in results for t in r["image_tokens"]]
        cells.append({
            "budget": budget, "rounds": rounds, "requests": len(ttfts),
            "mean_ttft_ms": 1e3 * statistics.fmean(ttfts), "median_ttft_ms": 1e3 * statistics.median(ttfts),
            "p99_ttft_ms": 1e3 * float(np.percentile(ttfts, 99)),
            "requests_per_s": statistics.median(r["requests_per_s"] for r in results),
            "requests_per_s_rounds": [r["requests_per_s"] for r in results],
            "mean_image_tokens": statistics.fmean(tokens) if tokens else None,
            "failed": sum(r["failed"] for r in results),
            "failures": [f for r in results for f in r["failures"]][:3]})
    return cells


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Budgets on a workload: {checkpoint_name(env['model']['path'])}", "",
             f"`{report['command']}` at commit {report['commit']}, {env['machine']['cpus']} CPUs. "
             f"{report['requests']} requests of `{report['workload']}` per round, concurrency "
             f"{report['concurrency']}, {report['output_tokens']} output tokens, every image new; "
             "rounds interleaved.", "",
             "| budget | image tokens (mean) | TTFT mean / p50 / p99 ms | req/s (median of rounds) | failed |",
             "| --- | --- | --- | --- | --- |"]
    for c in report["cells"]:
        tokens = "-" if c["mean_image_tokens"] is None else f"{c['mean_image_tokens']:.1f}"
        lines.append(f"| {c['budget']} | {tokens} | {c['mean_ttft_ms']:.1f} / {c['median_ttft_ms']:.1f} / "
                     f"{c['p99_ttft_ms']:.1f} | {c['requests_per_s']:.2f} | {c['failed']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    labels = [c["budget"] for c in cells]
    fig, (ttft, rate) = plt.subplots(1, 2, figsize=(9, 3.8))
    ttft.bar(labels, [c["median_ttft_ms"] for c in cells], color="tab:blue")
    ttft.set(ylabel="TTFT p50 (ms)", title="time to first token")
    for x, c in enumerate(cells):
        rate.scatter([x] * len(c["requests_per_s_rounds"]), c["requests_per_s_rounds"], color="0.5", s=12, zorder=3)
    rate.bar(range(len(cells)), [c["requests_per_s"] for c in cells], color="tab:green", tick_label=labels)
    rate.set(ylabel="requests/s", title="throughput (bars: median; dots: rounds)")
    fig.suptitle(f"{report['workload']}, concurrency {report['concurrency']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace, out: Path, record: dict) -> int:
    """``record``: the run's ``provenance.stamp``, taken before it starts."""
    from vllm_tokenprune.tools.launcher import target
    from vllm_tokenprune.tools.provenance import environment, write_results

    images = jpeg_images(args.workload, args.workload_requests)
    budgets = [b.strip() for b in args.workload_ratios.split(",") if b.strip()]
    serve_args = [*args.extra_args] + (["--selector", args.selector] if args.selector else [])
    with target(args.url, args.model, serve_args, out / "server.log") as (root, model_name, _):
        cells = measure(root + "/v1", model_name, images, budgets, args.workload_concurrency,
                        args.workload_rounds, args.output_tokens)
    report = {**record, "environment": environment(args.model), "workload": str(args.workload),
              "requests": len(images),
              "concurrency": args.workload_concurrency, "output_tokens": args.output_tokens, "cells": cells}
    write_results(out, report, markdown(report))
    plot(report, out / "workload.png")
    print(f"results in {out}")
    return 1 if any(c["failed"] for c in cells) else 0
