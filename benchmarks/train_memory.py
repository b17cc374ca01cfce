"""Peak memory of `vllm-tokenprune train` on folders of N, 10 N, 20 N and 40 N images.

Training streams its features from shards on disk (``training.stream``) and fits the
budget predictor on a bounded sample (``--budget-images``), so its memory should follow the
batch, shard, round and sample settings, not the folder's size: it grows while the folder
is smaller than what those settings hold (two rounds of shards, the predictor's sample) and
is flat beyond. This runs the real command, with train's defaults except a short run (20
steps of 8) on one thread, on a tiny LLaVA (``testbed.tiny``) and generated images
(``testbed.synthetic.write_image_folder``), each run in a fresh process, per folder:

- cold: on an empty feature cache, so the run extracts the features, then trains;
- warm: the same command again, training from the stored features (no tower).

A run's peak is its process's maximum resident set (``os.wait4``'s ru_maxrss, that
child's alone). For contrast it reports what the stored features would take held in
memory at once, and how many images the settings let training hold.

    PYTHONPATH=. python benchmarks/train_memory.py --out benchmarks/results/train-memory

About 15 minutes on one core with the defaults; writes results.json and memory.png.
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

from vllm_tokenprune.tools.provenance import add_allow_dirty, environment, stamp

# train's defaults (shards of 256 images, rounds of 8 shards, the predictor's sample of
# 4,096, at most 1,000 held out), but a short run: a round is read whole whatever the steps.
TRAIN_ARGS = ("--steps", "20", "--batch-size", "8", "--threads", "1", "--feature-workers", "1", "--no-progress")
SCALES = (1, 10, 20, 40)
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


def held_by_settings(train_images: int, held_out: int, args) -> dict:
    """Images whose data the settings let a run hold at once: the shuffle window (the round
    drawn from, the next one and a shard being read), the budget predictor's sample and
    the held-out images' thumbnails."""
    from vllm_tokenprune.training.train import TrainConfig

    defaults = TrainConfig()
    value = {name: getattr(defaults, name) for name in ("shard_images", "shuffle_shards", "budget_images")}
    for name in value:  # flags given override the defaults
        flag = "--" + name.replace("_", "-")
        if flag in args:
            value[name] = int(args[args.index(flag) + 1])
    window = (2 * value["shuffle_shards"] + 1) * value["shard_images"]
    return {"shuffle_window": min(train_images, window), "budget_sample": min(train_images, value["budget_images"]),
            "held_out": held_out}


def measure(model: Path, work: Path, n: int, *, scales=SCALES, train_args=TRAIN_ARGS) -> dict:
    """Cold and warm train runs on folders of scale x n images under ``work``, per scale."""
    from vllm_tokenprune.testbed.synthetic import write_image_folder
    from vllm_tokenprune.training.train import TrainConfig, split_indices

    runs = {}
    for scale in scales:
        images = scale * n
        folder = work / f"images-{images}"
        if not folder.is_dir():
            write_image_folder(folder, images, seed=0, size=168)
        cache = work / f"cache-{images}"
        cmd = [sys.executable, "-m", "vllm_tokenprune.cli", "train", "--model", str(model),
               "--images", str(folder), "--out", str(work / f"selector-{images}.safetensors"),
               "--cache-dir", str(cache), *train_args]
        shutil.rmtree(cache, ignore_errors=True)  # the cold run starts from an empty cache
        run = {phase: peak_rss(cmd, work / f"train-{images}-{phase}.log") for phase in ("cold", "warm")}
        train, held = split_indices(images, TrainConfig.holdout, TrainConfig.seed, TrainConfig.max_heldout)
        runs[str(images)] = {"images": images, "scale": scale, **run, "features": stored_features(cache),
                             "held_by_settings": held_by_settings(len(train), len(held), list(train_args))}
    first = runs[str(scales[0] * n)]
    return {
        "train_command": shlex.join(["vllm-tokenprune", "train", "--model", "MODEL", "--images", "FOLDER",
                                     "--out", "OUT", "--cache-dir", "CACHE", *train_args]),
        "n": n, "scales": list(scales), "runs": runs,
        "ratio_to_first": {images: {phase: round(r[phase]["peak_rss_mib"] / first[phase]["peak_rss_mib"], 3)
                                    for phase in ("cold", "warm")} for images, r in runs.items()},
    }


def table(report: dict) -> str:
    lines = ["| images | shuffle window / predictor sample / held out (images) | features if all in memory MiB "
             "| cold run (extract + train) peak RSS MiB | warm run (train) peak RSS MiB | warm / first |",
             "| --- | --- | --- | --- | --- | --- |"]
    for images, r in report["runs"].items():
        held = r["held_by_settings"]
        lines.append(f"| {r['images']} | {held['shuffle_window']} / {held['budget_sample']} / {held['held_out']} "
                     f"| {r['features']['all_in_memory_mib']:.1f} | {r['cold']['peak_rss_mib']:.1f} "
                     f"| {r['warm']['peak_rss_mib']:.1f} | {report['ratio_to_first'][images]['warm']:.3f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(report["runs"].values())
    images = [r["images"] for r in runs]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for key, label in (("cold", "cold: extract + train"), ("warm", "warm: train")):
        ax.plot(images, [r[key]["peak_rss_mib"] for r in runs], "o-", label=f"peak RSS, {label}")
    ax.plot(images, [r["features"]["all_in_memory_mib"] for r in runs], "s--", color="gray",
            label="the features, if all in memory")
    ax.set_xlabel("images in the folder")
    ax.set_ylabel("MiB")
    last = report["ratio_to_first"][str(images[-1])]["warm"]
    ax.set_title(f"vllm-tokenprune train: peak RSS; {images[-1]} / {images[0]} images = {last:.2f} (warm)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="images in the smallest folder")
    parser.add_argument("--scales", type=int, nargs="+", default=list(SCALES),
                        help="folders of scale x n images, one per scale")
    parser.add_argument("--work", type=Path, default=Path(".cache/train-memory"),
                        help="model, image folders and feature caches (reused: images and model)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and memory.png")
    add_allow_dirty(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    record = stamp(Path(__file__), argv, args.allow_dirty) if args.out else {}

    from vllm_tokenprune.testbed.tiny import build_tiny

    model = args.work / "model"
    if not (model / "config.json").is_file():
        build_tiny("llava", model, seed=0)
    report = {**record, **measure(model.resolve(), args.work.resolve(), args.n, scales=args.scales),
              "environment": environment(str(model))}
    print(table(report))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        plot(report, args.out / "memory.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
