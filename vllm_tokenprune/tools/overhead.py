"""``vllm-tokenprune bench --against-stock``: what the plugin costs when it prunes nothing.

Two servers of one checkpoint run side by side: stock ``vllm serve`` (stock architecture,
no middleware) and ``vllm-tokenprune serve``, which gets ``X-Keep-Ratio: 1.0`` on every
request, so its HTTP layer translates every body and its processor resolves every
request. Each cell (concurrency x images per request) is a closed loop of requests with
large JPEGs and one output token, where the API server's work (bodies, image decoding,
processing) weighs most. Rounds interleave the two servers cell by cell, in alternating
order, so the host's slow stretches hit both alike; a cell's figure is the median of its
per-round ratios of requests/s, plugin over stock. Each run also reads the CPU time the
server's processes (API server, engine core, worker) used per request; on a 2-core host
shared by both servers it includes their waiting on each other, and its rounds spread about
as widely as requests/s.

Every image is distinct (a comment segment in the JPEG makes its bytes, and so vLLM's
item hash, unique), so no cache serves either server; the pixels, and so the decoding
work, come from a few base images.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vllm_tokenprune.tools.client import prune_headers
from vllm_tokenprune.tools.provenance import checkpoint_name

TARGET_RATIO = 0.97  # the plugin's requests/s at keep 1.0, as a share of stock's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--against-stock")
    group.add_argument("--against-stock", action="store_true",
                       help="compare the plugin at keep 1.0 with stock `vllm serve` of --model instead")
    group.add_argument("--stock-rounds", type=int, default=8, help="interleaved rounds per cell")
    group.add_argument("--stock-images", default="1,4", help="images per request, one cell each")
    group.add_argument("--stock-concurrency", default="16,32")
    group.add_argument("--stock-image-size", type=int, default=1024, help="side of the JPEGs sent")
    group.add_argument("--stock-requests", type=int, default=6,
                       help="requests per run, as a multiple of the concurrency")


def base_images(size: int, count: int, seed: int) -> list[bytes]:
    """JPEGs of a smooth scene under noise: photo-like sizes (about 0.5 MB at 1024 px)."""
    rng = np.random.default_rng(seed)
    out = []
    ramp = np.linspace(0, 255, size)
    for _ in range(count):
        scene = (ramp[None, :, None] * rng.random(3) + ramp[:, None, None] * rng.random(3)) / 2
        pixels = np.clip(scene + rng.normal(0, 24, (size, size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def unique(jpeg: bytes, tag: int) -> bytes:
    """The same JPEG with a comment segment naming ``tag``: new bytes, same pixels."""
    comment = f"tokenprune-bench {tag}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


class Bodies:
    """Request bodies with images never sent before."""

    def __init__(self, model: str, images: list[bytes]):
        self.model, self.images, self.counter = model, images, itertools.count()

    def make(self, per_request: int) -> bytes:
        content = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(
            unique(self.images[i % len(self.images)], next(self.counter))).decode()}}
            for i in range(per_request)]
        content.append({"type": "text", "text": "Describe the images."})
        return json.dumps({"model": self.model, "max_tokens": 1, "temperature": 0,
                           "messages": [{"role": "user", "content": content}]}).encode()


async def closed_loop(root: str, bodies: list[bytes], concurrency: int, headers: dict) -> dict:
    """Send ``bodies`` with ``concurrency`` in flight; requests/s, each request's seconds and
    the prompt tokens."""
    import httpx

    queue = list(bodies)
    tokens, failures, latencies = [], [], []
    async with httpx.AsyncClient(base_url=root, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker():
            while queue:
                body = queue.pop()
                sent = time.perf_counter()
                response = await client.post("/v1/chat/completions", content=body,
                                             headers={"Content-Type": "application/json", **headers})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - sent)
                    tokens.append(response.json()["usage"]["prompt_tokens"])
                else:
                    failures.append(f"{response.status_code}: {response.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"requests_per_s": len(tokens) / elapsed, "seconds": elapsed, "latencies": latencies,
            "completed": len(tokens), "failed": len(failures), "failures": failures[:3],
            "prompt_tokens": sorted(set(tokens))}


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process and all its descendants have used so far."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def measure(servers: dict[str, tuple[str, int]], model: str, cells: list[tuple[int, int]], rounds: int,
            size: int, seed: int, per_slot: int) -> list[dict]:
    """Interleaved rounds over ``cells`` (concurrency, images per request) for each server,
    given as (root URL, pid)."""
    from tqdm import tqdm

    bodies = Bodies(model, base_images(size, 8, seed))
    headers = {"plugin": prune_headers(1.0), "stock": {}}
    runs = {cell: {name: [] for name in servers} for cell in cells}
    with tqdm(total=(rounds + 1) * len(cells) * len(servers), desc="against stock", unit="run") as bar:
        for round_ in range(rounds + 1):  # round 0 warms both servers up and is not kept
            for i, cell in enumerate(cells):
                concurrency, images = cell
                order = list(servers) if (round_ + i) % 2 == 0 else list(reversed(servers))
                for name in order:
                    root, pid = servers[name]
                    batch = [bodies.make(images) for _ in range(per_slot * concurrency)]
                    cpu = cpu_seconds(pid)
                    result = asyncio.run(closed_loop(root, batch, concurrency, headers[name]))
                    result["cpu_ms_per_request"] = 1000 * (cpu_seconds(pid) - cpu) / max(1, result["completed"])
                    if round_:
                        runs[cell][name].append(result)
                    bar.update()
    out = []
    for (concurrency, images), by_server in runs.items():
        stock, plugin = by_server["stock"], by_server["plugin"]
        ratios = [p["requests_per_s"] / s["requests_per_s"] for p, s in zip(plugin, stock)]
        cpu_ratios = [p["cpu_ms_per_request"] / s["cpu_ms_per_request"] for p, s in zip(plugin, stock)]
        out.append({
            "concurrency": concurrency, "images": images, "rounds": rounds,
            "stock_requests_per_s": statistics.median(r["requests_per_s"] for r in stock),
            "plugin_requests_per_s": statistics.median(r["requests_per_s"] for r in plugin),
            "ratio_median_paired": statistics.median(ratios), "ratios": ratios,
            "stock_cpu_ms_per_request": statistics.median(r["cpu_ms_per_request"] for r in stock),
            "plugin_cpu_ms_per_request": statistics.median(r["cpu_ms_per_request"] for r in plugin),
            "cpu_ratio_median_paired": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios,
            "failed": sum(r["failed"] for r in stock + plugin),
            "failures": [f for r in stock + plugin for f in r["failures"]][:3],
            "prompt_tokens": {"stock": sorted({t for r in stock for t in r["prompt_tokens"]}),
                              "plugin": sorted({t for r in plugin for t in r["prompt_tokens"]})},
        })
    return out


def translation_cost(images: list[bytes], per_request: list[int], repeats: int = 50) -> dict[str, dict]:
    """The HTTP layer's own work per request (body scan and the header's kwargs written in),
    timed in this process: the part of the plugin's cost that grows with the body."""
    from vllm_tokenprune.serving.http import translate

    bodies = Bodies("bench", images)
    out = {}
    for count in per_request:
        body = bodies.make(count)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            translate("/v1/chat/completions", {"X-Keep-Ratio": "1.0"}, body)
            times.append(time.perf_counter() - start)
        out[str(count)] = {"body_bytes": len(body), "ms": 1000 * statistics.median(times)}
    return out


