"""The multimodal processor decides every request's pruning: vLLM's own processor class,
built from a tiny checkpoint's model config, driven directly (no engine, no server)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from density import density_image
from reference import noise_image

from vllm_tokenprune.families import of_architectures
from vllm_tokenprune.policy import PrunePolicy, keep_count
from vllm_tokenprune.selection import methods

pytestmark = pytest.mark.vllm

POLICY = PrunePolicy(min_keep_ratio=0.1, keep_ratio_step=0.05)
QUADRATIC = [m for m in methods.METHOD_NAMES if methods.get(m).quadratic_memory]
IMAGES = [noise_image(64, 48, seed=1), noise_image(48, 64, seed=2)]
IMAGE_TEXT = {"llava": "<image>\n", "qwen2.5-vl": "<|vision_start|><|image_pad|><|vision_end|>"}


@pytest.fixture(scope="module", params=list(IMAGE_TEXT))
def processor(request, tiny_checkpoint):
    """(arch, processor factory taking extra hf_overrides)."""
    from transformers import AutoConfig
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from vllm_tokenprune.serving import plugin

    plugin.register()
    path = tiny_checkpoint(request.param)
    stock = AutoConfig.from_pretrained(path).architectures[0]

    def make(**overrides):
        config = ModelConfig(model=str(path), limit_mm_per_prompt={"image": 2}, hf_overrides={
            "architectures": [of_architectures([stock]).pruned], **POLICY.to_overrides(), **overrides})
        return MULTIMODAL_REGISTRY.create_processor(config)

    return request.param, make


def process(proc, arch, images=IMAGES, cache=None, text="hi", **kwargs):
    return proc(IMAGE_TEXT[arch] * len(images) + text, proc.info.parse_mm_data({"image": list(images)}),
                hf_processor_mm_kwargs=kwargs, cache=cache)


def kept(out) -> list[int]:
    return [p.length for p in out["mm_placeholders"]["image"]]


def field(out, name: str) -> list[int]:
    """Column ``name`` of each image's plan."""
    from vllm_tokenprune.serving.models.common import PLAN_FIELD, plan_value

    return [plan_value(item[PLAN_FIELD].data, name) for item in out["mm_kwargs"]["image"]]


def unpruned(proc) -> list[int]:
    return [proc._unpruned_tokens(proc.info.parse_mm_data({"image": [im]})["image"].get_image_size(0), {})
            for im in IMAGES]


def test_the_processor_applies_the_policy_and_hashes_what_the_request_gets(processor):
    arch, make = processor
    proc = make()
    n = unpruned(proc)
    for asked, applied in ((None, 1.0), (0.5, 0.5), (0.02, 0.1), (0.26, 0.25)):
        out = process(proc, arch, **({} if asked is None else {"keep_ratio": asked}))
        assert kept(out) == [keep_count(x, applied) for x in n]
    # Ratios that resolve alike are one cache item; another ratio is another.
    hashes = {r: process(proc, arch, keep_ratio=r)["mm_hashes"]["image"] for r in (0.25, 0.26, 0.5)}
    assert hashes[0.25] == hashes[0.26] != hashes[0.5]


def test_the_plan_stays_on_the_cpu_where_the_model_reads_it_without_a_sync(processor):
    """vLLM moves batched fields to the device unless they are kept on the CPU; the model reads
    the plan (N, K, method, seed, probe) on the host, so on the device each read would wait
    for the GPU. One row per image, one field: vLLM pays per field of every item."""
    from vllm.multimodal.inputs import MultiModalKwargsItems

    from vllm_tokenprune.serving.models.common import PLAN_FIELD, PRUNE_FIELDS, QUERY_FIELD

    arch, make = processor
    proc = make()
    out = process(proc, arch, keep_ratio=0.5)
    batch = MultiModalKwargsItems({"image": out["mm_kwargs"]["image"]}).get_data(device="meta")
    assert batch[PLAN_FIELD].device.type == "cpu" and batch[PLAN_FIELD].dtype == torch.int64
    assert batch[PLAN_FIELD].shape == (len(IMAGES), len(PRUNE_FIELDS))
    assert batch[QUERY_FIELD].device.type == "meta" and batch["pixel_values"].device.type == "meta"
    assert field(out, "unpruned") == unpruned(proc) and field(out, "keep") == kept(out)


