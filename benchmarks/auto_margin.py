"""How many tokens `auto` needs on the demo model, and what its budget predictor's margin buys.

    python benchmarks/auto_margin.py --out benchmarks/results/auto-margin

Offline, with transformers: the shipped demo model, its selector (the image-only one that
``learned`` serves, fitted to the model's attention) and its budget predictor. For every
test scene of the four variants, every question its task asks, answered teacher-forced
from the selector's top K tokens (greedy-correct iff every answer word is the argmax, as
the server's greedy decoding would give). Rows, each over the same scenes:

- fixed K, as keep 1.0 / 0.5 / 0.25 / 0.1 / 0.05;
- K = (1 + margin) x count + extra, with count the tokens the selector rates above an even
  share (``training.budget.above_even_share``): what the predictor is fitted to, known
  exactly (no predictor error);
- a predictor fitted to the bare count (margin 0, extra 0) on training scenes;
- the shipped predictor (margin 0.2, extra 4), K through ``keep_count`` as the server.

Writes results.json, results.md and auto-margin.png (accuracy over the four sets together
against mean image tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection.budget import load_budget_predictor, thumbnail
from vllm_tokenprune.selection.selector import load_selector
from vllm_tokenprune.testbed import tasks
from vllm_tokenprune.testbed.demo_build import Prompts
from vllm_tokenprune.testbed.demo_model import (
    DEMO_DIR,
    Batch,
    answer_logits,
    greedy_right,
    image_tokens,
    pixel_values,
)
from vllm_tokenprune.testbed.synthetic import scene_seed
from vllm_tokenprune.tools.eval import ALL_SETS
from vllm_tokenprune.tools.provenance import add_allow_dirty, stamp
from vllm_tokenprune.training.budget import above_even_share, fit_predictor, predict, share_targets

RATIOS = (1.0, 0.5, 0.25, 0.1, 0.05)
BATCH = 64


class Scenes:
    """One split's scenes of every variant: the selector's order and count, the language
    model's image tokens, thumbnails."""

    def __init__(self, model, processor, tower, selector, split: str, n: int):
        self.variants, self.scenes, order, counts, lm, thumbs = [], [], [], [], [], []
        self.content = []  # per scene, the patches holding anything a question is about
        for variant in tasks.VARIANTS:
            for start in range(0, n, BATCH):
                part = [tasks.make_scene(variant, scene_seed(split, i)) for i in range(start, min(n, start + BATCH))]
                images = [s.image for s in part]
                with torch.no_grad():
                    tokens = tower(images).tokens  # every image's tokens in turn; all have the task's N
                    scores = selector.scores(tokens.reshape(len(images), -1, tokens.shape[-1]))
                    lm.append(image_tokens(model, pixel_values(images, processor)))
                order.append(scores.argsort(dim=1, descending=True, stable=True))
                counts.append(above_even_share(scores, torch.zeros_like(scores, dtype=torch.bool)))
                thumbs += [thumbnail(im) for im in images]
                self.content += [int(s.content_patches().sum()) for s in part]
                self.scenes += part
                self.variants += [variant] * len(part)
        self.order, self.counts, self.lm = torch.cat(order), torch.cat(counts), torch.cat(lm)
        self.thumbs, self.n = np.stack(thumbs), self.lm.shape[1]


