"""Pruned Qwen2-VL, Qwen2.5-VL and Qwen3-VL offline (`vllm.LLM`, fp32): keep 1.0 is the stock model,
and kept image tokens, the text after them and decode get the stock M-RoPE positions,
with the prefix cache, in 32-token prefill chunks, and next to a video.

"Stock positions" are transformers' (what its language model receives while generating).
The positions tested are the ones vLLM's language model receives: a forward pre-hook
in the worker records them, and a wrapper records which indices the method kept, so
the expected positions are the stock ones at those indices.
"""

from __future__ import annotations

import functools
import inspect
import json

import numpy as np
import pytest
import torch
from reference import NEW_TOKENS, QUESTION, chat, hf_greedy, hf_model, noise_image, stock_greedy

from vllm_tokenprune.families import FAMILIES, of_architectures
from vllm_tokenprune.policy import frame_shares, keep_count, video_keep_count
from vllm_tokenprune.selection.methods import IMAGE_METHOD_NAMES
from vllm_tokenprune.serving import plugin
from vllm_tokenprune.serving.models.mrope import POSITION_COLUMNS
from vllm_tokenprune.testbed.tiny import count_image_tokens, cpu_dtype, image_token_id

STOCK_ARCH = {f.name: f.stock for f in FAMILIES if f.mrope}  # the M-RoPE families
METHODS = ("learned", "random", "norm")


def images(seed: int):
    """A wide and a tall image (h > w: text after a tall image continues at start + h)."""
    return [noise_image(336, 252, seed=seed), noise_image(200, 300, seed=seed + 1)]


# --- in the worker (sent by `LLM.apply_model`) -------------------------------------------

def _install_probes(model) -> None:
    """Record the positions the language model receives and the indices each image keeps;
    and of the last request, its position inputs and encoder outputs (position columns
    included)."""
    model.probe_positions, model.probe_kept, model.probe_embeds, model.probe_mrope = [], [], [], []

    def record(_, args, kwargs):  # Qwen3.5's layers take their arguments by keyword, the others' by position
        model.probe_positions.append((kwargs["positions"] if "positions" in kwargs else args[0]).tolist())

    # The first decoder layer: vLLM's compile decorator calls the language model's
    # forward directly, past module hooks; its layers are called as modules.
    model.language_model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    select = model._select

    def recording(jobs):
        kept = select(jobs)
        model.probe_kept.extend(rows.index.tolist() for rows in kept)
        return kept

    model._select = recording
    embed, positions = model.embed_multimodal, model.get_mrope_input_positions

    def embedding(**kwargs):
        out = embed(**kwargs)
        model.probe_embeds.extend(e.clone() for e in out)
        return out

    def positioning(input_tokens, mm_features):  # a request arrives: it is the one recorded
        model.probe_mrope, model.probe_embeds = [(list(input_tokens), mm_features)], []
        return positions(input_tokens, mm_features)

    model.embed_multimodal, model.get_mrope_input_positions = embedding, positioning


def _take_probes(model):
    taken = model.probe_positions, model.probe_kept
    model.probe_positions, model.probe_kept = [], []
    return taken