def test_random_is_seeded_from_vllms_item_hash_on_cache_hits_and_misses(processor):
    from vllm.multimodal.cache import MultiModalProcessorOnlyCache

    from vllm_tokenprune.serving.models.common import SEED_FIELD
    from vllm_tokenprune.serving.models.processor import item_seed

    arch, make = processor
    proc = make()
    cache = MultiModalProcessorOnlyCache(proc.info.ctx.model_config)
    first = process(proc, arch, images=IMAGES[1:], cache=cache, keep_ratio=0.5, prune_method="random")
    both = process(proc, arch, cache=cache, keep_ratio=0.5, prune_method="random")  # one hit, one miss
    again = process(proc, arch, keep_ratio=0.5, prune_method="random")  # no cache at all
    expected = [item_seed(h) for h in both["mm_hashes"]["image"]]
    assert field(both, SEED_FIELD) == field(again, SEED_FIELD) == expected
    assert field(first, SEED_FIELD) == expected[1:]
    assert len(set(expected)) == 2
    # Methods that draw nothing are not handed a seed.
    assert field(process(proc, arch, keep_ratio=0.5, prune_method="norm"), SEED_FIELD) == [0, 0]


@pytest.mark.parametrize("kwargs,param", [
    ({"size": {"height": 4}}, "mm_processor_kwargs.size"),
    ({"keep_ratio": "nan"}, "mm_processor_kwargs.keep_ratio"),
    ({"prune_method": "learned"}, "mm_processor_kwargs.prune_method"),  # no selector here
    ({"tokenprune_query": [1, 2]}, "mm_processor_kwargs.tokenprune_query"),  # the processor's, not a client's
    ({"tokenprune_probe": True}, "mm_processor_kwargs.tokenprune_probe"),  # the memory profile's
    ({"prune_method": "learned_query"}, "mm_processor_kwargs.prune_method"),  # no selector at all
])
def test_refusals_name_the_key(processor, kwargs, param):
    from vllm.exceptions import VLLMValidationError

    arch, make = processor
    with pytest.raises(VLLMValidationError) as err:
        process(make(), arch, **kwargs)
    assert err.value.parameter == param


def test_methods_that_hold_n_squared_values_are_refused_past_the_operators_bound(processor):
    """A 400 naming the method, not an out-of-memory engine; keep 1.0 runs no method and passes."""
    from vllm.exceptions import VLLMValidationError

    arch, make = processor
    largest = max(unpruned(make()))
    tight = make(tokenprune_max_quadratic_tokens=largest - 1)
    for method in QUADRATIC:
        with pytest.raises(VLLMValidationError, match=f"up to {largest - 1} tokens") as err:
            process(tight, arch, keep_ratio=0.5, prune_method=method)
        assert err.value.parameter == "mm_processor_kwargs.prune_method"
        assert kept(process(tight, arch, keep_ratio=1.0, prune_method=method)) == unpruned(tight)
    assert kept(process(tight, arch, keep_ratio=0.5, prune_method="divprune")) == [keep_count(n, 0.5)
                                                                                 for n in unpruned(tight)]
    for proc in (make(tokenprune_max_quadratic_tokens=largest), make(tokenprune_max_quadratic_tokens=0)):
        assert kept(process(proc, arch, keep_ratio=0.5, prune_method="mmtok")) == [keep_count(n, 0.5)
                                                                                  for n in unpruned(proc)]