@torch.no_grad()
def accuracy(model, prompts: Prompts, data: Scenes, ks: np.ndarray) -> dict[str, float]:
    """Per variant, the share of (scene, question) answered right from each scene's top
    ks[i] tokens; and the mean image tokens."""
    right = {v: [] for v in tasks.VARIANTS}
    for start in range(0, len(data.scenes), BATCH):
        rows = range(start, min(start + BATCH, len(data.scenes)))
        items = [(i, kind) for i in rows for kind in tasks.kinds(data.variants[i])]
        batch = Batch(None, [i - start for i, _ in items],
                      [data.order[i, :int(ks[i])].sort().values for i, _ in items],
                      [data.scenes[i].question(kind) for i, kind in items],
                      [data.scenes[i].answer(kind) for i, kind in items])
        for (i, _), ok in zip(items, greedy_right(*answer_logits(model, batch, prompts, data.lm[list(rows)]))):
            right[data.variants[i]].append(ok)
    out = {v: 100 * float(np.mean(r)) for v, r in right.items()}
    out[ALL_SETS] = float(np.mean([out[v] for v in tasks.VARIANTS]))  # the variants hold equal scenes
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="test scenes per variant")
    parser.add_argument("--train-n", type=int, default=1000, help="training scenes per variant (the bare-count fit)")
    parser.add_argument("--margins", default="0,0.2", help="margins of the exact-count rows")
    parser.add_argument("--extras", default="0,2,4", help="extra tokens of the exact-count rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    add_allow_dirty(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    record = stamp(Path(__file__), argv, args.allow_dirty)
    torch.set_num_threads(args.threads)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vllm_tokenprune.training.features import load_tower

    model = LlavaForConditionalGeneration.from_pretrained(DEMO_DIR / "model", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(DEMO_DIR / "model")
    prompts, tower = Prompts(processor.tokenizer), load_tower(str(DEMO_DIR / "model"))
    selector = load_selector(DEMO_DIR / "selector.safetensors")[0].eval()
    test = Scenes(model, processor, tower, selector, "test", args.n)
    n, rows = test.n, []
    variants, counts, content = np.array(test.variants), test.counts.double(), np.array(test.content)
    follows = {"correlation": float(np.corrcoef(counts.numpy(), content)[0, 1]),
               **{v: {"count": float(counts.numpy()[variants == v].mean()),
                      "content": float(content[variants == v].mean())} for v in tasks.VARIANTS}}
    print(f"tokens above an even share against content tokens: {follows}")

    def row(name: str, ks) -> None:
        ks = np.minimum(n, np.asarray(ks, dtype=np.int64))
        acc = accuracy(model, prompts, test, ks)
        tokens = {v: float(ks[variants == v].mean()) for v in tasks.VARIANTS}
        tokens[ALL_SETS] = float(ks.mean())
        rows.append({"row": name, "accuracy": acc, "image_tokens": tokens})
        print(f"{name:40s} " + "  ".join(f"{v} {acc[v]:5.1f}/{tokens[v]:5.1f}" for v in acc), flush=True)

    for r in RATIOS:
        row(f"keep {r}", [keep_count(n, r)] * len(test.scenes))
    for margin in (float(m) for m in args.margins.split(",")):
        for extra in (float(e) for e in args.extras.split(",")):
            row(f"count x {1 + margin:g} + {extra:g} (exact)", torch.ceil((1 + margin) * counts + extra).numpy())
    train = Scenes(model, processor, tower, selector, "train", args.train_n)
    lengths = torch.full((len(train.scenes),), n)
    bare = fit_predictor(train.thumbs, lengths, share_targets(train.counts, lengths, margin=0, extra=0),
                         steps=2000, seed=0)
    fractions = predict(bare, test.thumbs, torch.full((len(test.scenes),), n)).tolist()
    row("predictor fitted to the bare count", [keep_count(n, f) for f in fractions])
    shipped, header = load_budget_predictor(DEMO_DIR / "selector.safetensors")
    fractions = shipped.fractions([s.image for s in test.scenes], [n] * len(test.scenes))
    target = header["target"]
    row(f"shipped predictor (margin {target.get('margin')}, extra {target.get('extra')})",
        [keep_count(n, f) for f in fractions])

    args.out.mkdir(parents=True, exist_ok=True)
    report = {**record, "test_scenes_per_variant": args.n, "train_scenes_per_variant": args.train_n, "image_tokens": n,
              "count_vs_content": follows, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    sets = [*tasks.VARIANTS, ALL_SETS]
    lines = ["# `auto` on the demo model: how many tokens, and what the margin buys", "",
             f"`{report['command']}` at commit `{report['commit']}`; {args.n} test scenes per variant, every "
             "question of each, teacher-forced greedy answers from the selector's top K. Accuracy % (mean image "
             f"tokens of {n}).", "",
             "| K | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    lines += [f"| {r['row']} | " + " | ".join(f"{r['accuracy'][s]:.1f} ({r['image_tokens'][s]:.1f})" for s in sets)
              + " |" for r in rows]
    lines += ["", f"Tokens the selector rates above an even share against the scene's content tokens: correlation "
              f"{follows['correlation']:.2f}; means " + ", ".join(
                  f"{v} {follows[v]['count']:.1f} / {follows[v]['content']:.1f}" for v in tasks.VARIANTS) + "."]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "auto-margin.png")
    print(f"results in {args.out}")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    fixed = [r for r in rows if r["row"].startswith("keep ")]
    ax.plot([r["image_tokens"][ALL_SETS] for r in fixed], [r["accuracy"][ALL_SETS] for r in fixed], "o-",
            color="grey", label="one K for every image (keep 0.05 .. 1.0)")
    for r in (r for r in rows if not r["row"].startswith("keep ")):
        shipped = r["row"].startswith("shipped")
        ax.scatter([r["image_tokens"][ALL_SETS]], [r["accuracy"][ALL_SETS]], label=r["row"], zorder=3,
                   **({"marker": "*", "s": 220, "color": "black"} if shipped else {"marker": "o", "s": 50}))
    ax.set(xscale="log", xlabel="mean image tokens per image (of 144)", ylabel="accuracy, four sets together (%)",
           title="auto on the demo model: K per image vs one K for all")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