def _replay_on_runner_v2(model, windows):
    """For ``apply_model``: the last request's prefill again, through Model Runner V2's own
    ``RopeState`` and ``MultiModalPruner`` with this model, one step per (start, end)
    window of prompt tokens; returns V2's prefill positions and delta afterwards."""
    from types import SimpleNamespace

    from vllm.v1.worker.cpu import buffer_utils as cpu_buffers
    from vllm.v1.worker.gpu import buffer_utils
    from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache
    from vllm.v1.worker.gpu.mm.rope import RopeState
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    (tokens, features), embeds = model.probe_mrope[0], model.probe_embeds  # images in prompt order
    pinned, buffer_utils.UvaBuffer = buffer_utils.UvaBuffer, cpu_buffers.UvaBuffer  # pinning needs CUDA
    try:
        rope = RopeState(3, 1, len(tokens), len(tokens) + 1, torch.device("cpu"))
    finally:
        buffer_utils.UvaBuffer = pinned
    # V2's init_prefill_positions, its staged write applied by hand (a Triton kernel in V2)
    positions, delta = type(model).get_mrope_input_positions(model, tokens, features)  # unrecorded
    rope.prefill_positions.gpu[:3, :len(tokens)] = positions
    rope.prefill_delta.np[0] = delta
    cache = EncoderCache()
    cache.mm_features["r"] = features
    width = embeds[0].shape[1] - POSITION_COLUMNS
    pruner = MultiModalPruner(model, rope, cache, width)
    states = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=torch.tensor([tokens], dtype=torch.int32)))
    for start, end in windows:
        # What V2's EncoderRunner.gather_mm_embeddings hands over for this window
        gathered = []
        for feature, embed in zip(features, embeds):
            place = feature.mm_position
            lo, hi = max(start - place.offset, 0), min(end - place.offset, place.length)
            if lo < hi:
                gathered.append(embed[lo:hi])
        if not gathered:
            continue
        batch = SimpleNamespace(req_ids=["r"], idx_mapping_np=np.array([0]),
                                prefill_len_np=np.array([len(tokens)]),
                                num_computed_prefill_tokens_np=np.array([start]),
                                num_scheduled_tokens=np.array([end - start]))
        cleaned = pruner.recompute(gathered, batch, states)
        assert [c.shape for c in cleaned] == [(len(g), width) for g in gathered]
        assert all(torch.equal(c, g[:, :width]) for c, g in zip(cleaned, gathered))
    return rope.prefill_positions.gpu[:3, :len(tokens)].tolist(), int(rope.prefill_delta.np[0])


def _runner_flag(worker) -> bool:
    return worker.model_runner.is_multimodal_pruning_enabled


# --- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(STOCK_ARCH))
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def path(tiny_checkpoint, arch):
    return tiny_checkpoint(arch)


@pytest.fixture(scope="module")
def probe_env():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends functions
        yield


def load(path, arch, selector, **engine_args):
    from vllm import LLM

    overrides = {"architectures": [of_architectures([STOCK_ARCH[arch]]).pruned],
                 "tokenprune_selector": str(selector)}
    llm = LLM(model=str(path), dtype=cpu_dtype(arch), enforce_eager=True, max_model_len=4096,
              hf_overrides=overrides, limit_mm_per_prompt={"image": 2, "video": 1},
              seed=0, **engine_args)
    llm.apply_model(_install_probes)
    return llm


@pytest.fixture(scope="module")
def llm(path, arch, random_selector, probe_env):
    # 32-token blocks: a repeated tiny prompt finds its images in cached blocks.
    llm = load(path, arch, random_selector(arch), block_size=32)
    yield llm
    llm.llm_engine.engine_core.shutdown()


CHUNK = 32  # tokens per prefill step: even the prompts at keep 0.25 take several


@pytest.fixture(scope="module")
def chunked_llm(path, arch, random_selector, probe_env):
    llm = load(path, arch, random_selector(arch), enable_chunked_prefill=True,
               max_num_batched_tokens=CHUNK, max_num_seqs=4, enable_prefix_caching=False)
    yield llm
    llm.llm_engine.engine_core.shutdown()


# --- helpers -----------------------------------------------------------------------------

def hf_positions(path, imgs) -> torch.Tensor:
    """transformers' (t, h, w) positions for the chat with ``imgs``: the prompt's, then one
    column per decode step (NEW_TOKENS - 1)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model, _ = hf_model(path)
    inputs = processor.apply_chat_template(
        chat(imgs, lambda image: {"type": "image", "image": image}),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    seen = []
    # Row 0 of position_ids is the 1-D text position; rows 1-3 are M-RoPE's (t, h, w).
    model.model.language_model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["position_ids"][1:, 0]), with_kwargs=True)
    with torch.no_grad():
        model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS)
    return torch.cat(seen, dim=1)


@pytest.fixture(scope="module")
def stock(path, arch):
    """The stock model's prompt ids and greedy tokens (``reference.stock_greedy``) and
    transformers' positions for images(1)."""
    prompt, tokens = stock_greedy(path, images(1), cpu_dtype(arch))
    return prompt, tokens, hf_positions(path, images(1))


