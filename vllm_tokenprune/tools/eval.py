"""``vllm-tokenprune eval``: answer accuracy per keep ratio x method, through a real server.

    vllm-tokenprune eval --url http://host:8000 --data items.jsonl --out DIR
    vllm-tokenprune eval --model DIR --selector sel.safetensors --data items.jsonl [serve args]

Each line of a data file is ``{"image": path | data URL | URL, "question": ..., "answer":
...}`` (paths relative to the file; ``vllm-tokenprune make-eval-set`` writes such files,
and an optional ``"kind"`` key gets its own accuracy). Every item is asked through the
OpenAI chat API with ``X-Keep-Ratio`` / ``X-Prune-Method`` headers, greedily, several
requests in flight; a prediction is right when it equals the answer after normalization
(``--match``). With no ``--url`` and no ``--model`` the embedded demo model is served.

The methods are the ones the server has (it lists them in the 400 it gives an unknown
method), unless ``--methods`` names some. Keep 1.0 is the unpruned model whatever the
method, so it is asked once and shown for every method.

``--ratios`` may name budgets besides numbers: ``auto`` (each image's own ratio, from the
server's budget predictor) is asked for every method and placed by the fraction of image
tokens it kept on average (``usage.prompt_tokens_details.multimodal_tokens``); the report
compares it with the smallest fixed ratio of the same method that is as accurate.

Results go to ``--out``: ``results.json``, ``results.md`` (a table per data file) and
``accuracy.png`` (accuracy vs kept fraction of image tokens, one line per method, ``auto``
a star).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import mimetypes
import re
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_tokenprune.tools.client import METHOD_HEADER, image_question, image_tokens, prune_headers, served_model
from vllm_tokenprune.tools.eval_report import write_report
from vllm_tokenprune.tools.provenance import add_allow_dirty, stamp

ACCEPTS_EXTRA_ARGS = True  # extra arguments go to the server it starts
MATCHES = ("exact", "first-word", "contains")
Ratio = float | str  # a keep ratio, or a budget the server resolves per image (``auto``)
# Content-density buckets (content tokens, inclusive): 14 and 36 tokens are keep 0.1 and
# 0.25 of a 144-token image, so the top buckets hold more content than those budgets.
DENSITY_BUCKETS = ((1, 8), (9, 14), (15, 24), (25, 36), (37, None))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s --data ITEMS.jsonl [--url URL | --model DIR] [options] [serve args...]"
    parser.add_argument("--data", action="append", metavar="[NAME=]PATH",
                        help="items.jsonl to evaluate; repeat for several sets (NAME defaults to "
                             "the folder name)")
    parser.add_argument("--url", help="a running server (http://host:port[/v1])")
    parser.add_argument("--model", help="checkpoint to serve (default: the embedded demo model)")
    parser.add_argument("--selector", help="selector for the server it starts")
    parser.add_argument("--ratios", default="1.0,0.5,0.25,0.1",
                        help="keep ratios and budgets, e.g. 1.0,0.25,0.1,auto")
    parser.add_argument("--methods", default=None,
                        help="comma-separated (default: every method the server has)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--match", choices=MATCHES, default="exact",
                        help="exact: the whole normalized prediction; first-word: its first "
                             "word; contains: the answer as a whole word anywhere in it")
    parser.add_argument("--case-sensitive", action="store_true")
    parser.add_argument("--keep-punctuation", action="store_true")
    parser.add_argument("--limit", type=int, default=0, help="first N items of each set (0: all)")
    parser.add_argument("--out", type=Path, default=Path("eval-results"))
    parser.add_argument("--render", type=Path, metavar="DIR",
                        help="only rebuild DIR's table and plot from its results.json")
    add_allow_dirty(parser)


# ---------------------------------------------------------------------------------------
# Items and scoring


@dataclass
class Item:
    image_url: str
    question: str
    answer: str
    kind: str | None = None
    content_tokens: int | None = None  # tokens holding what questions are about, if known


def load_items(path: Path, limit: int = 0) -> list[Item]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            image, question, answer = raw["image"], raw["question"], str(raw["answer"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: need a JSON object with image, question, answer ({err})") from None
        items.append(Item(_image_url(image, path.parent), question, answer, raw.get("kind"),
                          raw.get("content_tokens")))
        if limit and len(items) == limit:
            break
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _image_url(image: str, base: Path) -> str:
    """Data and http(s) URLs pass through; a path (relative to the data file) becomes a data URL."""
    if re.match(r"^(data:|https?://)", image):
        return image
    path = Path(image) if Path(image).is_absolute() else base / image
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


@dataclass(frozen=True)
class Matcher:
    mode: str = "exact"
    case_sensitive: bool = False
    keep_punctuation: bool = False

    def normalize(self, text: str) -> str:
        if not self.case_sensitive:
            text = text.lower()
        if not self.keep_punctuation:
            text = text.translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
        return " ".join(text.split())

    def __call__(self, prediction: str, answer: str) -> bool:
        pred, ans = self.normalize(prediction), self.normalize(answer)
        if self.mode == "exact":
            return pred == ans
        if self.mode == "first-word":  # the prediction starts with the answer's words
            return pred.split()[:len(ans.split())] == ans.split()
        return f" {ans} " in f" {pred} "


# ---------------------------------------------------------------------------------------
# Talking to the server


def server_methods(url: str, model: str) -> list[str]:
    """The methods the server knows, read off the 400 it gives an unknown one."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    try:
        client.chat.completions.create(model=model, max_tokens=1, extra_headers={METHOD_HEADER: "?"},
                                       messages=[{"role": "user", "content": "hi"}])
        found, said = None, "it accepted an unknown method"
    except openai.BadRequestError as err:
        found, said = re.search(r"choose one of ([\w\-, ]+)", err.message), err.message
    if not found:
        raise RuntimeError(f"{url} does not list prune methods ({said[:300]}); is it a "
                           "vllm-tokenprune server? Pass --methods to choose.")
    return [m.strip() for m in found.group(1).split(",")]


