"""The README's first command: `vllm-tokenprune serve` with no model serves the shipped
demo model with its selector, and answers a held-out question right at keep 0.25."""

from __future__ import annotations

import openai
import pytest
from server import Server

from vllm_tokenprune.testbed.synthetic import QUESTIONS, make_scene, scene_seed
from vllm_tokenprune.tools.client import image_url, prune_headers
from vllm_tokenprune.tools.serve import DEFAULT_SERVED_NAME

pytestmark = pytest.mark.server


def test_serve_without_a_model(tmp_path):
    scenes = [make_scene(variant, scene_seed("test", 0)) for variant in ("plain", "textured")]
    with Server(None, log_path=tmp_path / "server.log") as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [DEFAULT_SERVED_NAME]
        for scene in scenes:
            messages = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_url(scene.image)}},
                {"type": "text", "text": QUESTIONS["count"]}]}]
            # 'learned' is refused without a selector; with one loaded it is also the default
            for ratio, method in [(1.0, None), (0.25, None), (0.25, "learned")]:
                out = client.chat.completions.create(model=DEFAULT_SERVED_NAME, messages=messages, max_tokens=4,
                                                     temperature=0, extra_headers=prune_headers(ratio, method))
                # decoded after the prompt, the answer word comes with its leading space
                assert out.choices[0].message.content == " " + scene.answer("count"), (ratio, server.log_tail())
                image_tokens = out.usage.prompt_tokens_details.multimodal_tokens["image"]
                assert image_tokens == {1.0: 144, 0.25: 36}[ratio]
        # the demo's selector carries a budget predictor: auto works, one K per image
        kept = []
        for scene in scenes + scenes[:1]:
            messages = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_url(scene.image)}},
                {"type": "text", "text": QUESTIONS["count"]}]}]
            out = client.chat.completions.create(model=DEFAULT_SERVED_NAME, messages=messages, max_tokens=1,
                                                 temperature=0, extra_headers={"X-Keep-Ratio": "auto"})
            kept.append(out.usage.prompt_tokens_details.multimodal_tokens["image"])
        assert all(1 <= k < 144 for k in kept) and kept[0] == kept[2], kept
