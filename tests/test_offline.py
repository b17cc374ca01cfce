"""Offline `vllm.LLM` with a pruned architecture: no server, no middleware, the request's
ratio passed as `mm_processor_kwargs` (no trust flag needed offline)."""

from __future__ import annotations

import pytest
from reference import NEW_TOKENS, chat, hf_greedy, noise_image

from vllm_tokenprune.budget import keep_count
from vllm_tokenprune.plugin import PRUNED_ARCHITECTURES
from vllm_tokenprune.tiny import count_image_tokens

pytestmark = pytest.mark.vllm

IMAGE = noise_image(336, 252, seed=1)


@pytest.fixture(scope="module")
def llava(tiny_checkpoint):
    from vllm import LLM

    path = tiny_checkpoint("llava")
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=2048,
              hf_overrides={"architectures": [PRUNED_ARCHITECTURES["LlavaForConditionalGeneration"]]},
              seed=0)
    yield path, llm
    llm.llm_engine.engine_core.shutdown()


def run(llm, **mm_processor_kwargs):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    messages = chat([IMAGE], lambda im: {"type": "image_pil", "image_pil": im})
    (out,) = llm.chat(messages, params, use_tqdm=False, mm_processor_kwargs=mm_processor_kwargs)
    return out


def test_keep_one_reproduces_the_stock_model(llava):
    path, llm = llava
    prompt, tokens, _ = hf_greedy(path, [IMAGE])
    for kwargs in ({}, {"keep_ratio": 1.0}, {"keep_ratio": 1.0, "prune_method": "random"}):
        out = run(llm, **kwargs)
        assert out.prompt_token_ids == prompt, kwargs
        assert list(out.outputs[0].token_ids) == tokens, kwargs


def test_ratio_sets_the_placeholder_count(llava):
    path, llm = llava
    n = count_image_tokens(path, IMAGE.size)
    full = len(run(llm).prompt_token_ids)
    for ratio in (0.5, 0.25, 0.1):
        for method in ("random", "norm"):
            out = run(llm, keep_ratio=ratio, prune_method=method)
            assert full - len(out.prompt_token_ids) == n - keep_count(n, ratio)


def test_learned_without_a_selector_is_a_clear_error(llava):
    _, llm = llava
    with pytest.raises(ValueError, match="needs a selector"):
        run(llm, keep_ratio=0.5, prune_method="learned")
    with pytest.raises(ValueError, match="keep_ratio must be a number"):
        run(llm, keep_ratio=2)
    assert run(llm, keep_ratio=0.5).outputs[0].token_ids  # the engine is still fine