async def _ask_all(url: str, model: str, items: list[Item], cells: list[tuple[Ratio, str | None]],
                   concurrency: int, max_tokens: int, progress: bool) -> dict:
    """Answers for every (cell, item):
    {(ratio, method): [(text or None, prompt_tokens, image_tokens, error)]}."""
    import openai
    from tqdm.auto import tqdm

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=2, timeout=300)
    limit = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(items) * len(cells), desc="eval", unit="req", disable=not progress)

    async def ask(item: Item, ratio: float, method: str | None):
        async with limit:
            try:
                out = await client.chat.completions.create(
                    model=model, max_tokens=max_tokens, temperature=0,
                    messages=image_question(item.image_url, item.question),
                    extra_headers=prune_headers(ratio, method))
                return out.choices[0].message.content or "", out.usage.prompt_tokens, image_tokens(out.usage), None
            except openai.APIStatusError as err:
                return None, None, None, f"{err.status_code}: {str(err)[:300]}"
            finally:
                bar.update()

    try:
        answers = {}
        for ratio, method in cells:  # cell by cell, so a refused method fails fast and alone
            answers[(ratio, method)] = await asyncio.gather(*(ask(it, ratio, method) for it in items))
    finally:
        bar.close()
        await client.close()
    return answers


def score(items: list[Item], answers: list[tuple], matcher: Matcher) -> dict:
    """Accuracy of one cell; failed requests count as wrong and are reported."""
    right = [text is not None and matcher(text, item.answer) for item, (text, *_) in zip(items, answers)]
    tokens = [t for _, t, _, _ in answers if t is not None]
    images = [t for _, _, t, _ in answers if t is not None]
    errors = [e for *_, e in answers if e is not None]
    cell = {"n": len(items), "correct": sum(right), "accuracy": sum(right) / len(items),
            "mean_prompt_tokens": sum(tokens) / len(tokens) if tokens else None,
            "mean_image_tokens": sum(images) / len(images) if images else None,
            "errors": len(errors), "first_error": errors[0] if errors else None}
    kinds = sorted({i.kind for i in items if i.kind is not None})
    if kinds:
        cell["by_kind"] = _accuracy_by(right, [i.kind for i in items])
    if any(i.content_tokens is not None for i in items):
        cell["by_density"] = _accuracy_by(right, [density_bucket(i.content_tokens) for i in items])
    return cell


def density_bucket(tokens: int | None) -> str | None:
    for low, high in DENSITY_BUCKETS:
        if tokens is not None and tokens >= low and (high is None or tokens <= high):
            return f"{low}-{high}" if high else f"{low}+"
    return None


def _accuracy_by(right: list[bool], groups: list[str | None]) -> dict[str, float]:
    """{group: accuracy} over the items that have a group, buckets in table order."""
    out = {}
    for group in sorted({g for g in groups if g is not None}, key=_group_order):
        hits = [r for r, g in zip(right, groups) if g == group]
        out[group] = sum(hits) / len(hits)
    return out


_BUCKET_NAMES = [density_bucket(low) for low, _ in DENSITY_BUCKETS]


def _group_order(group: str):
    """Density buckets in table order, then other groups by name."""
    return (_BUCKET_NAMES.index(group), "") if group in _BUCKET_NAMES else (len(_BUCKET_NAMES), group)


def parse_ratios(text: str) -> list[Ratio]:
    """``--ratios``: numbers, largest first, then budgets (``auto``) in the order given."""
    numbers, budgets = set(), []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            numbers.add(float(part))
        except ValueError:
            budgets.append(part)
    return sorted(numbers, reverse=True) + list(dict.fromkeys(budgets))


