"""What keep ratio auto costs the API server: the budget predictor per image, and a
request's multimodal processing with auto against a fixed ratio.

    PYTHONPATH=. python benchmarks/budget_cost.py --out benchmarks/results/budget-cost

One thread, CPU time of this thread (``time.thread_time``), rounds interleaved, a fresh
image every round (no cache can answer).

1. The predictor alone (``BudgetPredictor.fractions``: thumbnail + forward), per image of
   336 x 336 (LLaVA-1.5's size), 1024 x 768 and 4000 x 3000 pixels.
2. What the API server does per image request that pruning touches: decode the client's
   PNG, then vLLM's multimodal processor (the pruned LLaVA's, HF image processor included)
   at ``keep_ratio`` 0.25 and at ``auto``, paired round by round. The rest of the API
   server's per-request work (HTTP, JSON, base64, chat template, detokenizing) is the same
   for both, so the paired ratio here bounds the whole API server's relative increase from
   above.
3. The whole API server: a real ``vllm-tokenprune serve`` of the same model, one client
   sending chat requests with a fresh 336 px PNG at keep 0.25 and at ``auto`` in
   alternating order, answers of 1 token (the API server's least work per request, so the
   largest share for the predictor) and of 32; the CPU time the API server process spends on each
   request, read around it from the scheduler's per-thread counters (nanoseconds; the
   per-process tick counters are too coarse for a request). The engine core is another process
   and not counted.

The model is the tiny test LLaVA with its image side raised to 336 px, so its processor
does LLaVA-1.5's work (576 tokens). The predictor says 0.25 for every image
(``fixed_predictor``), so both arms keep the same K and carry prompts of the same length
through the API server: the rounds differ by the predictor's work alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vllm_tokenprune.selection.budget import BudgetConfig, BudgetPredictor, section
from vllm_tokenprune.tools.provenance import add_allow_dirty, stamp

SIZES = ((336, 336), (1024, 768), (4000, 3000))


def random_png(size: tuple[int, int], rng: np.random.Generator) -> bytes:
    """A photo-like (smooth plus noise) PNG, as a client would send it."""
    w, h = size
    small = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    pixels = np.clip(np.asarray(image, np.int16) + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def cpu_ms(fn) -> float:
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1e3


def predictor_cost(rounds: int, rng: np.random.Generator) -> dict[str, float]:
    predictor = BudgetPredictor(BudgetConfig(log_tokens=[5.0, 7.0])).eval()
    images = {size: Image.open(io.BytesIO(random_png(size, rng))).convert("RGB") for size in SIZES}
    times = {size: [] for size in SIZES}
    for _ in range(rounds):
        for size, image in images.items():
            fresh = image.copy()  # no cached decode or resize
            times[size].append(cpu_ms(lambda im=fresh: predictor.fractions([im], [576])))
    return {f"{w}x{h}": statistics.median(t) for (w, h), t in times.items()}


def processor_cost(model: Path, selector: Path, rounds: int, rng: np.random.Generator) -> dict:
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from vllm_tokenprune.serving import plugin

    plugin.register()
    config = ModelConfig(model=str(model), hf_overrides={"architectures": ["PrunedLlavaForConditionalGeneration"],
                                                         "tokenprune_selector": str(selector)})
    proc = MULTIMODAL_REGISTRY.create_processor(config)

    def request(png: bytes, ratio) -> None:
        image = Image.open(io.BytesIO(png)).convert("RGB")
        proc("<image>\nhi", proc.info.parse_mm_data({"image": [image]}), hf_processor_mm_kwargs={"keep_ratio": ratio})

    fixed, auto = [], []
    request(random_png((336, 336), rng), "auto")  # loads the predictor, warms up
    for r in range(rounds):
        pngs = [random_png((336, 336), rng) for _ in range(2)]
        order = [("fixed", 0.25), ("auto", "auto")] if r % 2 == 0 else [("auto", "auto"), ("fixed", 0.25)]
        got = {name: cpu_ms(lambda png=png, ratio=ratio: request(png, ratio))
               for (name, ratio), png in zip(order, pngs)}
        fixed.append(got["fixed"])
        auto.append(got["auto"])
    return paired(fixed, auto)


def process_cpu_ns(pid: int) -> int:
    """CPU time of a process's live threads so far (Linux ``/proc/PID/task/*/schedstat``)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError):  # a thread that just ended
            total += int(stat.read_text().split()[0])
    return total


