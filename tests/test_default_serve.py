"""The README's first command: `vllm-tokenprune serve` with no model serves an embedded
default, built locally with no model hub."""

from __future__ import annotations

import openai
import pytest

from reference import noise_image
from server import Server
from vllm_tokenprune.client import image_url, prune_headers
from vllm_tokenprune.serve import DEFAULT_SERVED_NAME

pytestmark = pytest.mark.server


def test_serve_without_a_model(tmp_path):
    cache = tmp_path / "cache"
    with Server(None, log_path=tmp_path / "server.log",
                env={"VLLM_TOKENPRUNE_CACHE": str(cache)}) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [DEFAULT_SERVED_NAME]
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url(noise_image(64, 64, 0))}},
            {"type": "text", "text": "What is this?"}]}]
        tokens = {}
        for ratio in (1.0, 0.25):
            out = client.chat.completions.create(model=DEFAULT_SERVED_NAME, messages=messages,
                                                 max_tokens=4, extra_headers=prune_headers(ratio))
            tokens[ratio] = out.usage.prompt_tokens_details.multimodal_tokens["image"]
        assert tokens[0.25] == round(tokens[1.0] * 0.25)
    assert (cache / "default-llava" / "config.json").exists()