def probes(llm) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Positions (3, tokens) per forward step and kept indices per encoded image, since the
    last call (sent as lists: tensors nested in an RPC result do not survive the trip)."""
    ((steps, kept),) = llm.apply_model(_take_probes)
    return [torch.tensor(s) for s in steps], [torch.tensor(k) for k in kept]


GREEDY = dict(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=2)
# Two runs of a bf16 model (Qwen3.5 on CPU) that compute the same thing in another order
# (chunks, a batch, cached blocks) may part at a near-tie: where each picks a token the
# other ranks within this many nats of its own pick (the T test's logprob tolerance).
BF16_TIE = 0.15


def assert_same_greedy(a, b, arch: str, context) -> None:
    """``a`` and ``b`` answer with the same greedy tokens; in bf16 up to a near-tie, after
    which the continuations differ by construction and are not compared."""
    for i, (x, y) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids, strict=True)):
        if x == y:
            continue
        tie = all(other in step and step[mine].logprob - step[other].logprob <= BF16_TIE
                  for step, mine, other in ((a.outputs[0].logprobs[i], x, y), (b.outputs[0].logprobs[i], y, x)))
        assert cpu_dtype(arch) == "bfloat16" and tie, (context, i, a.outputs[0].token_ids, b.outputs[0].token_ids)
        return


def request(llm, imgs, video=None, **mm_kwargs) -> dict:
    """``LLM.generate`` input for the reference chat (``reference.chat``): the images, a
    video after the first one if given, then the question."""
    content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": QUESTION}]
    data = {"image": imgs} if imgs else {}
    if video is not None:
        content.insert(1, {"type": "video"})
        data["video"] = video
    text = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return {"prompt": text, "multi_modal_data": data, "mm_processor_kwargs": mm_kwargs}


def run(llm, imgs, video=None, **mm_kwargs):
    """One greedy request alone: (output, positions per step, kept indices per image)."""
    from vllm import SamplingParams

    (out,) = llm.generate(request(llm, imgs, video, **mm_kwargs), SamplingParams(**GREEDY),
                          use_tqdm=False)
    return (out, *probes(llm))


def stock_columns(stock_ids: list[int], media: int | set[int], kept: list[torch.Tensor]) -> list[int]:
    """For each token of the pruned prompt, the index of the stock token whose position it
    must have: text maps to the same text, media item i's j-th token to kept[i][j] (``media``:
    the image token, or the image and video tokens)."""
    media = {media} if isinstance(media, int) else media
    columns, i, runs = [], 0, iter(kept)
    while i < len(stock_ids):
        if stock_ids[i] not in media:
            columns.append(i)
            i += 1
            continue
        start = i
        while i < len(stock_ids) and stock_ids[i] == stock_ids[start]:
            i += 1
        columns += (start + next(runs)).tolist()
    return columns


def assert_stock_positions(out, steps, kept, stock_ids, stock_positions, media):
    """The recorded positions (uncached prompt tokens, then decode) are the stock ones."""
    positions = torch.cat(steps, dim=1)
    columns = stock_columns(stock_ids, media, kept)
    assert [stock_ids[c] for c in columns] == out.prompt_token_ids
    cached = out.num_cached_tokens or 0
    decode = stock_positions[:, len(stock_ids):]
    want = torch.cat([stock_positions[:, columns][:, cached:], decode], dim=1)
    assert torch.equal(positions, want)


def full_kept(path, imgs):
    return [torch.arange(count_image_tokens(path, im.size)) for im in imgs]


# --- tests -------------------------------------------------------------------------------

def test_runner_shim_targets_are_where_vllm_keeps_them():
    """If this fails, vLLM moved what plugin._let_runner_recompute_mrope patches."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    plugin.register()
    plugin.register()
    for runner in (GPUModelRunner, CPUModelRunner):
        load_model = runner.__dict__["load_model"]
        assert getattr(load_model, plugin._PATCHED)
        assert not getattr(load_model.__wrapped__, plugin._PATCHED, False)  # wrapped once
    # The flag is the runner's, read where it gathers encoder outputs, and only then does
    # the runner let the model recompute positions.
    gather = inspect.getsource(GPUModelRunner._gather_mm_embeddings)
    assert "if self.is_multimodal_pruning_enabled and self.uses_mrope:" in gather
    assert "self.model.recompute_mrope_positions(" in gather
    # The CPU runner still never sets it (when it does, the shim is no longer needed), and the
    # GPU runner's rule for vLLM's own EVS is the one the shim applies to stock models on the CPU.
    assert "is_multimodal_pruning_enabled" not in inspect.getsource(CPUModelRunner)
    assert "supports_multimodal_pruning(self.get_model())" in inspect.getsource(GPUModelRunner.load_model)
    assert "mm_config.is_multimodal_pruning_enabled()" in inspect.getsource(GPUModelRunner.load_model)


