"""The tower never takes more at once than vLLM's encoder budget, whatever K the scheduler
charged: at a low keep ratio the scheduler fits N / K times as many images into a step, and
the model runs them through the tower in chunks."""

from __future__ import annotations

import pytest
from reference import chat, noise_image

from vllm_tokenprune.families import by_name
from vllm_tokenprune.serving.models.model import _chunks
from vllm_tokenprune.testbed import tiny


def test_chunks_are_consecutive_within_the_budget_and_an_image_past_it_runs_alone():
    assert _chunks([4, 4, 4, 4, 4], 10) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert _chunks([12, 3, 3, 12], 10) == [slice(0, 1), slice(1, 3), slice(3, 4)]
    assert _chunks([5, 5], 10) == [slice(0, 2)]
    assert _chunks([], 10) == []


# --- in the worker (sent by `LLM.apply_model`) -------------------------------------------

def _record_tower_calls(model) -> None:
    """Record the rows (LLaVA: crops; Qwen: patches) of every tower call, and the images of
    every encoder call."""
    tower = model.visual if hasattr(model, "visual") else model.vision_tower
    forward, embed = tower.forward, model.embed_multimodal
    model.probe_tower, model.probe_encoder = [], []

    def counted_forward(pixels, *args, **kwargs):
        model.probe_tower.append(len(pixels))
        return forward(pixels, *args, **kwargs)

    def counted_embed(**kwargs):
        out = embed(**kwargs)
        model.probe_encoder.append(len(out))
        return out

    tower.forward, model.embed_multimodal = counted_forward, counted_embed


def _taken_calls(model) -> tuple[list[int], list[int]]:
    taken = model.probe_tower, model.probe_encoder
    model.probe_tower, model.probe_encoder = [], []
    return taken


def _profile_selections(worker) -> list[tuple[str, int, int]]:
    """vLLM's own memory profile run (the one that sizes the KV cache on a GPU), each
    selection job it runs recorded as (method, K, N)."""
    from vllm_tokenprune.selection import methods

    jobs, select_all = [], methods.select_all

    def recorded(batch):
        jobs.extend((name, k, len(tokens)) for name, tokens, k in batch)
        return select_all(batch)

    methods.select_all = recorded
    try:
        worker.model_runner.profile_run()
    finally:
        methods.select_all = select_all
    return jobs


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ["llava", "qwen2.5-vl"])
def test_many_images_at_a_low_ratio_stay_within_the_budget_and_the_profile_runs_every_method(
        arch, tiny_checkpoint, random_selector, monkeypatch):
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends functions
    path = tiny_checkpoint(arch)
    images = [noise_image(336, 252, seed=seed) for seed in range(24)]
    n = tiny.count_image_tokens(path, images[0].size)
    budget = 3 * n  # three unpruned images
    llm = LLM(model=str(path), dtype=tiny.cpu_dtype(arch), enforce_eager=True, max_model_len=4096, seed=0,
              # vLLM profiles the modality of the most tokens an item, on Qwen a video (never pruned)
              max_num_batched_tokens=budget, limit_mm_per_prompt={"image": 4, **({"video": 0} if arch == "qwen2.5-vl"
                                                                               else {})},
              hf_overrides={"architectures": [by_name(arch).pruned],
                            "tokenprune_selector": str(random_selector(arch))})
    try:
        llm.apply_model(_record_tower_calls)
        greedy = SamplingParams(temperature=0, max_tokens=3, min_tokens=3)
        requests = [chat(images[i:i + 4], lambda im: {"type": "image_pil", "image_pil": im}) for i in range(0, 24, 4)]
        together = llm.chat(requests, greedy, use_tqdm=False, mm_processor_kwargs={"keep_ratio": 0.05})
        ((tower, encoder),) = llm.apply_model(_taken_calls)
        # LLaVA's tower takes crops of N tokens; Qwen's, patches of which 2 x 2 make a token
        tokens = [rows // 4 if arch == "qwen2.5-vl" else rows * n for rows in tower]
        assert sum(tokens) == 24 * n and max(tokens) <= budget, tokens
        assert max(encoder) > 3, encoder  # the scheduler did fit more than the budget's images into a step
        alone = [llm.chat(r, greedy, use_tqdm=False, mm_processor_kwargs={"keep_ratio": 0.05})[0] for r in requests]
        assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
        assert all(len(o.prompt_token_ids) == len(a.prompt_token_ids) for o, a in zip(together, alone))

        # The profile's dummy images (the largest, kept whole at the default keep 1.0) also run
        # every method at K = 1, the least this policy lets a request keep, in the budget's chunks.
        from vllm_tokenprune.selection.methods import IMAGE_METHOD_NAMES

        ((jobs),) = llm.collective_rpc(_profile_selections)
        largest = max(n for _, _, n in jobs)
        probed = {name for name, k, n in jobs if k == 1}
        assert probed == set(IMAGE_METHOD_NAMES), probed
        kept_whole = [(name, n) for name, k, n in jobs if k == n]
        assert kept_whole and {name for name, _ in kept_whole} == {"learned"}  # the default method, at K = N
        assert all(n == largest for _, _, n in jobs)
        assert len(jobs) == len(kept_whole) * (1 + len(IMAGE_METHOD_NAMES)) and len(kept_whole) * largest <= max(
            budget, largest)
        assert llm.apply_model(_taken_calls)[0][1] == [len(kept_whole)]  # one encoder call: the profile's
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ["llava-next", "qwen2.5-vl", "gemma3"])
def test_extreme_images_and_ratios_never_raise_in_the_model(arch, tiny_checkpoint, random_selector):
    """Whatever the processor accepts, the model serves: a 1 x 1 image, 2 x 300 and 300 x 2
    strips (Qwen's processor refuses sides more than 200 times apart), many images in one
    request, every method, at one token and at all of them. (An exception in the model would
    end the engine; every request answering shows none did.)"""
    from vllm import LLM, SamplingParams

    from vllm_tokenprune.selection.methods import IMAGE_METHOD_NAMES

    path = tiny_checkpoint(arch)
    llm = LLM(model=str(path), dtype=tiny.cpu_dtype(arch), enforce_eager=True, max_model_len=4096, seed=0,
              limit_mm_per_prompt={"image": 6},
              hf_overrides={"architectures": [by_name(arch).pruned],
                            "tokenprune_selector": str(random_selector(arch))})
    try:
        shapes = [(1, 1), (2, 300), (300, 2), (17, 5)]
        requests = [chat([noise_image(w, h, seed=i)], lambda im: {"type": "image_pil", "image_pil": im})
                    for i, (w, h) in enumerate(shapes)]
        requests.append(chat([noise_image(40 + 9 * i, 30, seed=10 + i) for i in range(6)],
                             lambda im: {"type": "image_pil", "image_pil": im}))
        greedy = SamplingParams(temperature=0, max_tokens=2, min_tokens=2)
        for method in IMAGE_METHOD_NAMES:
            for ratio in (1e-6, 1.0):
                outs = llm.chat(requests, greedy, use_tqdm=False,
                                mm_processor_kwargs={"keep_ratio": ratio, "prune_method": method})
                assert [len(o.outputs[0].token_ids) for o in outs] == [2] * len(requests), (method, ratio)
    finally:
        llm.llm_engine.engine_core.shutdown()
