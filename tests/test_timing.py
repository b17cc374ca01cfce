"""The one timing harness (tools/timing.py) that bench, costs and real_shapes share."""

from __future__ import annotations

import torch

from vllm_tokenprune.tools.timing import interleaved, vit_tower


def test_interleaved_runs_parts_in_order_every_round_and_reports_medians():
    calls = []
    parts = {"slow": lambda: calls.append("slow"), "fast": lambda: calls.append("fast")}
    medians = interleaved(parts, rounds=6, prepare=lambda: calls.append("prepare"), every={"slow": 3}, warmup=1)
    assert set(medians) == {"slow", "fast"} and all(m >= 0 for m in medians.values())
    # warm-up, then 6 rounds: prepare each round, slow in rounds 0 and 3 only, in the order given
    assert calls == ["prepare", "slow", "fast",
                     "prepare", "slow", "fast", "prepare", "fast", "prepare", "fast",
                     "prepare", "slow", "fast", "prepare", "fast", "prepare", "fast"]


def test_parts_run_without_autograd():
    seen = []
    interleaved({"part": lambda: seen.append(torch.is_grad_enabled())}, rounds=2)
    assert seen == [False, False, False]


def test_vit_tower_reports_its_tokens_and_width():
    forward, tokens, width = vit_tower("clip", "cpu", torch.float32, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, image_size=56)
    assert forward().shape == (1, tokens, width) == (1, 17, 32)  # 4 x 4 patches and [CLS]
    forward, tokens, width = vit_tower("siglip", "cpu", torch.float32, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, image_size=56)
    assert forward().shape == (1, tokens, width) == (1, 16, 32)