def test_encoder_cuda_graphs_stay_off_where_the_stock_model_would_capture_them():
    """Their replay bypasses embed_multimodal (pruning); stock Qwen2-VL, which has no EVS,
    captures images and videos whatever the pruning flag."""
    from types import SimpleNamespace

    from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

    from vllm_tokenprune.serving.models.qwen2_vl import PrunedQwen2VLForConditionalGeneration

    model = PrunedQwen2VLForConditionalGeneration.__new__(PrunedQwen2VLForConditionalGeneration)
    torch.nn.Module.__init__(model)
    model.visual, model.get_max_frames_per_video = SimpleNamespace(out_hidden_size=8), lambda: 4
    assert Qwen2VLForConditionalGeneration.get_encoder_cudagraph_config(model).modalities == ["image", "video"]
    assert model.get_encoder_cudagraph_config().modalities == []


@pytest.mark.vllm
def test_runner_recomputes_positions_for_our_model(llm):
    assert llm.collective_rpc(_runner_flag) == [True]


@pytest.mark.vllm
def test_keep_one_is_the_stock_model(llm, path, stock):
    prompt, tokens, positions = stock
    for kwargs in ({}, *({"keep_ratio": 1.0, "prune_method": m} for m in METHODS)):
        out, seen, kept = run(llm, images(1), **kwargs)
        assert out.prompt_token_ids == prompt, kwargs
        assert list(out.outputs[0].token_ids) == tokens, kwargs
        assert_stock_positions(out, seen, kept or full_kept(path, images(1)), prompt, positions,
                               image_token_id(path))


@pytest.mark.vllm
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_kept_tokens_text_and_decode_have_stock_positions(llm, path, stock, ratio):
    prompt, _, positions = stock
    sizes = [count_image_tokens(path, im.size) for im in images(1)]
    for method in METHODS:
        out, seen, kept = run(llm, images(1), keep_ratio=ratio, prune_method=method)
        assert [len(k) for k in kept] == [keep_count(n, ratio) for n in sizes], method
        assert_stock_positions(out, seen, kept, prompt, positions, image_token_id(path))


@pytest.mark.vllm
def test_every_method_keeps_one_and_all_but_one_token_at_stock_positions(llm, path):
    img = images(9)[:1]
    prompt, _, _ = hf_greedy(path, img, new_tokens=1)
    positions = hf_positions(path, img)
    n = count_image_tokens(path, img[0].size)
    for k in (1, n - 1):
        for method in IMAGE_METHOD_NAMES:
            out, seen, kept = run(llm, img, keep_ratio=k / n, prune_method=method)
            assert [len(rows) for rows in kept] == [k], (method, k)
            assert len(prompt) - len(out.prompt_token_ids) == n - k, (method, k)
            assert_stock_positions(out, seen, kept, prompt, positions, image_token_id(path))


