"""`vllm-tokenprune eval`: matching, item files, scoring and the report offline; then
accuracy against a real server (the shipped demo model) checked request by request."""

from __future__ import annotations

import base64
import json

import openai
import pytest
from PIL import Image

from vllm_tokenprune.cli import main
from vllm_tokenprune.tools.eval import (
    Item,
    Matcher,
    density_bucket,
    evaluate,
    load_items,
    parse_ratios,
    pooled,
    score,
    server_methods,
)
from vllm_tokenprune.tools.eval_report import markdown, plot

# ---------------------------------------------------------------------------------------
# Offline


def test_matching_modes():
    exact = Matcher()
    assert exact("Five.", "five") and exact("  five\n", "FIVE") and not exact("five shapes", "five")
    assert not Matcher(case_sensitive=True)("Five", "five")
    assert not Matcher(keep_punctuation=True)("five.", "five")
    first = Matcher("first-word")
    assert first("Five shapes.", "five") and not first("There are five", "five")
    assert first("dark blue, I think", "dark blue")
    contains = Matcher("contains")
    assert contains("There are five.", "five") and not contains("fivefold", "five")


def test_items_from_paths_data_urls_and_errors(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG fake")
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join([
        json.dumps({"image": "img/a.png", "question": "q1", "answer": 3, "kind": "count"}),
        "",
        json.dumps({"image": "data:image/png;base64,AAAA", "question": "q2", "answer": "red"}),
        json.dumps({"image": "https://example.com/x.jpg", "question": "q3", "answer": "no"}),
    ]))
    items = load_items(data)
    assert items[0] == Item("data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode(),
                            "q1", "3", "count")
    assert items[1].image_url == "data:image/png;base64,AAAA" and items[1].kind is None
    assert items[2].image_url.startswith("https://") and len(load_items(data, limit=2)) == 2
    data.write_text(json.dumps({"image": "x.png", "question": "q"}))
    with pytest.raises(ValueError, match="items.jsonl:1"):
        load_items(data)


def test_score_counts_failures_as_wrong_and_splits_by_kind():
    items = [Item("u", "q", "five", "count"), Item("u", "q", "red", "colour"), Item("u", "q", "two", "count")]
    cell = score(items, [("Five", 160, 144, None), ("blue", 160, 140, None), (None, None, None, "500: boom")],
                 Matcher())
    assert cell["correct"] == 1 and cell["accuracy"] == pytest.approx(1 / 3)
    assert cell["errors"] == 1 and cell["first_error"] == "500: boom" and cell["mean_prompt_tokens"] == 160
    assert cell["mean_image_tokens"] == 142
    assert cell["by_kind"] == {"colour": 0.0, "count": 0.5}
    assert "by_density" not in cell


def test_score_splits_by_content_density():
    items = [Item("u", "q", "a", content_tokens=n) for n in (3, 8, 9, 40, 14)]
    cell = score(items, [(a, 1, 1, None) for a in "abaab"], Matcher())
    assert cell["by_density"] == {"1-8": 0.5, "9-14": 0.5, "37+": 1.0}
    assert list(cell["by_density"]) == ["1-8", "9-14", "37+"]  # bucket order, not name order
    assert [density_bucket(n) for n in (1, 14, 15, 36, 37, None)] == ["1-8", "9-14", "15-24", "25-36", "37+", None]