def test_the_profiles_dummy_items_probe_every_method_the_server_runs_and_requests_none(processor, random_selector):
    """vLLM's memory profile runs the model on dummy items at the server's default K (all N
    here): they also name every method this server may run on such an image, at the
    smallest K the policy lets a request have, so that the profile takes what selection holds."""
    from vllm.multimodal.parse import ImageProcessorItems
    from vllm.multimodal.processing import TimingContext

    from vllm_tokenprune.serving.models.common import PROBE_KEEP_FIELD, PROBE_METHODS_FIELD

    arch, make = processor
    proc = make(tokenprune_selector=str(random_selector(arch)))
    dummy = proc.get_dummy_mm_inputs({"image": 1})
    inputs = proc.get_dummy_inputs(seq_len=4096, mm_counts={"image": 1}, mm_options={})
    n = proc._unpruned_tokens(inputs.mm_data_items.get_items("image", ImageProcessorItems).get_image_size(0), {})
    assert kept(dummy) == [n]  # kept whole: the counts vLLM derives from it stay stock
    assert field(dummy, PROBE_KEEP_FIELD) == [keep_count(n, 0.1)]  # POLICY's floor
    assert methods.mask_names(field(dummy, PROBE_METHODS_FIELD)[0]) == list(methods.IMAGE_METHOD_NAMES)
    # no probe on a request, even of the dummy's own image; another item for vLLM's caches
    request = proc.apply(inputs, timing_ctx=TimingContext(enabled=False))
    assert field(request, PROBE_METHODS_FIELD) == field(request, PROBE_KEEP_FIELD) == [0]
    assert request["mm_hashes"]["image"] != dummy["mm_hashes"]["image"]
    # a method this server refuses for such an image is not probed
    tight = make(tokenprune_selector=str(random_selector(arch)), tokenprune_max_quadratic_tokens=n - 1)
    probed = methods.mask_names(field(tight.get_dummy_mm_inputs({"image": 1}), PROBE_METHODS_FIELD)[0])
    assert probed == [m for m in methods.IMAGE_METHOD_NAMES if m not in QUADRATIC]
    bare = methods.mask_names(field(make().get_dummy_mm_inputs({"image": 1}), PROBE_METHODS_FIELD)[0])
    assert bare == [m for m in methods.IMAGE_METHOD_NAMES if methods.get(m).uses_selector is None]  # no selector