def breakdown(model: str, images: list[bytes], per_request: list[int], translation: dict[str, dict],
              repeats: int = 30) -> dict[str, dict]:
    """Where the plugin's extra work per request goes, timed in this process on the stock and
    the pruned processor of ``model`` for the same requests, interleaved (medians, ms): the
    HTTP layer (``translation``, from ``translation_cost``), the processor's ``apply`` (no cache, so every image
    is processed and hashed, as for a new image), msgpack encoding of the items it hands the
    engine, and the worker's batching of them into the model's inputs, with the plan read."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.inputs import MultiModalKwargsItems
    from vllm.v1.serial_utils import MsgpackEncoder

    from vllm_tokenprune.policy import PrunePolicy
    from vllm_tokenprune.serving import plugin
    from vllm_tokenprune.serving.models.model import PruningModelMixin
    from vllm_tokenprune.tools.serve import pruned_architecture

    plugin.register()
    most = max(per_request)
    processors = {
        "stock": MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=model, limit_mm_per_prompt={"image": most})),
        "plugin": MULTIMODAL_REGISTRY.create_processor(ModelConfig(
            model=model, limit_mm_per_prompt={"image": most},
            hf_overrides={"architectures": [pruned_architecture(model)], **PrunePolicy().to_overrides()}))}
    kwargs = {"stock": {}, "plugin": {"keep_ratio": 1.0}}  # what the HTTP layer writes in
    encoder = MsgpackEncoder()
    pictures = [Image.open(io.BytesIO(jpeg)).convert("RGB") for jpeg in images]

    def stages(name: str, count: int) -> dict[str, float]:
        proc = processors[name]
        text = proc.dummy_inputs.get_dummy_text({"image": count})
        start = time.perf_counter()
        out = proc(text, proc.info.parse_mm_data({"image": pictures[:count]}), hf_processor_mm_kwargs=kwargs[name],
                   cache=None)
        processed = time.perf_counter()
        items = list(out["mm_kwargs"]["image"])
        encoder.encode(items)
        encoded = time.perf_counter()
        batch = dict(MultiModalKwargsItems({"image": items}).get_data(device="cpu"))
        PruningModelMixin._pop_prune_fields(batch)
        batched = time.perf_counter()
        return {"processor": processed - start, "encode": encoded - processed, "batch": batched - encoded}

    out = {}
    for count in per_request:
        times = {name: [] for name in processors}
        for r in range(repeats + 1):  # the first, a warm-up, is not kept
            for name in (list(processors) if r % 2 else reversed(list(processors))):
                if r:
                    times[name].append(stages(name, count))
                else:
                    stages(name, count)
        cell = {stage: {name: 1000 * statistics.median(t[stage] for t in times[name]) for name in times}
                for stage in ("processor", "encode", "batch")}
        cell["http"] = {"stock": 0.0, "plugin": translation[str(count)]["ms"]}
        out[str(count)] = {"stages_ms": cell, "extra_ms": sum(v["plugin"] - v["stock"] for v in cell.values())}
    return out


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# The plugin at keep 1.0 against stock vLLM: {checkpoint_name(env['model']['path'])}", "",
             f"`{report['command']}` at commit {report['commit']}, {env['machine']['cpus']} CPUs. "
             f"{report['image_size']} px JPEGs, 1 output token, every image new; rounds interleaved.", "",
             "| concurrency | images / request | stock req/s | plugin req/s | plugin / stock (median of paired rounds) "
             f"| within {100 * (1 - TARGET_RATIO):.0f}% | CPU ms / request, stock / plugin | plugin / stock CPU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in report["cells"]:
        cpu = (f"{c['stock_cpu_ms_per_request']:.1f} / {c['plugin_cpu_ms_per_request']:.1f} | "
               f"{c['cpu_ratio_median_paired']:.3f} (rounds: {min(c['cpu_ratios']):.3f}-{max(c['cpu_ratios']):.3f})")
        lines.append(f"| {c['concurrency']} | {c['images']} | {c['stock_requests_per_s']:.2f} | "
                     f"{c['plugin_requests_per_s']:.2f} | {c['ratio_median_paired']:.3f} "
                     f"(rounds: {min(c['ratios']):.3f}-{max(c['ratios']):.3f}) | "
                     f"{'yes' if c['ratio_median_paired'] >= TARGET_RATIO else 'no'} | {cpu} |")
    lines += ["", "The HTTP layer's own work per request, timed in process (median of 50): " + "; ".join(
        f"{v['ms']:.2f} ms for {n} image{'s' * (n != '1')} ({v['body_bytes'] / 2**20:.1f} MiB body)"
        for n, v in report["translation"].items()) + "."] + breakdown_markdown(report)
    return "\n".join(lines) + "\n"


STAGES = {"http": "HTTP layer (body scan, header written in)", "processor": "processor `apply`",
          "encode": "items encoded for the engine (msgpack)", "batch": "items batched in the worker, plan read"}


def breakdown_markdown(report: dict) -> list[str]:
    """The per-request table of ``breakdown``, next to the gap the servers showed."""
    counts = list(report["breakdown"])
    lines = ["", "Where the plugin's extra API-server and engine work per request goes, timed in process on the "
             "stock and the pruned processor of the same checkpoint, interleaved (median ms, stock / plugin):", "",
             "| stage | " + " | ".join(f"{n} image{'s' * (n != '1')}" for n in counts) + " |",
             "| --- |" + " --- |" * len(counts)]
    for stage, label in STAGES.items():
        lines.append(f"| {label} | " + " | ".join(
            "{stock:.2f} / {plugin:.2f}".format(**report["breakdown"][n]["stages_ms"][stage]) for n in counts) + " |")
    lines.append("| **extra per request** | " + " | ".join(
        f"**{report['breakdown'][n]['extra_ms']:+.2f}**" for n in counts) + " |")
    gaps = [f"{1000 / c['plugin_requests_per_s'] - 1000 / c['stock_requests_per_s']:+.2f} ms"
            + f" ({c['plugin_cpu_ms_per_request'] - c['stock_cpu_ms_per_request']:+.2f} ms of CPU)"
            + f" at {c['concurrency']} clients with {c['images']}" for c in report["cells"]]
    lines += ["", "The servers' gap per request (1 / requests/s, and CPU time per request, plugin minus stock, "
              "medians): " + "; ".join(gaps) + " (image count per request). What the stages above do not account "
              "for is work this breakdown does not time (scheduling, the tower call, the response) or the host's "
              "noise."]
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    labels = [f"c={c['concurrency']}\n{c['images']} image{'s' * (c['images'] > 1)}" for c in cells]
    fig, ax = plt.subplots(figsize=(7, 4))
    for x, c in enumerate(cells):
        ax.scatter([x] * len(c["ratios"]), c["ratios"], color="0.6", s=12, zorder=2)
        ax.bar(x, c["ratio_median_paired"], width=0.6, color="tab:blue", zorder=1)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(TARGET_RATIO, color="tab:red", linestyle="--", linewidth=1, label=f"target {TARGET_RATIO}")
    ax.set_xticks(range(len(cells)), labels)
    ax.set_ylim(min(0.8, min(min(c["ratios"]) for c in cells) - 0.02),
                max(1.1, max(max(c["ratios"]) for c in cells) + 0.02))
    ax.set_ylabel("plugin / stock requests/s")
    ax.set_title("vllm-tokenprune at keep 1.0 vs stock vLLM (bars: medians; dots: rounds)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace, out: Path, seed: int, record: dict) -> int:
    """``record``: the run's ``provenance.stamp``, taken before it starts."""
    from vllm_tokenprune.tools.launcher import Server
    from vllm_tokenprune.tools.provenance import environment, write_results

    images = [int(i) for i in args.stock_images.split(",")]
    concurrencies = [int(c) for c in args.stock_concurrency.split(",")]
    cells = [(c, i) for c in concurrencies for i in images]
    serve_args = ["--served-model-name", "bench", "--limit-mm-per-prompt", json.dumps({"image": max(images)}),
                  *args.extra_args]
    cpu_env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    jpegs = base_images(args.stock_image_size, 8, seed)
    translation = translation_cost(jpegs, images)
    stages = breakdown(args.model, jpegs, images, translation)
    print("starting stock `vllm serve` and `vllm-tokenprune serve` ...", flush=True)
    with (Server(args.model, *serve_args, "--enforce-eager", log_path=out / "stock.log", env=cpu_env,
                 stock=True) as stock,
          Server(args.model, *serve_args, log_path=out / "plugin.log") as plugin):
        cells_out = measure({"stock": (stock.root, stock.proc.pid), "plugin": (plugin.root, plugin.proc.pid)},
                            "bench", cells,
                            args.stock_rounds, args.stock_image_size, seed, args.stock_requests)
    report = {**record, "environment": environment(args.model), "seed": seed, "image_size": args.stock_image_size,
              "target_ratio": TARGET_RATIO, "translation": translation, "breakdown": stages, "cells": cells_out}
    write_results(out, report, markdown(report))
    plot(report, out / "against_stock.png")
    print(f"results in {out}")
    return 1 if any(c["failed"] or c["prompt_tokens"]["stock"] != c["prompt_tokens"]["plugin"]
                    for c in cells_out) else 0