def api_server_cost(model: Path, selector: Path, rounds: int, rng: np.random.Generator, log: Path,
                    output_tokens: tuple[int, ...] = (1, 32)) -> dict:
    import openai

    from vllm_tokenprune.tools.client import image_url, prune_headers
    from vllm_tokenprune.tools.launcher import Server

    def request(ratio, tokens: int) -> float:
        image = Image.open(io.BytesIO(random_png((336, 336), rng)))
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(image)}},
                                                 {"type": "text", "text": "Describe the image."}]}]
        before = process_cpu_ns(server.proc.pid)
        client.chat.completions.create(model="cost", messages=messages, max_tokens=tokens, temperature=0,
                                       extra_body={"ignore_eos": True}, extra_headers=prune_headers(ratio))
        return (process_cpu_ns(server.proc.pid) - before) / 1e6

    out = {}
    with Server(model, "--selector", str(selector), "--served-model-name", "cost", log_path=log) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        for _ in range(4):  # warm-up: the predictor's first call, the processor cache misses
            request(0.25, 1), request("auto", 1)
        runs = {(tokens, ratio): [] for tokens in output_tokens for ratio in ("0.25", "auto")}
        for r in range(rounds):
            for tokens in output_tokens:
                for ratio in ([0.25, "auto"] if r % 2 == 0 else ["auto", 0.25]):
                    runs[(tokens, str(ratio))].append(request(ratio, tokens))
    for tokens in output_tokens:
        out[f"{tokens}_output_tokens"] = paired(runs[(tokens, "0.25")], runs[(tokens, "auto")])
    return out


def paired(fixed: list[float], auto: list[float]) -> dict:
    """Medians of each arm and of the rounds' ratios and differences (a round's two requests
    ran back to back, so the host's slow spells fall on both)."""
    return {"fixed_ms": statistics.median(fixed), "auto_ms": statistics.median(auto),
            "auto_over_fixed": statistics.median(a / f for a, f in zip(auto, fixed)),
            "auto_minus_fixed_ms": statistics.median(a - f for a, f in zip(auto, fixed)), "rounds": len(fixed)}


def fixed_predictor(fraction: float) -> BudgetPredictor:
    """A predictor of random weights whose output layer is zeroed to say ``fraction`` for
    every image: auto then keeps the same K as that fixed ratio, so the two arms of a paired
    round differ only by the predictor's work (which does not depend on the weights)."""
    torch.manual_seed(0)
    predictor = BudgetPredictor(BudgetConfig(log_tokens=[6.0, 6.5]))
    with torch.no_grad():
        predictor.head[2].weight.zero_()
        predictor.head[2].bias.fill_(math.log(fraction / (1 - fraction)))
    return predictor.eval()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out", type=Path, help="folder for results.json and results.md")
    add_allow_dirty(parser)
    args = parser.parse_args(argv)
    record = stamp(Path(__file__), argv, args.allow_dirty) if args.out else {}
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)

    from transformers import AutoConfig

    from vllm_tokenprune.selection.selector import SelectorConfig, TokenSelector, vision_signature
    from vllm_tokenprune.testbed.tiny import PRESETS, build_tiny
    from vllm_tokenprune.training.reconstruction import save_selector

    PRESETS["test-336"] = dataclasses.replace(PRESETS["test"], image_size=336, probe_size=(336, 336))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny("llava", Path(tmp) / "model", seed=0, preset="test-336")
        signature = vision_signature(AutoConfig.from_pretrained(model))
        selector = Path(tmp) / "selector.safetensors"
        save_selector(selector, TokenSelector(SelectorConfig(signature["feature_dim"], width=32, num_layers=1)),
                      budget=section(fixed_predictor(0.25), {}),
                      metadata={"source_model": str(model), "feature_layer": signature["vision_feature_layer"],
                                "vision_signature": signature})
        results = {**record, "predictor_ms_per_image": predictor_cost(args.rounds, rng),
                   "processor_per_request": processor_cost(model, selector, args.rounds, rng),
                   "api_server_per_request": api_server_cost(model, selector, args.rounds, rng,
                                                             Path(tmp) / "server.log"),
                   "machine": platform.processor() or platform.machine(), "torch_threads": 1}
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        p, q, a = (results[k] for k in ("predictor_ms_per_image", "processor_per_request", "api_server_per_request"))
        (args.out / "results.md").write_text(
            "| measurement | CPU ms (median) |\n| --- | --- |\n"
            + "".join(f"| predictor, {size} image | {ms:.2f} |\n" for size, ms in p.items())
            + f"| PNG decode + processor, 336 px, keep 0.25 | {q['fixed_ms']:.2f} |\n"
            + f"| PNG decode + processor, 336 px, auto | {q['auto_ms']:.2f} |\n"
            + "".join(f"| API server process, chat request with a 336 px PNG, {n.replace('_', ' ')}, "
                      f"{name} | {c[key]:.2f} |\n" for n, c in a.items()
                      for name, key in (("keep 0.25", "fixed_ms"), ("auto", "auto_ms")))
            + f"\nauto against keep 0.25 per request, medians of {q['rounds']} paired rounds (ratio; "
            + f"difference): processor {q['auto_over_fixed']:.3f}; {q['auto_minus_fixed_ms']:+.2f} ms; "
            + "whole API server "
            + ", ".join(f"{c['auto_over_fixed']:.3f}; {c['auto_minus_fixed_ms']:+.2f} ms ({n.replace('_', ' ')})"
                        for n, c in a.items())
            + " (target: a ratio of at most 1.03)\n")


if __name__ == "__main__":
    main()