def test_an_allowed_hf_kwarg_reaches_the_hf_processor_and_k_follows_it(processor):
    arch, make = processor
    if arch == "llava":  # the image's pixels change, its token count does not
        proc = make(tokenprune_allowed_mm_kwargs=["do_normalize"])
        raw, normalized = (process(proc, arch, keep_ratio=0.5, do_normalize=flag) for flag in (False, True))
        assert kept(raw) == kept(normalized) == [keep_count(n, 0.5) for n in unpruned(proc)]
        assert not (raw["mm_kwargs"]["image"][0]["pixel_values"].data
                    == normalized["mm_kwargs"]["image"][0]["pixel_values"].data).all()
        return
    # Qwen: max_pixels decides how many tokens an image has, and so K.
    proc = make(tokenprune_allowed_mm_kwargs=["max_pixels"])
    image = [noise_image(336, 252, seed=3)]
    full, small = (process(proc, arch, images=image, keep_ratio=0.5, **kw) for kw in ({}, {"max_pixels": 28 * 28 * 16}))
    n = [int(g.prod()) // 4 for g in (o["mm_kwargs"]["image"][0]["image_grid_thw"].data for o in (full, small))]
    assert n[1] < n[0]
    assert kept(full) == [keep_count(n[0], 0.5)] and kept(small) == [keep_count(n[1], 0.5)]


def test_the_question_reaches_each_image_and_is_part_of_its_item_for_methods_that_read_it(processor):
    from vllm.multimodal.cache import MultiModalProcessorOnlyCache

    from vllm_tokenprune.serving.models.common import QUERY_FIELD

    arch, make = processor
    proc = make()
    cache = MultiModalProcessorOnlyCache(proc.info.ctx.model_config)

    def ask(question, method):
        return process(proc, arch, cache=cache, text=question, keep_ratio=0.5, prune_method=method)

    def questions(out) -> list[str]:
        return [proc.info.get_tokenizer().decode(item[QUERY_FIELD].data.tolist()).strip()
                for item in out["mm_kwargs"]["image"]]

    triangle = ask("what colour is the triangle ?", "cdpruner")
    # Each image gets the prompt's words: no placeholder, no special token.
    assert questions(triangle) == ["what colour is the triangle ?"] * 2
    again, circle = ask("what colour is the triangle ?", "cdpruner"), ask("what colour is the circle ?", "cdpruner")
    assert again["mm_hashes"] == triangle["mm_hashes"] and questions(again) == questions(triangle)  # a hit
    assert set(circle["mm_hashes"]["image"]).isdisjoint(triangle["mm_hashes"]["image"])
    assert questions(circle) == ["what colour is the circle ?"] * 2
    # Methods that do not read the question get none, and another question is the same item.
    norm = [ask(q, "norm") for q in ("what colour is the triangle ?", "what colour is the circle ?")]
    assert norm[0]["mm_hashes"] == norm[1]["mm_hashes"] and questions(norm[0]) == ["", ""]


def test_learned_query_needs_a_selector_that_reads_the_question(processor, budget_selector, random_selector):
    from vllm.exceptions import VLLMValidationError

    arch, make = processor
    with pytest.raises(VLLMValidationError, match="train-query") as err:  # a selector without the section
        process(make(tokenprune_selector=str(budget_selector(arch))), arch, prune_method="learned_query")
    assert err.value.parameter == "mm_processor_kwargs.prune_method"
    out = process(make(tokenprune_selector=str(random_selector(arch))), arch, keep_ratio=0.5,
                  prune_method="learned_query")
    assert kept(out) == [keep_count(n, 0.5) for n in unpruned(make())]


def test_metrics_count_served_requests_only(processor):
    from vllm_tokenprune.serving.metrics import REQUESTS

    arch, make = processor
    proc = make()
    counter = REQUESTS.labels(str(proc.info.ctx.model_config.served_model_name), "norm")
    before = counter._value.get()
    proc.get_dummy_mm_inputs({"image": 1})  # profiling and warm-up
    process(proc, arch, keep_ratio=0.5, tokenprune_not_served=True)  # /tokenize
    assert counter._value.get() == before
    process(proc, arch, keep_ratio=0.5)
    assert counter._value.get() == before + 1


def test_attention_methods_are_refused_up_front_when_the_tower_is_compiled(tiny_checkpoint):
    from vllm.config import CompilationMode, ModelConfig
    from vllm.exceptions import VLLMValidationError
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from vllm_tokenprune.serving.models.mrope import TOWER_COMPILED_KEY, check_tower_compilation

    path = tiny_checkpoint("qwen2.5-vl")
    config = ModelConfig(model=str(path), hf_overrides={
        "architectures": [of_architectures(["Qwen2_5_VLForConditionalGeneration"]).pruned], TOWER_COMPILED_KEY: True})
    proc = MULTIMODAL_REGISTRY.create_processor(config)
    with pytest.raises(VLLMValidationError, match="compile_mm_encoder") as err:
        process(proc, "qwen2.5-vl", keep_ratio=0.5, prune_method="cls_attention")
    assert err.value.parameter == "mm_processor_kwargs.prune_method"
    assert kept(process(proc, "qwen2.5-vl", keep_ratio=1.0, prune_method="norm"))
    # Without the key, a compiled tower stops the model at start-up.
    compiled = SimpleNamespace(compile_mm_encoder=True, mode=CompilationMode.VLLM_COMPILE)
    with pytest.raises(ValueError, match=TOWER_COMPILED_KEY):
        check_tower_compilation(compiled, SimpleNamespace())
    check_tower_compilation(compiled, SimpleNamespace(**{TOWER_COMPILED_KEY: True}))
    check_tower_compilation(SimpleNamespace(compile_mm_encoder=True, mode=CompilationMode.NONE), SimpleNamespace())


def test_auto_sizes_each_image_from_its_pixels_and_caches_what_decides_k(processor, budget_selector):
    from vllm.exceptions import VLLMValidationError
    from vllm.multimodal.cache import MultiModalProcessorOnlyCache

    arch, make = processor
    with pytest.raises(VLLMValidationError, match="budget predictor") as err:  # no selector, no predictor
        process(make(), arch, keep_ratio="auto")
    assert err.value.parameter == "mm_processor_kwargs.keep_ratio"

    proc = make(tokenprune_selector=str(budget_selector(arch)))
    blank, dense = density_image(168, 168, 0.0, seed=5), density_image(168, 168, 1.0, seed=5)
    images = [blank, dense]
    n = [proc._unpruned_tokens(proc.info.parse_mm_data({"image": [im]})["image"].get_image_size(0), {})
         for im in images]
    out = process(proc, arch, images=images, keep_ratio="auto")
    k_blank, k_dense = kept(out)
    assert k_blank < k_dense <= n[1]
    assert process(proc, arch, images=images, keep_ratio="auto")["mm_hashes"] == out["mm_hashes"]
    # The policy's floor and the request's bounds apply to each image's fraction.
    assert kept(process(proc, arch, images=images, keep_ratio="auto;max=0.2")) == [
        k_blank, min(k_dense, keep_count(n[1], 0.2))]
    assert kept(process(proc, arch, images=[blank], keep_ratio="auto;min=0.5")) == [keep_count(n[0], 0.5)]
    # auto is its own cache item; a hit holds the K a miss computes; one image per item.
    cache = MultiModalProcessorOnlyCache(proc.info.ctx.model_config)
    first = process(proc, arch, images=[dense], cache=cache, keep_ratio="auto")
    both = process(proc, arch, images=[dense, blank], cache=cache, keep_ratio="auto")
    assert kept(first) == [k_dense] and kept(both) == [k_dense, k_blank]
    fixed = process(proc, arch, images=[dense], cache=cache, keep_ratio=0.5)
    assert fixed["mm_hashes"] != first["mm_hashes"] and kept(fixed) == [keep_count(n[1], 0.5)]


# --- videos (Qwen2.5-VL) ----------------------------------------------------------------

VIDEO_TEXT = "<|vision_start|><|video_pad|><|vision_end|>"


def clip(frames: int = 8, side: int = 56):
    pixels = np.random.default_rng(3).integers(0, 256, (frames, side, side, 3), dtype=np.uint8)
    return pixels, {"fps": 2.0, "duration": frames / 2.0, "total_num_frames": frames,
                    "frames_indices": list(range(frames)), "video_backend": "opencv", "do_sample_frames": False}


@pytest.fixture(scope="module")
def video_processor(tiny_checkpoint):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from vllm_tokenprune.serving import plugin

    plugin.register()
    path = tiny_checkpoint("qwen2.5-vl")

    def make(**overrides):
        config = ModelConfig(model=str(path), limit_mm_per_prompt={"image": 2, "video": 1}, hf_overrides={
            "architectures": ["PrunedQwen2_5_VLForConditionalGeneration"], **POLICY.to_overrides(), **overrides})
        return MULTIMODAL_REGISTRY.create_processor(config)

    return make


def process_video(proc, images=(), **kwargs):
    data = {"video": [clip()], **({"image": list(images)} if images else {})}
    return proc(IMAGE_TEXT["qwen2.5-vl"] * len(images) + VIDEO_TEXT + "hi", proc.info.parse_mm_data(data),
                hf_processor_mm_kwargs=kwargs, cache=None)


def video_plan(out, name: str) -> list[int]:
    from vllm_tokenprune.serving.models.common import VIDEO_PLAN_FIELD, plan_value

    return [plan_value(item[VIDEO_PLAN_FIELD].data, name) for item in out["mm_kwargs"]["video"]]


def test_a_video_keeps_k_of_its_n_under_the_policy_with_its_own_ratio_and_method(video_processor):
    """8 frames of 56 x 56: 4 temporal patches of 2 x 2 merged tokens, N = 16, 4 a frame."""
    from vllm_tokenprune.policy import video_keep_count

    proc = video_processor()
    n, frame = 16, 4
    for kwargs, ratio, method in (({}, 1.0, "evs"), ({"video_keep_ratio": 0.5}, 0.5, "evs"),
                                  ({"video_keep_ratio": 0.02}, 0.1, "evs"),  # the floor applies
                                  ({"video_keep_ratio": 0.26, "video_prune_method": "norm"}, 0.25, "norm")):
        out = process_video(proc, images=IMAGES[:1], keep_ratio=0.5, **kwargs)
        k = video_keep_count(n, frame, ratio, method == "evs")
        assert [p.length for p in out["mm_placeholders"]["video"]] == [k], kwargs
        assert video_plan(out, "unpruned") == [n] and video_plan(out, "keep") == [k]
        assert video_plan(out, "method") == [methods.method_id(method)]
        assert kept(out) == [keep_count(unpruned(proc)[0], 0.5)]  # the image's own ratio
    # evs keeps the first frame whole: at 0.1 (K = 2 by the ratio) still 4
    assert video_plan(process_video(proc, video_keep_ratio=0.1), "keep") == [frame]
    # the operator's default for videos
    assert video_plan(process_video(video_processor(tokenprune_default_video_keep_ratio=0.5)), "keep") == [8]


@pytest.mark.parametrize("kwargs,param,match", [
    ({"video_keep_ratio": "auto"}, "video_keep_ratio", "auto is for images"),
    ({"video_keep_ratio": 0}, "video_keep_ratio", "in \\(0, 1\\]"),
    ({"video_prune_method": "magic"}, "video_prune_method", "unknown prune method"),
    ({"video_prune_method": "hiprune"}, "video_prune_method", "not computed for video frames"),
    ({"video_prune_method": "learned"}, "video_prune_method", "needs a selector"),
    ({"prune_method": "evs"}, "prune_method", "is for videos"),
])
def test_video_refusals_name_the_key(video_processor, kwargs, param, match):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=match) as err:
        process_video(video_processor(), **kwargs)
    assert err.value.parameter == "mm_processor_kwargs." + param


