"""Per-request latency at each keep ratio against a running server, one client.

Ratios are interleaved round by round (A B C D A B C D ...) so that the host's slow
stretches hit every ratio alike, every request uses a fresh image (no encoder or prefix
cache hits), and the report gives medians and each ratio's median ratio to keep 1.0.

    python benchmarks/ratio_latency.py --url http://127.0.0.1:8000/v1 --rounds 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import openai
from PIL import Image

from vllm_tokenprune.client import image_url, prune_headers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="OpenAI base URL, e.g. http://host:8000/v1")
    parser.add_argument("--model", help="served model name (default: the server's first)")
    parser.add_argument("--ratios", default="1.0,0.5,0.25,0.1")
    parser.add_argument("--method", default=None, help="X-Prune-Method (default: server's)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--size", type=int, default=336, help="image side in pixels")
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the JSON report here too")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.url, api_key="unused", max_retries=0)
    model = args.model or client.models.list().data[0].id
    ratios = [float(r) for r in args.ratios.split(",")]
    rng = np.random.default_rng(int(time.time()))
    seconds: dict[float, list[float]] = {r: [] for r in ratios}
    prompt_tokens: dict[float, int] = {}
    for _ in range(args.rounds + 1):  # round 0 warms up and is discarded
        for ratio in ratios:
            pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
            headers = prune_headers(ratio, args.method)
            start = time.perf_counter()
            out = client.chat.completions.create(
                model=model, max_tokens=args.max_tokens, temperature=0, extra_headers=headers,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_url(Image.fromarray(pixels))}},
                    {"type": "text", "text": "Describe the image."}]}])
            seconds[ratio].append(time.perf_counter() - start)
            prompt_tokens[ratio] = out.usage.prompt_tokens
    report = {"model": model, "rounds": args.rounds, "max_tokens": args.max_tokens, "cells": []}
    base = statistics.median(seconds[ratios[0]][1:])
    print(f"{'ratio':>6} {'prompt tok':>10} {'median ms':>10} {'p90 ms':>8} {'vs first':>8}")
    for ratio in ratios:
        s = seconds[ratio][1:]
        median = statistics.median(s)
        p90 = float(np.percentile(s, 90))
        report["cells"].append({"keep_ratio": ratio, "prompt_tokens": prompt_tokens[ratio],
                                "median_s": median, "p90_s": p90, "speedup": base / median})
        print(f"{ratio:>6} {prompt_tokens[ratio]:>10} {median * 1e3:>10.1f} {p90 * 1e3:>8.1f} "
              f"{base / median:>7.2f}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