def test_report_table_and_plot(tmp_path):
    def cell(method, ratio, acc):
        return {"method": method, "keep_ratio": ratio, "n": 10, "correct": round(10 * acc), "accuracy": acc,
                "mean_prompt_tokens": 20 + 144 * ratio, "errors": 0, "first_error": None}

    result = {"n": 10, "refused": {}, "cells": [cell(m, 1.0, 1.0) for m in ("learned", "random")] + [
        cell("learned", 0.25, 0.9), cell("random", 0.25, 0.4)]}
    report = {"model": "demo", "command": "vllm-tokenprune eval", "commit": "abc", "match": Matcher().__dict__,
              "ratios": [1.0, 0.25], "methods": ["learned", "random"], "datasets": {"plain": result}}
    text = markdown(report)
    assert "| learned | 100.0 | 90.0 |" in text and "| random | 100.0 | 40.0 |" in text
    assert "| *prompt tokens* | 164 | 56 |" in text
    assert "keep 0.25: learned keeps 90.0% of the keep-1.0 accuracy, +50.0 points vs random" in text
    assert "No `pool` method" in text
    plot(report, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000

    # with content densities: a table at keep 0.25 and a second row of plots
    result["density_counts"] = {"1-8": 6, "37+": 4}
    for c in result["cells"]:
        c["by_density"] = {"1-8": 1.0, "37+": c["accuracy"] / 2}
    text = markdown(report)
    assert "Accuracy at keep 0.25 by content tokens per image" in text
    assert "| 1-8 (6) | 37+ (4) |" in text and "| random | 100.0 | 20.0 |" in text
    plot(report, tmp_path / "density.png")
    with Image.open(tmp_path / "density.png") as image, Image.open(tmp_path / "accuracy.png") as single:
        assert image.height > 1.5 * single.height


def test_parse_ratios_keeps_budgets_after_numbers():
    assert parse_ratios("0.25,auto,1,0.25, 0.1,auto;max=0.5,auto") == [1.0, 0.25, 0.1, "auto", "auto;max=0.5"]


def test_report_places_auto_by_the_image_tokens_it_kept(tmp_path):
    def cell(method, ratio, acc, image_tokens):
        return {"method": method, "keep_ratio": ratio, "n": 10, "correct": round(10 * acc), "accuracy": acc,
                "mean_prompt_tokens": 20 + image_tokens, "mean_image_tokens": image_tokens, "errors": 0,
                "first_error": None}

    result = {"n": 10, "refused": {}, "cells": [
        cell("learned", 1.0, 0.8, 144), cell("learned", 0.5, 0.8, 72), cell("learned", 0.25, 0.7, 36),
        cell("learned", "auto", 0.8, 28.8), cell("random", 0.5, 0.5, 72), cell("random", "auto", 0.4, 28.8)]}
    report = {"model": "demo", "command": "vllm-tokenprune eval", "commit": "abc", "match": Matcher().__dict__,
              "ratios": [1.0, 0.5, 0.25, "auto"], "methods": ["learned", "random"], "datasets": {"mixed": result}}
    text = markdown(report)
    assert "| learned | 80.0 | 80.0 | 70.0 | 80.0 |" in text
    assert "| *image tokens* | 144.0 | 72.0 | 36.0 | 28.8 |" in text
    assert ("auto (learned): 80.0% right, 100.0% of the keep-1.0 accuracy, 20.0% of the image tokens; the "
            "smallest fixed ratio as accurate, keep 0.5, keeps 50.0%: auto needs 40% of its tokens") in text
    assert "auto (random): 40.0% right, 50.0% of the keep-1.0 accuracy, 20.0% of the image tokens; the " \
           "smallest fixed ratio as accurate, keep 0.5" in text
    plot(report, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000


def test_several_sets_are_also_reported_pooled():
    def cell(method, ratio, n, acc, image_tokens):
        return {"method": method, "keep_ratio": ratio, "n": n, "correct": round(n * acc), "accuracy": acc,
                "mean_prompt_tokens": 10 + image_tokens, "mean_image_tokens": image_tokens, "errors": 0,
                "first_error": None}

    sparse = {"n": 30, "refused": {}, "cells": [cell("learned", 1.0, 30, 1.0, 144), cell("learned", 0.25, 30, 1.0, 36),
                                                cell("learned", "auto", 30, 1.0, 6)]}
    dense = {"n": 10, "refused": {"norm": "400"}, "cells": [
        cell("learned", 1.0, 10, 0.9, 144), cell("learned", 0.25, 10, 0.8, 36), cell("learned", "auto", 10, 0.9, 50)]}
    both = {c["keep_ratio"]: c for c in pooled([sparse, dense])["cells"]}
    assert both[1.0]["n"] == 40 and both[1.0]["correct"] == 39 and both[1.0]["accuracy"] == 39 / 40
    assert both[0.25]["accuracy"] == 38 / 40 and both[0.25]["mean_image_tokens"] == 36
    assert both["auto"]["mean_image_tokens"] == (30 * 6 + 10 * 50) / 40 == 17
    assert both["auto"]["mean_prompt_tokens"] == 27
    assert pooled([sparse, dense])["refused"] == {"norm": "400"}
    # a cell only where every set has it
    del dense["cells"][2]
    assert {c["keep_ratio"] for c in pooled([sparse, dense])["cells"]} == {1.0, 0.25}


def test_missing_data_file_or_server_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--url", "http://127.0.0.1:9", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps({"image": "data:image/png;base64,AAAA", "question": "q", "answer": "a"}))
    assert main(["eval", "--url", "http://127.0.0.1:9", "--data", str(data), "--out", str(tmp_path / "out"),
                 "--allow-dirty"]) == 2
    assert "no OpenAI-compatible server answers at http://127.0.0.1:9/v1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Against a real server


@pytest.mark.server
def test_accuracy_against_a_real_server(tmp_path):
    """Six held-out items plus one with a wrong answer key, at keep 1.0, 0.25 and auto,
    learned and random: every cell's count equals the one found by asking request by
    request, the image tokens are the server's, and the CLI writes its three files."""
    from server import Server
    from stamps import assert_stamped

    from vllm_tokenprune.selection.methods import IMAGE_METHOD_NAMES
    from vllm_tokenprune.testbed.demo_model import DEMO_DIR

    assert main(["make-eval-set", "--variant", "textured", "--n", "6", "--out", str(tmp_path / "set")]) == 0
    data = tmp_path / "set" / "items.jsonl"
    lines = data.read_text().splitlines()
    wrong = json.loads(lines[0])
    wrong["answer"] = "seven"  # no such answer: always counted wrong
    data.write_text("\n".join([*lines, json.dumps(wrong)]) + "\n")
    items = load_items(data)

    with Server(DEMO_DIR / "model", "--selector", str(DEMO_DIR / "selector.safetensors"),
                "--served-model-name", "demo", log_path=tmp_path / "server.log") as server:
        assert server_methods(server.url, "demo") == list(IMAGE_METHOD_NAMES)
        report = evaluate(server.url, {"set": items}, [1.0, 0.25, "auto"], ["learned", "random"], Matcher(),
                          concurrency=4, progress=False)
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        for c in report["datasets"]["set"]["cells"]:
            headers = {"X-Keep-Ratio": str(c["keep_ratio"]), "X-Prune-Method": c["method"]}
            right = 0
            for item in items:
                out = client.chat.completions.create(
                    model="demo", max_tokens=8, temperature=0, extra_headers=headers,
                    messages=[{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": item.image_url}},
                        {"type": "text", "text": item.question}]}])
                right += out.choices[0].message.content.strip().lower() == item.answer
            assert c["correct"] == right and c["n"] == 7 and c["errors"] == 0, c
        argv = ["eval", "--url", server.root, "--data", str(data), "--ratios", "1.0,0.25,auto",
                "--methods", "learned,random", "--out", str(tmp_path / "out"), "--allow-dirty"]
        assert main(argv) == 0
    full = next(c for c in report["datasets"]["set"]["cells"] if c["keep_ratio"] == 1.0)
    assert full["correct"] <= 6 and full["mean_prompt_tokens"] - 108 == pytest.approx(
        next(c for c in report["datasets"]["set"]["cells"] if c["keep_ratio"] == 0.25)["mean_prompt_tokens"])
    images = {(c["method"], c["keep_ratio"]): c["mean_image_tokens"] for c in report["datasets"]["set"]["cells"]}
    assert images[("learned", 1.0)] == 144 and images[("learned", 0.25)] == 36
    assert 1 <= images[("learned", "auto")] < 144 and images[("learned", "auto")] == images[("random", "auto")]
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["datasets"]["set"]["cells"] == report["datasets"]["set"]["cells"]
    assert_stamped(written, "vllm-tokenprune", *argv)
    assert (tmp_path / "out" / "accuracy.png").exists()
    assert "| learned |" in (tmp_path / "out" / "results.md").read_text()