@pytest.mark.vllm
def test_prefix_cache_hit_gives_the_same_output_and_positions(llm, path, arch):
    imgs = images(3)
    prompt, _, _ = hf_greedy(path, imgs, new_tokens=1)
    positions = hf_positions(path, imgs)
    # Keep 0.5: the prompt must fill a cache block, and Qwen3.5's hybrid cache blocks (sized
    # to match a linear-attention state) are 64 tokens on its tiny checkpoint.
    first, first_seen, kept = run(llm, imgs, keep_ratio=0.5, prune_method="norm")
    again, again_seen, _ = run(llm, imgs, keep_ratio=0.5, prune_method="norm")
    # The repeat reads the first image's tokens from cached blocks, runs no recompute
    # there, and still continues at the stock positions.
    first_image = again.prompt_token_ids.index(image_token_id(path))
    assert again.num_cached_tokens > first_image
    assert_same_greedy(again, first, arch, "prefix-cache repeat")
    for out, seen in ((first, first_seen), (again, again_seen)):
        assert_stock_positions(out, seen, kept, prompt, positions, image_token_id(path))


@pytest.mark.vllm
def test_chunked_prefill_matches_one_step_prefill(llm, chunked_llm, path, stock, arch):
    prompt, _, positions = stock
    for kwargs in ({"keep_ratio": 0.25, "prune_method": "norm"},
                   {"keep_ratio": 0.5, "prune_method": "random"}, {"keep_ratio": 1.0}):
        whole, _, _ = run(llm, images(1), **kwargs)
        chunked, seen, kept = run(chunked_llm, images(1), **kwargs)
        assert_same_greedy(chunked, whole, arch, kwargs)
        prefill_steps = seen[: len(seen) - (NEW_TOKENS - 1)]
        assert len(prefill_steps) > 1 and prefill_steps[0].shape[1] == CHUNK, kwargs
        assert_stock_positions(chunked, seen, kept or full_kept(path, images(1)), prompt,
                               positions, image_token_id(path))


def video(frames: int = 4, side: int = 112):
    pixels = np.random.default_rng(7).integers(0, 256, (frames, side, side, 3), dtype=np.uint8)
    metadata = {"fps": 2.0, "duration": frames / 2.0, "total_num_frames": frames,
                "frames_indices": list(range(frames)), "video_backend": "opencv",
                "do_sample_frames": False}
    return pixels, metadata


@pytest.mark.vllm
def test_pruned_images_around_an_unpruned_video(llm, path):
    """image, video, image in one prompt: the images pruned, the video whole, every
    position as in the same prompt at keep 1.0 (the stock layout)."""
    imgs = images(5)
    full, full_seen, _ = run(llm, imgs, video(), keep_ratio=1.0)
    pruned, seen, kept = run(llm, imgs, video(), keep_ratio=0.25, prune_method="norm")
    assert not full.num_cached_tokens
    sizes = [count_image_tokens(path, im.size) for im in imgs]
    assert [len(k) for k in kept] == [keep_count(n, 0.25) for n in sizes]
    assert len(full.prompt_token_ids) - len(pruned.prompt_token_ids) == sum(
        n - keep_count(n, 0.25) for n in sizes)
    assert_stock_positions(pruned, seen, kept, full.prompt_token_ids, torch.cat(full_seen, dim=1),
                           image_token_id(path))


def video_token_id(path) -> int:
    return json.loads((path / "config.json").read_text())["video_token_id"]


def video_shape(path, prompt: list[int], frames: int) -> tuple[int, int]:
    """A video's N and tokens per frame: its tokens in a prompt that holds it whole, over its
    temporal patches (the processor sizes frames to its own multiples)."""
    n = prompt.count(video_token_id(path))
    return n, n // (frames // json.loads((path / "config.json").read_text())["vision_config"]["temporal_patch_size"])


