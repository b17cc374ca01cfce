"""The README's first command: `vllm-tokenprune serve` with no model serves the shipped
demo model with its selector. Through that server it answers held-out scenes of every
question type of both tasks, with all tokens and with a quarter of them, and `auto` keeps
each image's own K: more for dense scenes than for sparse ones, fewer than keep 0.25 over
the mix, and as accurate."""

from __future__ import annotations

import openai
import pytest
from server import Server

from vllm_tokenprune.testbed import tasks
from vllm_tokenprune.tools.client import image_question, prune_headers
from vllm_tokenprune.tools.eval import ALL_SETS, Matcher, evaluate, load_items
from vllm_tokenprune.tools.serve import DEFAULT_SERVED_NAME, DEMO_ALIASES

pytestmark = pytest.mark.server

N = 60  # held-out items per variant, question kinds in turn
FULL = 0.85  # per question kind at keep 1.0 (docs/quality.md measures the 95% bar on 400 items)
PRUNED = {"textured": 0.9, "plain": 0.9, "clutter": 0.85, "clutter-plain": 0.85}  # all kinds, at keep 0.25


def test_serve_without_a_model(tmp_path):
    sets = {v: load_items(tasks.write_eval_set(tmp_path / v, v, "test", N)) for v in tasks.VARIANTS}
    with Server(None, log_path=tmp_path / "server.log") as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [DEFAULT_SERVED_NAME, *(
            f"{DEFAULT_SERVED_NAME}:{tag}" for tag in DEMO_ALIASES.split(","))]  # and its aliases
        report = evaluate(server.url, sets, [1.0, 0.25, "auto"], ["learned"], Matcher(), concurrency=4,
                          progress=False)
        # no method named: 'learned', the default when a selector is loaded; the answer as
        # decoded after the prompt, with its leading space
        answer = client.chat.completions.create(
            model=DEFAULT_SERVED_NAME, max_tokens=4, temperature=0, extra_headers=prune_headers(0.25),
            messages=image_question(sets["plain"][0].image_url, sets["plain"][0].question))
        assert answer.choices[0].message.content == " " + sets["plain"][0].answer
        # the demo's selector carries a budget predictor: auto works, one K per image
        kept = []
        for item in [sets["plain"][0], sets["clutter"][0], sets["plain"][0]]:
            out = client.chat.completions.create(model=DEFAULT_SERVED_NAME, max_tokens=1,
                                                 messages=image_question(item.image_url, item.question),
                                                 temperature=0, extra_headers={"X-Keep-Ratio": "auto"})
            kept.append(out.usage.prompt_tokens_details.multimodal_tokens["image"])
        assert all(1 <= k < 144 for k in kept) and kept[0] == kept[2], kept
    for variant in tasks.VARIANTS:
        result = report["datasets"][variant]
        cells = {c["keep_ratio"]: c for c in result["cells"]}
        assert all(c["errors"] == 0 and c["n"] == N for c in cells.values()), result
        assert cells[1.0]["mean_image_tokens"] == 144 and cells[0.25]["mean_image_tokens"] == 36
        assert set(cells[1.0]["by_kind"]) == set(tasks.kinds(variant))
        for kind, accuracy in cells[1.0]["by_kind"].items():
            assert accuracy >= FULL, (variant, kind, cells[1.0]["by_kind"])
        assert cells[0.25]["accuracy"] >= PRUNED[variant], (variant, cells[0.25])
    # auto over the mix of sparse (shapes task) and dense (clutter) scenes
    tokens = {v: next(c for c in r["cells"] if c["keep_ratio"] == "auto")["mean_image_tokens"]
              for v, r in report["datasets"].items()}
    assert max(tokens["textured"], tokens["plain"]) < min(tokens["clutter"], tokens["clutter-plain"]), tokens
    mix = {c["keep_ratio"]: c for c in report["datasets"][ALL_SETS]["cells"]}
    assert mix["auto"]["mean_image_tokens"] <= 0.75 * mix[0.25]["mean_image_tokens"], mix
    assert mix["auto"]["accuracy"] >= mix[0.25]["accuracy"] - 0.02, mix