def evaluate(url: str, datasets: dict[str, list[Item]], ratios: list[Ratio], methods: list[str],
             matcher: Matcher, concurrency: int = 16, max_tokens: int = 8, progress: bool = True,
             model: str | None = None) -> dict:
    """{name: {"n", "cells": [{"method", "keep_ratio", ...score}]}} for each data set.

    A method the server refuses (every request a 400, e.g. 'learned' with no selector) is
    left out and named under "refused". ``model``: the served name (default: asked).
    """
    model = model or served_model(url)
    pruned = [r for r in ratios if r != 1.0]
    cells = ([(1.0, None)] if 1.0 in ratios else []) + [(r, m) for m in methods for r in pruned]
    results = {}
    for name, items in datasets.items():
        answers = asyncio.run(_ask_all(url, model, items, cells, concurrency, max_tokens, progress))
        out_cells, refused = [], {}
        for (ratio, method), got in answers.items():
            cell = score(items, got, matcher)
            if cell["errors"] == len(items) and cell["first_error"].startswith("400"):
                refused[method] = cell["first_error"]
                continue
            for m in ([method] if method else methods):
                out_cells.append({"method": m, "keep_ratio": ratio, **cell})
        results[name] = {"n": len(items), "refused": refused,
                         "cells": [c for c in out_cells if c["method"] not in refused]}
        buckets = [density_bucket(i.content_tokens) for i in items]
        if any(buckets):
            results[name]["density_counts"] = {b: buckets.count(b) for b in sorted(set(buckets) - {None},
                                                                                  key=_group_order)}
        first = next(iter(answers.values()))  # a few predictions, to see what the model says
        results[name]["examples"] = [{"question": i.question, "answer": i.answer, "prediction": a[0]}
                                     for i, a in zip(items[:5], first)]
    if len(results) > 1:
        results[ALL_SETS] = pooled(list(results.values()))
    return {"model": model, "match": matcher.__dict__, "ratios": ratios, "methods": methods,
            "datasets": results}


ALL_SETS = "all sets"  # the data sets pooled: a mix of sparse and dense images, where auto matters


def pooled(results: list[dict]) -> dict:
    """The cells of several data sets' results as one set of all their items: accuracy and
    mean token counts weighted by items (a cell only where every set has it)."""
    def merged(parts: list[dict]) -> dict:
        n = sum(c["n"] for c in parts)
        cell = {"method": parts[0]["method"], "keep_ratio": parts[0]["keep_ratio"], "n": n,
                "correct": sum(c["correct"] for c in parts), "errors": sum(c["errors"] for c in parts),
                "first_error": next((c["first_error"] for c in parts if c["first_error"]), None)}
        cell["accuracy"] = cell["correct"] / n
        for key in ("mean_prompt_tokens", "mean_image_tokens"):
            values = [c[key] for c in parts]
            cell[key] = None if None in values else sum(v * c["n"] for v, c in zip(values, parts)) / n
        return cell

    keys = [(c["method"], c["keep_ratio"]) for c in results[0]["cells"]]
    cells = [[next((c for c in r["cells"] if (c["method"], c["keep_ratio"]) == key), None) for r in results]
             for key in keys]
    return {"n": sum(r["n"] for r in results),
            "refused": {m: e for r in results for m, e in r["refused"].items()},
            "cells": [merged(parts) for parts in cells if None not in parts], "examples": []}


# ---------------------------------------------------------------------------------------


def _datasets(specs: list[str], limit: int) -> dict[str, list[Item]]:
    out = {}
    for spec in specs:
        name, _, path = spec.rpartition("=")
        path = Path(path)
        out[name or path.parent.name] = load_items(path, limit)
    return out


def run(args: argparse.Namespace) -> int:
    from vllm_tokenprune.tools.launcher import target

    if args.render:
        write_report(json.loads((args.render / "results.json").read_text()), args.render)
        return 0
    if not args.data:
        print("error: --data is required", file=sys.stderr)
        return 2
    try:
        datasets = _datasets(args.data, args.limit)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ratios = parse_ratios(args.ratios)
    matcher = Matcher(args.match, args.case_sensitive, args.keep_punctuation)
    record = stamp("vllm-tokenprune", args.argv, args.allow_dirty)
    args.out.mkdir(parents=True, exist_ok=True)
    serve_args = [*args.extra_args, *(["--selector", args.selector] if args.selector else [])]
    with target(args.url, args.model, serve_args, args.out / "server.log") as server:
        url = server.root + "/v1"
        methods = args.methods.split(",") if args.methods else server_methods(url, server.model)
        start = time.time()
        report = evaluate(url, datasets, ratios, methods, matcher, args.concurrency, args.max_tokens,
                          model=server.model)
    report.update(seconds=round(time.time() - start, 1), **record)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report(report, args.out)
    return 0