@pytest.mark.vllm
def test_a_pruned_video_keeps_k_tokens_at_their_stock_positions(llm, path, arch):
    """image, video, image: the video keeps exactly K tokens (the method's own, a clip at once
    for evs, frame by frame for the others), each at its stock (t, h, w), and the text and
    images after it keep theirs. On Qwen3-VL and Qwen3.5, whose frames sit apart between
    timestamps, every frame keeps its share (evs: the first whole, the rest shared)."""
    imgs, clip = images(13), video(frames=8)
    full, full_seen, _ = run(llm, imgs, clip)
    n, frame = video_shape(path, full.prompt_token_ids, 8)
    frames, apart = n // frame, STOCK_ARCH[arch].startswith("Qwen3")
    whole = [torch.arange(count_image_tokens(path, im.size)) for im in imgs]
    for method, ratio in (("evs", 0.5), ("evs", 0.1), ("norm", 0.25), ("random", 0.5), ("learned", 0.25)):
        pruned, seen, kept = run(llm, imgs, clip, video_keep_ratio=ratio, video_prune_method=method)
        k = video_keep_count(n, frame, ratio, method == "evs")
        assert len(full.prompt_token_ids) - len(pruned.prompt_token_ids) == n - k, method
        # the video's rows: one job, or one per frame (each its share of K, in frame order)
        shares = [k] if method == "evs" else frame_shares(k, [frame] * frames, first_frame_whole=False)
        assert [len(rows) for rows in kept] == shares, method
        runs = video_runs(kept, method, n, frame, apart)
        if method == "evs":
            assert torch.equal(runs[0][:frame], torch.arange(frame))  # the first frame whole
        if apart:
            assert [len(r) for r in runs] == frame_shares(k, [frame] * frames, method == "evs"), method
        assert_stock_positions(pruned, seen, [whole[0], *runs, whole[1]], full.prompt_token_ids,
                               torch.cat(full_seen, dim=1), {image_token_id(path), video_token_id(path)})