def test_a_family_that_serves_videos_whole_refuses_a_video_ratio(tiny_checkpoint):
    from vllm.config import ModelConfig
    from vllm.exceptions import VLLMValidationError
    from vllm.multimodal import MULTIMODAL_REGISTRY

    config = ModelConfig(model=str(tiny_checkpoint("internvl")), limit_mm_per_prompt={"video": 1},
                         hf_overrides={"architectures": ["PrunedInternVLForConditionalGeneration"]})
    proc = MULTIMODAL_REGISTRY.create_processor(config)
    text = "<video>\nhi"
    with pytest.raises(VLLMValidationError, match="served whole") as err:
        proc(text, proc.info.parse_mm_data({"video": [clip()]}), hf_processor_mm_kwargs={"video_keep_ratio": 0.5})
    assert err.value.parameter == "mm_processor_kwargs.video_keep_ratio"
    out = proc(text, proc.info.parse_mm_data({"video": [clip()]}), hf_processor_mm_kwargs={})
    assert "tokenprune_video_plan" not in out["mm_kwargs"]["video"][0]  # served whole, no plan


def test_the_dummy_video_probes_the_video_methods_and_the_plan_stays_on_the_cpu(video_processor):
    from vllm.multimodal.inputs import MultiModalKwargsItems

    from vllm_tokenprune.serving.models.common import PROBE_KEEP_FIELD, PROBE_METHODS_FIELD, VIDEO_PLAN_FIELD

    proc = video_processor()
    dummy = proc.get_dummy_mm_inputs({"video": 1})
    probed = methods.mask_names(video_plan(dummy, PROBE_METHODS_FIELD)[0])
    assert "evs" in probed and "norm" in probed and not any(methods.get(m).needs for m in probed)
    (n,) = video_plan(dummy, "unpruned")
    assert video_plan(dummy, PROBE_KEEP_FIELD) == [keep_count(n, 0.1)] and video_plan(dummy, "keep") == [n]
    batch = MultiModalKwargsItems({"video": dummy["mm_kwargs"]["video"]}).get_data(device="meta")
    assert batch[VIDEO_PLAN_FIELD].device.type == "cpu" and batch[VIDEO_PLAN_FIELD].dtype == torch.int64


