"""Tiny checkpoints: deterministic, loadable by HF transformers, and identical in vLLM.

The vLLM tests load each arch once (20-40 s each on CPU) and compare its fp32 greedy
output with transformers' on the same prompt: same prompt ids (chat template, processor,
placeholder count), same generated tokens, same logprobs. That proves both load the
same weights the same way.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from reference import NEW_TOKENS, chat, hf_greedy, hf_model, noise_image

from vllm_tokenprune import cli
from vllm_tokenprune.testbed.tiny import ARCHES, build_tiny, count_image_tokens, cpu_dtype, image_token_id


def _sha256(path, name="model.safetensors") -> str:
    return hashlib.sha256((path / name).read_bytes()).hexdigest()


# A wide and a tall image: anyres / dynamic-resolution processors tile them differently.
IMAGES = [noise_image(336, 252, seed=1), noise_image(200, 300, seed=2)]


@pytest.mark.parametrize("arch", ARCHES)
def test_same_seed_same_bytes(tiny_checkpoint, tmp_path, arch):
    seed0 = tiny_checkpoint(arch)
    again = build_tiny(arch, tmp_path / "again", seed=0)
    names = sorted(f.name for f in seed0.iterdir())
    assert names == sorted(f.name for f in again.iterdir())
    # Every file, not only the weights: tokenizer training and configs are deterministic too.
    assert [_sha256(again, n) for n in names] == [_sha256(seed0, n) for n in names]
    assert _sha256(build_tiny(arch, tmp_path / "seed1", seed=1)) != _sha256(seed0)


@pytest.mark.parametrize("arch", ARCHES)
def test_loads_in_transformers(tiny_checkpoint, arch):
    from transformers import AutoProcessor

    path = tiny_checkpoint(arch)
    model, info = hf_model(path)
    # Every checkpoint key maps onto a parameter, and every parameter comes from the file.
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    processor = AutoProcessor.from_pretrained(path)
    messages = chat(IMAGES[:1], lambda image: {"type": "image", "image": image})
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    n_image = int((inputs["input_ids"] == image_token_id(path)).sum())
    assert n_image == count_image_tokens(path, IMAGES[0].size) > 0
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.isfinite(logits).all()
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=4)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ARCHES)
def test_vllm_matches_transformers(tiny_checkpoint, arch):
    from vllm import LLM, SamplingParams

    path = tiny_checkpoint(arch)
    # transformers' OneVision tiles an image (anyres) only when it is the prompt's sole
    # image (several images: the base crop each); vLLM tiles every image. One image agrees.
    images = IMAGES[:1] if arch == "llava-onevision" else IMAGES
    want_prompt, want_tokens, want_logprobs = hf_greedy(path, images)

    llm = LLM(
        model=str(path),
        dtype=cpu_dtype(arch),  # fp32: vLLM's CPU default, bf16, would not match transformers
        enforce_eager=True,
        max_model_len=4096,
        limit_mm_per_prompt={"image": 2},
        seed=0,
    )
    try:
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=0)
        messages = chat(images, lambda image: {"type": "image_pil", "image_pil": image})
        (out,) = llm.chat(messages, params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()

    completion = out.outputs[0]
    assert out.prompt_token_ids == want_prompt
    assert list(completion.token_ids) == want_tokens
    got_logprobs = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]
    # bf16 (Qwen3.5's only CPU dtype in vLLM) against transformers' fp32: the same tokens, and
    # logprobs as close as bf16 rounding over a few layers allows.
    np.testing.assert_allclose(got_logprobs, want_logprobs, atol=1e-3 if cpu_dtype(arch) == "float32" else 0.15)


def test_cli_refuses_non_empty_dir_without_force(tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["make-tiny", "--arch", "llava", "--out", str(out)]) != 0
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").exists()

    assert cli.main(["make-tiny", "--arch", "llava", "--out", str(out), "--force"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "image tokens" in printed
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").exists()


def test_import_does_not_import_vllm():
    code = "import sys, vllm_tokenprune.testbed.tiny; sys.exit('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
