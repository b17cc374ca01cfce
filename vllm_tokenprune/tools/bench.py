"""``vllm-tokenprune bench``: load-test the prefill savings against a real server.

One run, against one server, measures:

1. **prefill line**: text-only requests of several lengths (1 output token), interleaved;
   a least-squares fit latency = fixed + per_token * prompt_tokens (for reading only: it
   is measured in rounds of its own, not interleaved with the image requests).
2. **paired single-client latency**: per round one request per arm (keep 1.0, then every
   ``--paired-methods`` method at every other ratio, ``auto`` included), each with a fresh
   image (no encoder or prefix cache hits: random noise, or ``--paired-images`` testbed
   scenes as a user sends them), the order rotated every round so the host's slow stretches
   hit every arm alike; medians and median paired ratios to keep 1.0.
3. **the limit**: the checkpoint's vision tower and the selector per image, timed in this
   process (the server idle meanwhile) as the server runs them. Pruning cannot shorten the
   tower and adds the selector; at best the rest of the keep-1.0 latency shrinks with the
   prompt, so the ideal speedup at ratio r is T1 / (tower + selector + (T1 - tower) x
   tokens(r) / tokens(1.0)) (every other fixed cost counted as prefill: an upper bound);
   each cell reports the fraction of it achieved.
4. **sweep**: vLLM's own ``vllm bench serve`` (random-mm dataset, ``--header
   x-keep-ratio=R``) for every keep ratio x method x concurrency: TTFT mean/p50/p99,
   TPOT, end-to-end latency, request throughput, prompt tokens.
5. optionally a **soak**: mixed ratios and methods at concurrency 16 with a few bad
   requests mixed in, counting failed good requests and the server's memory growth.

``--against-stock`` (``overhead``) and ``--workload`` (``workload``: budgets such as ``auto``
against fixed ratios on an eval file's images) run instead of all of this.

Results go to ``--out``: ``results.json`` (everything, with commit, command, machine and model),
``results.md`` (tables) and ``ttft_throughput.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from vllm_tokenprune.tools import overhead, workload
from vllm_tokenprune.tools.bench_report import markdown, plot
from vllm_tokenprune.tools.client import image_question, image_url, prune_headers
from vllm_tokenprune.tools.provenance import add_allow_dirty, environment, stamp, write_results

ACCEPTS_EXTRA_ARGS = True  # extra arguments go to the server it starts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s --model DIR [--url URL] [options] [serve args...]"
    parser.add_argument("--model",
                        help="checkpoint directory (its tokenizer is used; served unless --url; "
                             "default: the embedded demo, with its selector)")
    parser.add_argument("--render", type=Path, metavar="DIR",
                        help="only rebuild DIR's tables and plot from its results.json")
    parser.add_argument("--url", help="target a running server (http://host:port) instead of "
                                      "starting one")
    parser.add_argument("--selector", help="selector for the server it starts")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results/<model>-<time>)")
    parser.add_argument("--ratios", default="1.0,0.5,0.25,0.1",
                        help="keep ratios; a budget such as auto joins the one-client comparison "
                             "only (its K differs per image)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated (default: learned,random,norm with a selector, "
                             "else random,norm)")
    parser.add_argument("--paired-methods", default=None,
                        help="methods of the one-client comparison (default: the first of --methods)")
    parser.add_argument("--paired-images", default=None, metavar="VARIANT",
                        help="its images: fresh held-out scenes of this testbed variant (e.g. clutter), "
                             "each asked the variant's first question (default: random noise at --image-size)")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--prompts-per-cell", type=int, default=0,
                        help="requests per sweep cell (default: max(16, 2 x concurrency))")
    parser.add_argument("--paired-rounds", type=int, default=30,
                        help="rounds of the interleaved single-client comparison")
    parser.add_argument("--prefill-rounds", type=int, default=8)
    parser.add_argument("--parts-rounds", type=int, default=20,
                        help="rounds timing the vision tower and the selector")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--text-tokens", type=int, default=32, help="text per sweep request")
    parser.add_argument("--output-tokens", type=int, default=16, help="output per sweep request")
    parser.add_argument("--soak-seconds", type=float, default=0, help="also run a soak this long")
    parser.add_argument("--seed", type=int, default=None, help="default: from the clock")
    add_allow_dirty(parser)
    overhead.add_arguments(parser)
    workload.add_arguments(parser)


# ---------------------------------------------------------------------------------------
# Requests


def random_image(rng: np.random.Generator, size: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def image_messages(image: Image.Image, text: str = "Describe the image.") -> list[dict]:
    return image_question(image_url(image), text)


def timed_request(client, model: str, messages, headers=None, cache_salt: str | None = None) -> tuple[float, int]:
    """(seconds to a 1-token answer, prompt tokens): time-to-first-token for one client;
    a ``cache_salt`` keeps the prompt from matching any other's cached prefix."""
    start = time.perf_counter()
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0,
                                         extra_headers=headers or {},
                                         extra_body={"cache_salt": cache_salt} if cache_salt else None)
    return time.perf_counter() - start, out.usage.prompt_tokens


