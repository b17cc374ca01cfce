"""What each method keeps, on scenes whose content is known.

    python benchmarks/keep_coverage.py --variant clutter --n 200 --out benchmarks/results/coverage

For every method that needs no tower attention (learned, random, norm, divprune, and the
question readers cdpruner, mmtok and, when the selector checkpoint has one, learned_query,
each handed the question it is answering, as the server would hand it) and keep ratio:
the share of the tokens each question needs that survive (the asked shape's, all shapes',
the three digits'), and where the budget goes (content, texture, background).
Offline, with transformers: the tower features, projector, selector and selection code
the server runs, without a server, so it explains the accuracy tables of ``make quality``
token by token. Writes results.json, results.md and coverage.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from vllm_tokenprune.policy import keep_count, markup_ids, question_tokens
from vllm_tokenprune.selection import methods
from vllm_tokenprune.selection.selector import load_query_selector, load_selector
from vllm_tokenprune.testbed import clutter, tasks
from vllm_tokenprune.testbed.demo_model import DEMO_DIR
from vllm_tokenprune.testbed.synthetic import scene_seed
from vllm_tokenprune.tools.provenance import add_allow_dirty, stamp, write_results
from vllm_tokenprune.training.features import extract_features

METHODS = ("learned", "divprune", "norm", "random", "cdpruner", "mmtok", "learned_query")
RATIOS = (0.25, 0.1, 0.05)


def texture_patches(scene, grid: int) -> np.ndarray:
    mask = np.zeros((grid, grid), bool)
    for t in scene.textures:
        c0, r0, c1, r1 = t.cells
        mask[r0:r1, c0:c1] = True
    return mask


def questions(model_dir: Path):
    """scene, kind -> the question's embeddings (Q, H) as the server hands them to a method:
    the chat prompt's words (``policy.question_tokens``), through the model's embedding table."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    table = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval().get_input_embeddings()
    markup = markup_ids(tokenizer)

    def embed(scene, kind: str) -> torch.Tensor:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": scene.question(kind)}]}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = question_tokens(tokenizer(prompt, add_special_tokens=False)["input_ids"], markup)
        with torch.inference_mode():
            return table(torch.tensor(ids))

    return embed


def measure(model_dir: Path, selector_path: Path, variant: str, n: int) -> dict:
    from transformers import LlavaForConditionalGeneration

    selector, _ = load_selector(selector_path)
    reader = load_query_selector(selector_path)
    reader = None if reader is None else reader[0]
    names = [m for m in METHODS if m != "learned_query" or reader is not None]
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    projector = model.model.multi_modal_projector
    embed_question = questions(model_dir)
    scenes = [tasks.make_scene(variant, scene_seed("test", i)) for i in range(n)]
    features, info = extract_features(model_dir, [s.image for s in scenes], progress=True)
    out = {m: {r: {"needed": {k: [] for k in clutter.QUESTIONS}, "budget": {"content": [], "texture": [],
                                                                            "background": []}}
               for r in RATIOS} for m in names}
    for i, (scene, feats) in enumerate(zip(scenes, features)):
        grid = scene.content_patches().shape[0]
        content = scene.content_patches().reshape(-1)
        texture = texture_patches(scene, grid).reshape(-1)
        needed = {k: scene.patches_of(k).reshape(-1) for k in clutter.QUESTIONS}
        asked = {k: embed_question(scene, k) for k in clutter.QUESTIONS}
        for m in names:
            # A method that reads the question keeps another set for each question.
            per_kind = {k: asked[k] for k in clutter.QUESTIONS} if methods.get(m).reads_query else {None: None}
            for r in RATIOS:
                cell = out[m][r]
                for kind, query in per_kind.items():
                    tokens = methods.Tokens(feats, ((grid, grid),), seed=i, selector=selector, embed=projector,
                                            query=query, query_selector=reader)
                    with torch.inference_mode():
                        kept = np.zeros(len(content), bool)
                        kept[methods.select(m, tokens, keep_count(len(content), r)).index.numpy()] = True
                    for k, need in needed.items():
                        if kind in (None, k):
                            cell["needed"][k].append(float((kept & need).sum() / need.sum()))
                    for part, mask in (("content", content), ("texture", texture), ("background", ~content & ~texture)):
                        cell["budget"][part].append(float((kept & mask).sum() / kept.sum()))
    return {m: {str(r): {group: {k: round(float(np.mean(v)), 4) for k, v in values.items()}
                         for group, values in cell.items()} for r, cell in by_ratio.items()}
            for m, by_ratio in out.items()}


def markdown(report: dict) -> str:
    lines = [f"# What each method keeps: {report['variant']}, {report['n']} test scenes", "",
             f"`{report['command']}` at commit `{report['commit']}`.", "",
             "Share of the tokens a question needs that are kept (all shapes for count, the asked "
             "shape for shape-colour, the three digits for read), and the share of the budget "
             "spent on content, texture and background tokens:", "",
             "| method | keep | count | shape-colour | read | budget: content | texture | background |",
             "|---|---|---|---|---|---|---|---|"]
    for m, by_ratio in report["methods"].items():
        for r, cell in by_ratio.items():
            need, budget = cell["needed"], cell["budget"]
            lines.append(f"| {m} | {r} | " + " | ".join(f"{100 * need[k]:.0f}%" for k in clutter.QUESTIONS) +
                         " | " + " | ".join(f"{100 * budget[p]:.0f}%" for p in ("content", "texture", "background"))
                         + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = list(next(iter(report["methods"].values())))
    fig, axes = plt.subplots(1, len(clutter.QUESTIONS) + 1, figsize=(4.2 * (len(clutter.QUESTIONS) + 1), 3.8))
    width = 0.8 / len(report["methods"])
    for j, (m, by_ratio) in enumerate(report["methods"].items()):
        x = np.arange(len(ratios)) + (j - (len(report["methods"]) - 1) / 2) * width
        for ax, k in zip(axes, clutter.QUESTIONS):
            ax.bar(x, [100 * by_ratio[r]["needed"][k] for r in ratios], width, color=f"C{j}", label=m)
        axes[-1].bar(x, [100 * by_ratio[r]["budget"]["texture"] for r in ratios], width, color=f"C{j}")
    for ax, title in zip(axes, [f"{k}: needed tokens kept" for k in clutter.QUESTIONS] + ["budget on textures"]):
        ax.set(title=title, xlabel="keep ratio", ylabel="%", ylim=(0, 102))
        ax.set_xticks(range(len(ratios)), ratios)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['variant']}: what each method keeps ({report['n']} test scenes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_DIR / "model")
    parser.add_argument("--selector", type=Path, default=DEMO_DIR / "selector.safetensors")
    parser.add_argument("--variant", choices=clutter.VARIANTS, default="clutter")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/coverage"))
    add_allow_dirty(parser)
    args = parser.parse_args(argv)
    record = stamp(Path(__file__), argv, args.allow_dirty)
    torch.set_num_threads(1)
    report = {"variant": args.variant, "n": args.n, **record,
              "methods": measure(args.model, args.selector, args.variant, args.n)}
    write_results(args.out, report, markdown(report))
    plot(report, args.out / "coverage.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
