"""The demo model's proportions: what its selector costs next to its tower and its language
model, and what other selector and language-model sizes would cost, on this machine.

    PYTHONPATH=. python benchmarks/demo_proportions.py --out benchmarks/results/demo-proportions

A pruned request's time to first token is a fixed part (the server's step, the tower), plus
the selector, plus the language model's prefill of the text and K image tokens. Pruning pays
when the prefill it saves exceeds the selector it costs. On a real deployment the selector
is about 1% of the tower's time and the tower a few percent of the prefill; the demo's
selector is 128 wide with 3 layers, and its language model grew from 2 layers, 128 wide, to 6, 384 wide.

Timed here in interleaved rounds (``tools/timing.py``), medians, with ``--threads`` threads:
the shipped tower and projector on one scene; selectors of several sizes scoring its 144
tokens (random weights: the time does not depend on them); and the prefill of the shipped
language model and of wider and deeper ones (random weights) at the prompt lengths of keep
1.0, 0.5, 0.25 and 0.1. For each selector and language model it reports the modelled TTFT
per keep ratio (tower + selector + prefill), whether it falls monotonically, and the
selector's share of keep 1.0's tower and prefill.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection.selector import SelectorConfig, TokenSelector
from vllm_tokenprune.testbed.demo_model import DEMO_DIR
from vllm_tokenprune.testbed.synthetic import TASK_IMAGE_SIZE
from vllm_tokenprune.tools.provenance import add_allow_dirty, stamp, write_results
from vllm_tokenprune.tools.timing import interleaved

RATIOS = (1.0, 0.5, 0.25, 0.1)
SELECTORS = ((128, 3), (64, 2), (64, 1), (32, 2), (32, 1), (16, 1))  # (width, layers); the first is shipped
# (hidden, layers, MLP width): the demo's language model before it grew, and the shipped one (384 x 6)
LANGUAGE_MODELS = ((128, 2, 256), (256, 4, 1024), (384, 6, 1536), (512, 6, 2048))


def _name(kind: str, shape: tuple[int, ...]) -> str:
    return f"{kind} " + "x".join(map(str, shape))


@torch.inference_mode()
def measure(rounds: int) -> dict:
    from transformers import AutoConfig, LlamaConfig, LlamaModel, LlavaForConditionalGeneration

    model_dir = DEMO_DIR / "model"
    config = AutoConfig.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pixels = torch.rand(1, 3, TASK_IMAGE_SIZE, TASK_IMAGE_SIZE)
    n = config.image_seq_length
    text = 11  # the demo's chat template and a question around the image placeholder
    feature_dim = config.vision_config.hidden_size
    features = torch.randn(1, n, feature_dim)
    parts = {"tower": lambda: model.get_image_features(pixel_values=pixels)}
    params = {"tower": sum(p.numel() for p in model.model.vision_tower.parameters())
              + sum(p.numel() for p in model.model.multi_modal_projector.parameters())}
    for width, layers in SELECTORS:
        selector = TokenSelector(SelectorConfig(feature_dim=feature_dim, width=width, num_layers=layers,
                                                num_heads=2)).eval()
        name = _name("selector", (width, layers))
        parts[name] = lambda s=selector: s.scores(features)
        params[name] = sum(p.numel() for p in selector.parameters())
    lengths = {r: text + keep_count(n, r) for r in RATIOS}
    text_config = config.text_config
    for hidden, layers, mlp in LANGUAGE_MODELS:
        shape = dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp,
                     num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
                     vocab_size=text_config.vocab_size)
        lm = LlamaModel(LlamaConfig(**shape)).eval()
        name = _name("lm", (hidden, layers, mlp))
        params[name] = sum(p.numel() for p in lm.parameters())
        for r, length in lengths.items():
            embeds = torch.randn(1, length, hidden)
            parts[f"{name} @{r}"] = lambda m=lm, e=embeds: m(inputs_embeds=e, use_cache=False)
    seconds = interleaved(parts, rounds)
    return {"image_tokens": n, "text_tokens": text, "prompt_tokens": lengths, "seconds": seconds,
            "parameters": params}


def models(measured: dict) -> list[dict]:
    """Per selector and language model: the modelled TTFT per keep ratio (the fixed server
    step left out), whether it falls with the ratio, and the selector's share."""
    s = measured["seconds"]
    rows = []
    for lm in LANGUAGE_MODELS:
        lm_name = _name("lm", lm)
        full = s["tower"] + s[f"{lm_name} @1.0"]
        for sel in SELECTORS:
            sel_name = _name("selector", sel)
            ttft = {r: s["tower"] + (s[sel_name] if r < 1 else 0.0) + s[f"{lm_name} @{r}"] for r in RATIOS}
            falls = all(ttft[a] > ttft[b] for a, b in zip(RATIOS, RATIOS[1:]))
            rows.append({"language_model": lm_name, "selector": sel_name, "ttft_s": ttft, "falls": falls,
                         "selector_of_tower_and_prefill": s[sel_name] / full,
                         "saving_at_0.25": 1 - ttft[0.25] / ttft[1.0]})
    return rows