def measure_prefill_line(client, model: str, rounds: int) -> dict:
    """Text-only prompts of several lengths, up to 600 words or 80% of the model's context
    (a word about a token); fit seconds = fixed + per_token * tokens."""
    card = next((c for c in client.models.list().data if c.id == model), None)
    longest = min(600, int(0.8 * (getattr(card, "max_model_len", None) or 750)))
    words = [round(longest * f) for f in (0.07, 0.25, 0.5, 0.75, 1.0)]
    samples: dict[int, list[float]] = {w: [] for w in words}
    tokens: dict[int, int] = {}
    nonce = random.Random()
    for r in range(rounds + 1):
        for w in words:
            # The same words every round (a word-level tokenizer would read any fresh word as
            # its one unknown token): a fresh salt defeats prefix caching instead.
            text = "the picture shows a shape " * (w // 5)
            seconds, tokens[w] = timed_request(client, model, [{"role": "user", "content": text}],
                                               cache_salt=f"{nonce.random():.12f}")
            if r:  # round 0 warms up
                samples[w].append(seconds)
    xs = np.array([tokens[w] for w in words], dtype=float)
    ys = np.array([statistics.median(samples[w]) for w in words])
    per_token, fixed = np.polyfit(xs, ys, 1)
    return {"points": [{"prompt_tokens": int(x), "median_s": float(y)} for x, y in zip(xs, ys)],
            "fixed_s": float(fixed), "per_token_s": float(per_token), "rounds": rounds}


def paired_arms(ratios, methods) -> list[tuple]:
    """(ratio, method) per arm: keep 1.0 once (nothing is pruned, whatever the method), then
    every method at every other ratio."""
    return [(1.0, None)] + [(ratio, method) for method in methods for ratio in ratios if ratio != 1.0]


def paired_messages(variant: str | None, size: int, rng: np.random.Generator) -> Iterator[list[dict]]:
    """Fresh images, one per request: held-out testbed scenes of ``variant`` (indices drawn
    from ``rng``, so two runs against one server share no image but by a rare chance), each
    asked the variant's first question, so that prompts differ only in their image tokens; or
    random noise."""
    from vllm_tokenprune.testbed import tasks
    from vllm_tokenprune.testbed.synthetic import SPLITS

    start, stop = SPLITS["test"]
    while True:
        if variant is None:
            yield image_messages(random_image(rng, size))
        else:
            item = tasks.item(variant, "test", int(rng.integers(stop - start)), tasks.kinds(variant)[0])
            yield image_question(image_url(item.scene.image), item.question)


def measure_paired(client, model: str, arms: list[tuple], rounds: int, messages: Iterator[list[dict]]) -> dict:
    seconds: dict[tuple, list[float]] = {arm: [] for arm in arms}
    tokens: dict[tuple, list[int]] = {arm: [] for arm in arms}
    for r in range(rounds + 1):  # round 0 warms up
        shift = r % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            s, t = timed_request(client, model, next(messages), prune_headers(*arm))
            if r:
                seconds[arm].append(s)
                tokens[arm].append(t)
    base = seconds[arms[0]]
    cells = []
    for arm in arms:
        paired = [b / s for b, s in zip(base, seconds[arm])]
        cells.append({"keep_ratio": arm[0], "method": arm[1], "prompt_tokens": statistics.median(tokens[arm]),
                      "median_s": statistics.median(seconds[arm]),
                      "p90_s": float(np.percentile(seconds[arm], 90)),
                      "speedup_median_paired": statistics.median(paired)})
    return {"rounds": rounds, "cells": cells}


def measure_parts(model: str, selector: str | None, dtype: str, rounds: int, size: int,
                  rng: np.random.Generator) -> dict:
    """Vision tower forward and selector per image, medians of interleaved rounds, each on
    a fresh image: the tower in the serving dtype, the selector in float32 (as the server
    runs both). Without a selector checkpoint an untrained one of the same shape is timed."""
    import torch

    from vllm_tokenprune.selection.selector import SelectorConfig, TokenSelector, load_selector
    from vllm_tokenprune.tools.timing import interleaved
    from vllm_tokenprune.training.features import load_tower

    tower = load_tower(model, dtype=getattr(torch, dtype))
    with torch.inference_mode():
        state = {"features": tower([random_image(rng, size)])[0]}  # the feature width
    scorer = (load_selector(selector)[0] if selector
              else TokenSelector(SelectorConfig(feature_dim=state["features"].shape[-1]))).eval()

    def fresh_image():
        state["inputs"] = tower.preprocess([random_image(rng, size)])

    def forward():
        state["features"] = tower.forward(state["inputs"])[0]

    medians = interleaved({"tower": forward, "selector": lambda: scorer.scores(state["features"])}, rounds,
                          prepare=fresh_image)
    tower_s, selector_s, features = medians["tower"], medians["selector"], state["features"]
    return {"tower_dtype": dtype, "rounds": rounds, "tokens": features.shape[0], "feature_dim": features.shape[1],
            "trained_selector": selector is not None, "tower_s": tower_s, "selector_s": selector_s,
            "selector_of_tower": selector_s / tower_s}


def serving_dtype(model: str, serve_args: list[str]) -> str:
    """The dtype vLLM serves ``model`` in: ``--dtype`` if given, else from the checkpoint's."""
    for i, arg in enumerate(serve_args):
        if arg.startswith("--dtype"):
            value = arg.partition("=")[2] or serve_args[i + 1]
            if value != "auto":
                return {"half": "float16", "float": "float32"}.get(value, value)
    config = json.loads((Path(model) / "config.json").read_text())
    found = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    # vLLM's "auto" serves float32 checkpoints in its platform's preferred dtype (bfloat16).
    return "bfloat16" if found in (None, "float32") else found


def ideal_speedup(full_s: float, full_tokens: float, tokens: float, *, tower_s: float = 0.0,
                  selector_s: float = 0.0) -> float:
    """What the token count allows: of the keep-1.0 latency ``full_s``, the vision tower
    stays, the selector is added, and everything else is taken to scale with prompt tokens
    (every fixed cost but the tower counted as prefill: an upper bound for a prefill-bound
    model, free of any fitted constant). With no parts timed: full_tokens / tokens."""
    return full_s / (tower_s + selector_s + (full_s - tower_s) * tokens / full_tokens)


def add_limits(report: dict) -> None:
    """Ideal speedup and the fraction achieved, for the paired cells and every sweep cell
    (the selector's time counted for the methods that score with one)."""
    from vllm_tokenprune.selection import methods

    parts = report.get("parts") or {}

    def ideal(full_s, full_tokens, tokens, method):
        scored = method is not None and methods.get(method).uses_selector and tokens < full_tokens
        return ideal_speedup(full_s, full_tokens, tokens, tower_s=parts.get("tower_s", 0.0),
                             selector_s=parts.get("selector_s", 0.0) if scored else 0.0)

    cells = report["paired"]["cells"]
    for cell in cells:
        cell["ideal_speedup"] = ideal(cells[0]["median_s"], cells[0]["prompt_tokens"], cell["prompt_tokens"],
                                      cell["method"])
        cell["fraction_of_ideal"] = cell["speedup_median_paired"] / cell["ideal_speedup"]
    sweep = report.get("sweep") or []
    by_key = {(x["concurrency"], x["method"], x["keep_ratio"]): x for x in sweep}
    for x in sweep:
        base = by_key[(x["concurrency"], x["method"], 1.0)]
        x["ttft_speedup"] = base["median_ttft_ms"] / x["median_ttft_ms"]
        x["throughput_ratio"] = x["request_throughput"] / base["request_throughput"]
        x["ideal_speedup"] = ideal(base["median_ttft_ms"] / 1e3, base["prompt_tokens_per_request"],
                                   x["prompt_tokens_per_request"], x["method"])
        x["ttft_fraction_of_ideal"] = x["ttft_speedup"] / x["ideal_speedup"]


# ---------------------------------------------------------------------------------------
# The sweep, with vLLM's own benchmark client


def run_vllm_bench(root: str, model_name: str, tokenizer: str, *, ratio: float, method: str,
                   concurrency: int, prompts: int, size: int, text_tokens: int,
                   output_tokens: int, seed: int) -> dict:
    from vllm_tokenprune.tools.vllm_cli import run_vllm_cli

    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
            "--base-url", root, "--model", model_name, "--tokenizer", tokenizer,
            "--dataset-name", "random-mm",
            "--random-mm-bucket-config", f"{{({size}, {size}, 1): 1.0}}",
            "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
            "--random-mm-base-items-per-request", "1",
            "--random-mm-num-mm-items-range-ratio", "0",
            "--random-input-len", str(text_tokens), "--random-output-len", str(output_tokens),
            "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--ignore-eos",  # every request decodes exactly output_tokens
            "--header", f"x-keep-ratio={ratio}", f"x-prune-method={method}",
            "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99",
            "--seed", str(seed), "--save-result", "--result-dir", tmp,
            "--result-filename", "result.json",
        ]
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            code = run_vllm_cli(argv)
        if code:
            raise RuntimeError(f"vllm bench serve failed ({code}):\n{log.getvalue()[-3000:]}")
        result = json.loads((Path(tmp) / "result.json").read_text())
    keys = ("completed", "failed", "duration", "total_input_tokens", "request_throughput",
            "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
            "p99_tpot_ms", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms")
    cell = {k: result.get(k) for k in keys}
    cell.update(keep_ratio=ratio, method=method, concurrency=concurrency,
                prompt_tokens_per_request=result["total_input_tokens"] / max(1, result["completed"]))
    return cell


def run_sweep(root, model_name, tokenizer, ratios, methods, concurrencies, args, seed) -> list:
    from tqdm import tqdm

    cells = [(c, r, m) for c in concurrencies for m in methods for r in ratios]
    results = []
    for i, (c, r, m) in enumerate(tqdm(cells, desc="sweep", unit="cell")):
        prompts = args.prompts_per_cell or max(16, 2 * c)
        results.append(run_vllm_bench(
            root, model_name, tokenizer, ratio=r, method=m, concurrency=c, prompts=prompts,
            size=args.image_size, text_tokens=args.text_tokens, output_tokens=args.output_tokens,
            seed=seed + i))  # a fresh image set per cell: no cache hits across cells
    return results


# ---------------------------------------------------------------------------------------
# Soak


async def _soak(url: str, model: str, seconds: float, concurrency: int, ratios, methods,
                size: int, seed: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    bad_headers = [{"X-Keep-Ratio": "nan"}, {"X-Keep-Ratio": "0"}, {"X-Keep-Ratio": "2"},
                   {"X-Prune-Method": "magic"}, {"X-Keep-Ratio": "x" * 500}]
    counts = {"good_ok": 0, "good_failed": 0, "bad_rejected": 0, "bad_other": 0}
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    async def worker(wid: int):
        rng = np.random.default_rng(seed + wid)
        pick = random.Random(seed + wid)
        while time.monotonic() < deadline:
            bad = pick.random() < 0.05
            headers = pick.choice(bad_headers) if bad else prune_headers(
                pick.choice(ratios), pick.choice(methods))
            try:
                await client.chat.completions.create(
                    model=model, messages=image_messages(random_image(rng, size)),
                    max_tokens=4, extra_headers=headers)
                outcome = "bad_other" if bad else "good_ok"
            except openai.BadRequestError as err:
                outcome = "bad_rejected" if bad else "good_failed"
                if not bad:
                    errors.append(repr(err)[:300])
            except openai.OpenAIError as err:
                outcome = "bad_other" if bad else "good_failed"
                errors.append(repr(err)[:300])
            counts[outcome] += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"seconds": seconds, "concurrency": concurrency, **counts,
            "good": counts["good_ok"] + counts["good_failed"],
            "bad": counts["bad_rejected"] + counts["bad_other"], "errors": errors[:10]}


def run_soak(url, model, seconds, ratios, methods, size, seed, server=None) -> dict:
    rss_start = server.rss_bytes() if server else None
    result = asyncio.run(_soak(url, model, seconds, 16, ratios, methods, size, seed))
    if server:
        result["rss_start_bytes"], result["rss_end_bytes"] = rss_start, server.rss_bytes()
    return result


def write_report(report: dict, out: Path) -> None:
    add_limits(report)
    write_results(out, report, markdown(report))
    if report.get("sweep"):
        plot(report, out / "ttft_throughput.png")
    print(f"results in {out}")


def run(args: argparse.Namespace) -> int:
    if args.render:
        write_report(json.loads((args.render / "results.json").read_text()), args.render)
        return 0
    if not args.model:
        from vllm_tokenprune.tools.serve import default_model

        args.model, selector = map(str, default_model())
        args.selector = args.selector or selector
    from vllm_tokenprune.tools.launcher import LaunchError, sigterm_interrupts, target
    from vllm_tokenprune.tools.serve import has_option

    if args.against_stock and has_option(args.extra_args, "--port"):
        raise LaunchError("--port: --against-stock starts two servers, each on a free port")
    record = stamp("vllm-tokenprune", args.argv, args.allow_dirty)
    import openai

    ratios = [r if r.startswith("auto") else float(r) for r in args.ratios.split(",")]
    if ratios[0] != 1.0:
        ratios.insert(0, 1.0)  # everything is compared with keep 1.0
    numbers = [r for r in ratios if isinstance(r, float)]
    methods = (args.methods.split(",") if args.methods
               else ["learned", "random", "norm"] if args.selector else ["random", "norm"])
    paired_methods = args.paired_methods.split(",") if args.paired_methods else methods[:1]
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    seed = args.seed if args.seed is not None else int(time.time())
    rng = np.random.default_rng(seed)
    out = args.out or Path("benchmarks/results") / f"{Path(args.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    if args.against_stock:
        with sigterm_interrupts():  # its servers stop on SIGTERM too
            return overhead.run(args, out, seed, record)
    if args.workload:
        return workload.run(args, out, record)

    serve_args = [*args.extra_args] + (["--selector", args.selector] if args.selector else [])
    with target(args.url, args.model, serve_args, out / "server.log") as (root, model_name, server):
        client = openai.OpenAI(base_url=root + "/v1", api_key="unused", max_retries=0, timeout=600)
        report = {**record, "environment": environment(args.model), "seed": seed,
                  "startup_s": server.startup_s if server else None}
        print("prefill line ...", flush=True)
        report["prefill"] = measure_prefill_line(client, model_name, args.prefill_rounds)
        print("vision tower and selector ...", flush=True)
        report["parts"] = measure_parts(args.model, args.selector, serving_dtype(args.model, args.extra_args),
                                        args.parts_rounds, args.image_size, rng)
        print("paired single-client latency ...", flush=True)
        report["paired"] = measure_paired(client, model_name, paired_arms(ratios, paired_methods),
                                          args.paired_rounds, paired_messages(args.paired_images, args.image_size, rng))
        report["paired"]["images"] = args.paired_images or f"random noise, {args.image_size} px"
        if concurrencies:
            report["sweep"] = run_sweep(root, model_name, args.model, numbers, methods,
                                        concurrencies, args, seed)
        if args.soak_seconds:
            print(f"soak for {args.soak_seconds:.0f} s ...", flush=True)
            report["soak"] = run_soak(root + "/v1", model_name, args.soak_seconds, ratios,
                                      methods, args.image_size, seed, server)

    write_report(report, out)
    soak = report.get("soak", {})
    return 1 if soak.get("good_failed") or soak.get("bad_other") else 0