def video_runs(kept: list[torch.Tensor], method: str, n: int, frame: int, apart: bool) -> list[torch.Tensor]:
    """A video's kept indices as its prompt's runs hold them (``stock_columns``): one run of
    indices into the video, or, where frames sit apart, one run per frame of indices into it;
    ``kept`` as the model's jobs gave them (one for evs, else one per frame)."""
    index = torch.cat([rows + (0 if method == "evs" else f * frame) for f, rows in enumerate(kept)])
    return [index[index // frame == f] - f * frame for f in range(n // frame)] if apart else [index]


@pytest.mark.vllm
def test_a_pruned_video_in_prefill_chunks_and_from_the_prefix_cache_keeps_its_positions(
        llm, chunked_llm, path, arch):
    """32-token chunks cut through the video (and through Qwen3-VL's timestamps), and a repeat
    reads part of it from cached blocks: the answers of one prefill, at the stock positions."""
    clip = video(frames=8)
    apart, media = STOCK_ARCH[arch].startswith("Qwen3"), {video_token_id(path)}
    full, full_seen, _ = run(chunked_llm, [], clip)
    n, frame = video_shape(path, full.prompt_token_ids, 8)
    for method, ratio in (("evs", 0.5), ("norm", 0.25)):
        whole, _, _ = run(llm, [], clip, video_keep_ratio=ratio, video_prune_method=method)
        again, again_seen, _ = run(llm, [], clip, video_keep_ratio=ratio, video_prune_method=method)
        chunked, seen, kept = run(chunked_llm, [], clip, video_keep_ratio=ratio, video_prune_method=method)
        assert chunked.prompt_token_ids == whole.prompt_token_ids and len(seen[0][0]) == CHUNK
        assert_same_greedy(chunked, whole, arch, method)
        assert_stock_positions(chunked, seen, video_runs(kept, method, n, frame, apart), full.prompt_token_ids,
                               torch.cat(full_seen, dim=1), media)
        assert again.num_cached_tokens > 0  # the video's first blocks read from the prefix cache
        assert_same_greedy(again, whole, arch, method)
        assert_stock_positions(again, again_seen, video_runs(kept, method, n, frame, apart), full.prompt_token_ids,
                               torch.cat(full_seen, dim=1), media)


@pytest.mark.vllm
def test_a_batch_of_ratios_answers_as_each_request_alone(llm, path, arch):
    """Requests of different ratios sent together: requests scheduled in one step share
    one encoder call (per-image K, method, seed) and get one position recompute each."""
    from vllm import SamplingParams

    asks = [{"keep_ratio": 0.25, "prune_method": "norm"}, {"keep_ratio": 1.0},
            {"keep_ratio": 0.5, "prune_method": "random"}, {"keep_ratio": 0.1, "prune_method": "norm"}]
    for attempt in range(6):  # on a loaded host three tries have all come one by one
        imgs = images(7 + 10 * attempt)  # new images each time: no cache hit shortens a retry
        batch = llm.generate([request(llm, imgs, **kwargs) for kwargs in asks],
                             SamplingParams(**GREEDY), use_tqdm=False)
        steps, kept = probes(llm)
        # The engine schedules requests as they arrive, so some step should prefill several;
        # where the engine happened to take them one by one, the batch is sent again.
        if max(s.shape[1] for s in steps) > max(len(out.prompt_token_ids) for out in batch) + len(asks):
            break
    else:
        pytest.fail("in six tries the engine never prefilled two of the requests in one step")
    sizes = [count_image_tokens(path, im.size) for im in imgs]
    assert sorted(len(k) for k in kept) == sorted(
        keep_count(n, kwargs["keep_ratio"]) for kwargs in asks for n in sizes)
    for out, kwargs in zip(batch, asks):
        alone, _, _ = run(llm, imgs, **kwargs)
        assert alone.prompt_token_ids == out.prompt_token_ids, kwargs
        assert_same_greedy(alone, out, arch, kwargs)


# --- Model Runner V2 (the GPU default; it needs Triton, so its pruner is driven directly) --

def test_runner_v2_hooks_are_where_vllm_keeps_them():
    """If this fails, vLLM moved what models/runner_v2.py relies on."""
    from vllm.v1.worker.gpu.model_states import resolve_model_state_cls
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    assert 'if hasattr(model, "get_model_state_cls"):' in inspect.getsource(resolve_model_state_cls)
    assert list(inspect.signature(DefaultModelState.__init__).parameters) == [
        "self", "vllm_config", "model", "encoder_cache", "device"]
    assert "self.mm_pruner.recompute(" in inspect.getsource(DefaultModelState.prepare_inputs_embeds)
    assert list(inspect.signature(MultiModalPruner.__init__).parameters) == [
        "self", "model", "rope_state", "encoder_cache", "inputs_embeds_size"]
    assert "self.model.recompute_mrope_positions(" in inspect.getsource(MultiModalPruner.recompute)


def test_our_model_state_turns_the_v2_pruner_on(monkeypatch):
    from types import SimpleNamespace

    from vllm.v1.worker.gpu.model_states.default import DefaultModelState
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    from vllm_tokenprune.serving.models.runner_v2 import PrunedMRopeModelState

    seen = {}

    def default_init(self, vllm_config, model, encoder_cache, device):
        seen["flag while the state is built"] = model.is_multimodal_pruning_enabled
        self.rope_state, self.mm_pruner, self.inputs_embeds_size = vllm_config.rope_state, None, 8

    monkeypatch.setattr(DefaultModelState, "__init__", default_init)
    model = SimpleNamespace(is_multimodal_pruning_enabled=False)
    state = PrunedMRopeModelState(SimpleNamespace(rope_state="rope"), model, "cache", "cpu")
    assert seen == {"flag while the state is built": True}
    assert isinstance(state.mm_pruner, MultiModalPruner) and state.mm_pruner.model is model
    assert (state.mm_pruner.rope_state, state.mm_pruner.encoder_cache) == ("rope", "cache")
    with pytest.raises(ValueError, match="provisional positions"):
        PrunedMRopeModelState(SimpleNamespace(rope_state=None), model, "cache", "cpu")


def test_a_hybrid_model_gets_the_hybrid_state_v2_would_give_it():
    """Qwen3.5's Gated DeltaNet layers keep their recurrent state in V2's Mamba-hybrid state."""
    from vllm.v1.worker.gpu.model_states import resolve_model_state_cls
    from vllm.v1.worker.gpu.model_states.mamba_hybrid import MambaHybridModelState

    from vllm_tokenprune.serving.models.runner_v2 import PrunedMRopeHybridModelState, PrunedMRopeModelState

    assert "MambaHybridModelState" in inspect.getsource(resolve_model_state_cls)
    assert issubclass(PrunedMRopeHybridModelState, MambaHybridModelState)
    for family in FAMILIES:
        if family.mrope:
            model_class = plugin_class(family)
            want = PrunedMRopeHybridModelState if getattr(model_class, "is_hybrid", False) else PrunedMRopeModelState
            assert model_class.get_model_state_cls(model_class) is want, family.name
    for stock in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
        assert plugin_class(of_architectures([stock])).is_hybrid


def plugin_class(family):
    import importlib

    module, name = family.target.split(":")
    return getattr(importlib.import_module(module), name)


def test_a_configuration_that_would_serve_wrong_positions_stops_at_start_up(monkeypatch):
    from types import SimpleNamespace

    from vllm_tokenprune.serving.models import mrope
    from vllm_tokenprune.serving.models.runner_v2 import PrunedMRopeModelState

    def config(pp=1, v2=False):
        return SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=pp), use_v2_model_runner=v2)

    ours = SimpleNamespace(get_model_state_cls=lambda: PrunedMRopeModelState)
    plugin.register()
    mrope.check_position_recompute(config(), ours)  # V1, patched
    mrope.check_position_recompute(config(v2=True), ours)
    with pytest.raises(ValueError, match="pipeline parallelism"):
        mrope.check_position_recompute(config(pp=2), ours)
    from vllm.v1.worker.gpu import model_states
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    with monkeypatch.context() as vllm_without_the_hook:
        vllm_without_the_hook.setattr(model_states, "resolve_model_state_cls", lambda *_: DefaultModelState)
        with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
            mrope.check_position_recompute(config(v2=True), ours)
    monkeypatch.setattr(plugin, "v1_runners_recompute_mrope", lambda: False)
    with pytest.raises(ValueError, match="V1 runners moved"):
        mrope.check_position_recompute(config(), ours)