def test_video_metrics_count_what_was_kept(video_processor):
    from vllm_tokenprune.serving.metrics import VIDEO_TOKENS_IN, VIDEO_TOKENS_KEPT, VIDEOS

    proc = video_processor()
    name = str(proc.info.ctx.model_config.served_model_name)
    before = [VIDEOS.labels(name, "norm")._value.get(), VIDEO_TOKENS_IN.labels(name)._value.get(),
              VIDEO_TOKENS_KEPT.labels(name)._value.get()]
    process_video(proc, video_keep_ratio=0.25, video_prune_method="norm")
    after = [VIDEOS.labels(name, "norm")._value.get(), VIDEO_TOKENS_IN.labels(name)._value.get(),
             VIDEO_TOKENS_KEPT.labels(name)._value.get()]
    assert [a - b for a, b in zip(after, before)] == [1, 16, 4]


def test_start_up_refuses_vllms_engine_wide_video_pruning_and_a_video_default_nowhere_served():
    from vllm_tokenprune.serving.models.model import check_video_pruning

    def config(model_type, rate=False, **policy):
        return SimpleNamespace(multimodal_config=SimpleNamespace(is_multimodal_pruning_enabled=lambda: rate),
                               hf_config=SimpleNamespace(model_type=model_type, **PrunePolicy(**policy).to_overrides()))

    with pytest.raises(ValueError, match="--default-video-keep-ratio"):
        check_video_pruning(config("qwen2_5_vl", rate=True))
    with pytest.raises(ValueError, match="internvl's videos are served whole"):
        check_video_pruning(config("internvl", default_video_keep_ratio=0.5))
    check_video_pruning(config("qwen2_5_vl", default_video_keep_ratio=0.5))
    check_video_pruning(config("internvl"))
