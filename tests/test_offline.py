"""Offline `vllm.LLM` with a pruned architecture: no server, no middleware, the request's
ratio passed as `mm_processor_kwargs` (no trust flag needed offline). The operator policy
travels in `hf_overrides`, as for a server, and the processor enforces it here too."""

from __future__ import annotations

import pytest
from reference import NEW_TOKENS, chat, hf_greedy, noise_image

from vllm_tokenprune.families import of_architectures
from vllm_tokenprune.policy import PrunePolicy, keep_count
from vllm_tokenprune.testbed.tiny import count_image_tokens

pytestmark = pytest.mark.vllm

IMAGE = noise_image(336, 252, seed=1)
POLICY = PrunePolicy(min_keep_ratio=0.1, keep_ratio_step=0.05, allowed_mm_kwargs=("do_normalize",))


@pytest.fixture(scope="module")
def llava(tiny_checkpoint):
    from vllm import LLM

    path = tiny_checkpoint("llava")
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=2048,
              hf_overrides={"architectures": [of_architectures(["LlavaForConditionalGeneration"]).pruned],
                            **POLICY.to_overrides()},
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


def test_the_operator_policy_applies_offline(llava):
    path, llm = llava
    n = count_image_tokens(path, IMAGE.size)
    full = len(run(llm).prompt_token_ids)
    for asked, applied in ((0.05, 0.1), (0.26, 0.25), (0.5, 0.5)):  # the floor, the step
        assert full - len(run(llm, keep_ratio=asked).prompt_token_ids) == n - keep_count(n, applied)
    # A kwarg the operator allowed reaches the HF processor; any other is refused.
    assert len(run(llm, keep_ratio=0.5, do_normalize=True).prompt_token_ids) == full - n + keep_count(n, 0.5)


@pytest.mark.parametrize("kwargs,param,match", [
    ({"keep_ratio": 0.5, "prune_method": "learned"}, "mm_processor_kwargs.prune_method", "needs a selector"),
    ({"keep_ratio": 2}, "mm_processor_kwargs.keep_ratio", "keep_ratio must be a number"),
    ({"size": {"height": 10}}, "mm_processor_kwargs.size", "is not accepted by this server"),
])
def test_refusals_name_the_key(llava, kwargs, param, match):
    from vllm.exceptions import VLLMValidationError

    _, llm = llava
    with pytest.raises(VLLMValidationError, match=match) as err:
        run(llm, **kwargs)
    assert err.value.parameter == param
    assert run(llm, keep_ratio=0.5).outputs[0].token_ids  # the engine is still fine