def prompt_windows(length: int, cached: int = 0, chunk: int | None = None) -> list[tuple[int, int]]:
    step = chunk or length
    return [(start, min(start + step, length)) for start in range(cached, length, step)]


@pytest.mark.vllm
@pytest.mark.parametrize("count", [1, 2])
def test_runner_v2_recomputes_stock_positions(llm, path, count):
    """Our model's embeddings and positions through V2's MultiModalPruner: one and two
    images, text before and after them, in one step, in 32-token chunks (boundaries inside
    images), and after a cached prefix that ends inside and after the first image."""
    imgs = images(11 + count)[:count]
    prompt, _, _ = hf_greedy(path, imgs, new_tokens=1)
    stock_positions = hf_positions(path, imgs)
    out, _, kept = run(llm, imgs, keep_ratio=0.25, prune_method="norm")
    ids = out.prompt_token_ids
    want = stock_positions[:, stock_columns(prompt, image_token_id(path), kept)]
    first_image = ids.index(image_token_id(path))
    first_end = first_image + len(kept[0])
    for cached, chunk in [(0, None), (0, CHUNK), (first_image + len(kept[0]) // 2, None), (first_end + 1, None)]:
        replay = functools.partial(_replay_on_runner_v2, windows=prompt_windows(len(ids), cached, chunk))
        positions, delta = llm.apply_model(replay)[0]
        positions = torch.tensor(positions)
        assert torch.equal(positions[:, cached:], want[:, cached:]), (cached, chunk)
        # Decode continues at position + delta, as the stock model's first decode step does.
        assert len(ids) + delta == int(stock_positions[0, len(prompt)]), (cached, chunk)