def markdown(report: dict) -> str:
    s, p = report["seconds"], report["parameters"]
    lines = ["# The demo's proportions", "",
             f"`{report['command']}` at commit `{report['commit']}`; {report['threads']} thread(s), "
             f"{report['rounds']} interleaved rounds, medians. {report['image_tokens']} image tokens, "
             f"{report['text_tokens']} text tokens.", "",
             "| part | parameters | ms |", "| --- | --- | --- |"]
    for name in [k for k in s if "@" not in k]:
        lines.append(f"| {name} | {p[name]:,} | {s[name] * 1e3:.2f} |")
    for name in [k for k in p if k.startswith("lm ")]:
        cells = ", ".join(f"keep {r}: {s[f'{name} @{r}'] * 1e3:.2f}" for r in RATIOS)
        lines.append(f"| {name} prefill | {p[name]:,} | {cells} |")
    lines += ["", "Modelled TTFT (tower + selector + prefill; the server's fixed step left out), ms:", "",
              "| language model | selector | " + " | ".join(f"keep {r}" for r in RATIOS)
              + " | falls | selector / (tower + prefill at 1.0) | saved at 0.25 |",
              "| --- | --- | " + " | ".join("---" for _ in RATIOS) + " | --- | --- | --- |"]
    for row in report["models"]:
        cells = " | ".join(f"{row['ttft_s'][r] * 1e3:.2f}" for r in RATIOS)
        lines.append(f"| {row['language_model']} | {row['selector']} | {cells} | "
                     f"{'yes' if row['falls'] else 'no'} | {100 * row['selector_of_tower_and_prefill']:.1f}% | "
                     f"{100 * row['saving_at_0.25']:.1f}% |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LANGUAGE_MODELS), figsize=(4 * len(LANGUAGE_MODELS), 3.6), sharey=False)
    for ax, lm in zip(axes, LANGUAGE_MODELS):
        lm_name = _name("lm", lm)
        for row in (r for r in report["models"] if r["language_model"] == lm_name):
            ax.plot(RATIOS, [row["ttft_s"][r] * 1e3 for r in RATIOS], marker="o", label=row["selector"])
        ax.set_title(lm_name, fontsize=9)
        ax.set_xlabel("keep ratio")
        ax.invert_xaxis()
    axes[0].set_ylabel("modelled TTFT (ms)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    add_allow_dirty(parser)
    args = parser.parse_args(argv)
    record = stamp(Path(__file__), argv, args.allow_dirty)
    torch.set_num_threads(args.threads)
    report = {**record, "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
              **measure(args.rounds)}
    report["models"] = models(report)
    write_results(args.out, report, markdown(report))
    plot(report, args.out / "proportions.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
