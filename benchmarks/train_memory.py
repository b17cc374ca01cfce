"""Peak memory of `vllm-tokenprune train` on a folder of N images and on one of 10 N.

Training streams its features from shards on disk (``training.stream``), so its memory
should follow the batch, shard and round settings, not the folder's size. This runs the
real command on a tiny LLaVA (``testbed.tiny``) and generated images
(``testbed.synthetic.write_image_folder``), each run in a fresh process, per folder:

- cold: on an empty feature cache, so the run extracts the features, then trains;
- warm: the same command again, training from the stored features (no tower).

Both folders train the same steps with the same settings; only the number of images (and
so the stored shards and the held-out split) differs. A run's peak is its process's
maximum resident set (``os.wait4``'s ru_maxrss, that child's alone). For contrast it
reports what the stored features would take held in memory at once.

    PYTHONPATH=. python benchmarks/train_memory.py --out benchmarks/results/train-memory

About 4 minutes on one core with the defaults; writes results.json and memory.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Same settings for both folders, scaled down with them: shards of 32 images taken 2 at a
# time make a round of 64, so even the small folder spans several rounds and both hold the
# same bounded window (at most two rounds). 256 steps of 16 are about one pass over the
# large folder's 4120 training images and ten over the small one's 410.
TRAIN_ARGS = ("--steps", "256", "--batch-size", "16", "--eval-every", "64", "--shard-images", "32",
              "--shuffle-shards", "2", "--threads", "1", "--feature-workers", "1", "--no-progress")
ROOT = Path(__file__).resolve().parents[1]
FEATURE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def peak_rss(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` to completion; its peak resident set (MiB) and seconds."""
    start = time.perf_counter()
    with log.open("w") as out:
        # The package of this checkout, whatever the environment has installed.
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
        # wait4, not getrusage(RUSAGE_CHILDREN): the latter is the maximum over every child
        # waited for so far, so a small run after a large one would report the large one.
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "seconds": round(time.perf_counter() - start, 1)}


def stored_features(cache: Path) -> dict:
    """Images, tokens and bytes of every feature store under ``cache`` (training and held-out)."""
    images = tokens = nbytes = 0
    for index in cache.glob("*/index.json"):
        store = json.loads(index.read_text())
        n = sum(shard["tokens"] for shard in store["shards"])
        images += store["num_images"]
        tokens += n
        nbytes += n * store["info"]["feature_dim"] * FEATURE_BYTES[store["dtype"]]
    return {"images": images, "tokens": tokens, "all_in_memory_mib": round(nbytes / 2**20, 1)}


def measure(model: Path, work: Path, n: int, *, scale: int = 10, train_args=TRAIN_ARGS) -> dict:
    """Cold and warm train runs on folders of n and scale x n images under ``work``."""
    from vllm_tokenprune.testbed.synthetic import write_image_folder

    runs = {}
    for images in (n, scale * n):
        folder = work / f"images-{images}"
        if not folder.is_dir():
            write_image_folder(folder, images, seed=0, size=168)
        cache = work / f"cache-{images}"
        cmd = [sys.executable, "-m", "vllm_tokenprune.cli", "train", "--model", str(model),
               "--images", str(folder), "--out", str(work / f"selector-{images}.safetensors"),
               "--cache-dir", str(cache), *train_args]
        shutil.rmtree(cache, ignore_errors=True)  # the cold run starts from an empty cache
        run = {phase: peak_rss(cmd, work / f"train-{images}-{phase}.log") for phase in ("cold", "warm")}
        runs[str(images)] = {"images": images, **run, "features": stored_features(cache)}
    small, large = runs[str(n)], runs[str(scale * n)]
    return {
        "command": shlex.join(["vllm-tokenprune", "train", "--model", "MODEL", "--images", "FOLDER",
                               "--out", "OUT", "--cache-dir", "CACHE", *train_args]),
        "n": n, "scale": scale, "runs": runs,
        "ratio": {phase: round(large[phase]["peak_rss_mib"] / small[phase]["peak_rss_mib"], 3)
                  for phase in ("cold", "warm")},
    }


def table(report: dict) -> str:
    lines = ["| images | features if all in memory MiB | cold run (extract + train) peak RSS MiB | "
             "warm run (train) peak RSS MiB |", "| --- | --- | --- | --- |"]
    for r in report["runs"].values():
        lines.append(f"| {r['images']} | {r['features']['all_in_memory_mib']:.1f} | {r['cold']['peak_rss_mib']:.1f} "
                     f"| {r['warm']['peak_rss_mib']:.1f} |")
    ratio = report["ratio"]
    lines.append(f"| {report['scale']} N / N | | {ratio['cold']:.3f} | {ratio['warm']:.3f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(report["runs"].values())
    labels = ["cold: extract + train", "warm: train", "features if all in memory"]
    values = [[r["cold"]["peak_rss_mib"], r["warm"]["peak_rss_mib"], r["features"]["all_in_memory_mib"]] for r in runs]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / len(runs)
    for i, (r, v) in enumerate(zip(runs, values)):
        bars = ax.bar([x + i * width for x in range(len(labels))], v, width, label=f"{r['images']} images")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_ylabel("MiB")
    ax.set_title(f"vllm-tokenprune train: peak RSS, {report['scale']} N / N = {report['ratio']['warm']:.2f} (warm)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="images in the small folder")
    parser.add_argument("--scale", type=int, default=10, help="the large folder holds scale x n images")
    parser.add_argument("--work", type=Path, default=Path(".cache/train-memory"),
                        help="model, image folders and feature caches (reused: images and model)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and memory.png")
    args = parser.parse_args(argv)

    from vllm_tokenprune.testbed.tiny import build_tiny
    from vllm_tokenprune.tools.provenance import environment

    model = args.work / "model"
    if not (model / "config.json").is_file():
        build_tiny("llava", model, seed=0)
    report = measure(model.resolve(), args.work.resolve(), args.n, scale=args.scale)
    report["environment"] = {**environment(str(model)), "command": shlex.join(["python", *sys.argv])}
    print(table(report))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        plot(report, args.out / "memory.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
