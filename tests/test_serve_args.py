"""How `vllm-tokenprune serve` turns its command line into `vllm serve` arguments."""

from __future__ import annotations

import json

import pytest

from vllm_tokenprune.policy import PrunePolicy
from vllm_tokenprune.tools.serve import (
    MIDDLEWARE,
    ServeError,
    _pop_model,
    build_vllm_args,
    check_selector,
    with_aliases,
)


def test_model_positional_or_flag():
    extra = ["/m", "--port", "8001"]
    assert _pop_model(extra) == "/m" and extra == ["--port", "8001"]
    extra = ["--port", "8001", "--model", "/m"]
    assert _pop_model(extra) == "/m" and extra == ["--port", "8001"]
    extra = ["--model=/m"]
    assert _pop_model(extra) == "/m" and extra == []
    assert _pop_model(["--port", "8001"]) is None


def test_adds_what_pruning_needs_and_keeps_user_overrides(tiny_checkpoint):
    model = str(tiny_checkpoint("llava"))
    args = build_vllm_args(model, "/abs/sel.safetensors",
                           ["--port", "8001", "--hf-overrides", '{"image_seq_length": 144}'])
    assert args[:3] == [model, "--port", "8001"]
    overrides = json.loads(args[args.index("--hf-overrides") + 1])
    assert overrides == {"image_seq_length": 144,
                         "architectures": ["PrunedLlavaForConditionalGeneration"],
                         "tokenprune_selector": "/abs/sel.safetensors"}
    assert args.count("--hf-overrides") == 1
    assert args[args.index("--middleware") + 1] == MIDDLEWARE
    assert "--trust-request-mm-kwargs" in args and "--enable-prompt-tokens-details" in args
    assert "--enforce-eager" in args  # CPU default
    compiled = build_vllm_args(model, None, ["--no-enforce-eager"])
    assert "--no-enforce-eager" in compiled and "--enforce-eager" not in compiled


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ServeError, match="LlamaForCausalLM; pruning supports"):
        build_vllm_args(str(tmp_path), None, [])


def test_bench_times_the_tower_in_the_serving_dtype(tmp_path):
    from vllm_tokenprune.tools.bench import serving_dtype

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert serving_dtype(str(tmp_path), []) == "bfloat16"
    assert serving_dtype(str(tmp_path), ["--dtype", "auto"]) == "bfloat16"
    assert serving_dtype(str(tmp_path), ["--port", "1", "--dtype", "float32"]) == "float32"
    assert serving_dtype(str(tmp_path), ["--dtype=half"]) == "float16"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert serving_dtype(str(tmp_path), []) == "bfloat16"  # vLLM's "auto" downcasts float32


def test_aliases_are_served_names_after_the_first():
    extra, aliases = with_aliases("/m", ["--port", "1", "--served-model-name", "demo", "other"], "0.25, divprune@auto")
    assert extra == ["--port", "1", "--served-model-name", "demo", "other", "demo:0.25", "demo:divprune@auto"]
    assert aliases == {"demo:0.25": {"keep_ratio": 0.25},
                       "demo:divprune@auto": {"prune_method": "divprune", "keep_ratio": "auto"}}
    assert with_aliases("/m", ["--served-model-name=demo"], "0.5")[0] == ["--served-model-name", "demo", "demo:0.5"]
    assert with_aliases("/m", [], "0.5")[0] == ["--served-model-name", "/m", "/m:0.5"]  # vLLM's default name
    assert with_aliases("/m", ["--port", "1"], "") == (["--port", "1"], {})
    with pytest.raises(ServeError, match="--aliases 'fast': unknown prune method"):
        with_aliases("/m", [], "0.5,fast")


def test_an_alias_the_selector_cannot_serve_stops_startup(tiny_checkpoint, random_selector):
    model, selector = str(tiny_checkpoint("llava")), str(random_selector("llava"))  # a reader, no predictor
    for tags, selector_given, message in [
            ("0.5,learned@0.5", None, "m:learned@0.5 chooses learned, which needs a selector, and no --selector"),
            ("learned_query", None, "chooses learned_query, which needs a selector that reads the question"),
            ("auto", selector, "m:auto chooses auto, which needs a budget predictor, and the selector")]:
        _, aliases = with_aliases(model, ["--served-model-name", "m"], tags)
        with pytest.raises(ServeError, match=message):
            check_selector(selector_given, model, PrunePolicy(), aliases)
    check_selector(selector, model, PrunePolicy(), with_aliases(model, [], "learned@0.5,learned_query,0.1")[1])
