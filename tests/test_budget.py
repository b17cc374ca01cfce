"""The keep count K and the parsing of a request's ratio and method."""

import math
from types import SimpleNamespace

import pytest

from vllm_tokenprune.policy import (
    AutoBudget,
    PrunePolicy,
    PruneRequest,
    PruneRequestError,
    keep_count,
    parse_budget,
    parse_method,
    resolve,
    split_keep,
)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 144, 576, 2880])
def test_keep_count_is_within_one_and_n_and_monotonic(n):
    ratios = [i / 1000 for i in range(1, 1001)]
    counts = [keep_count(n, r) for r in ratios]
    assert all(1 <= k <= n for k in counts)
    assert counts == sorted(counts)
    assert keep_count(n, 1.0) == n
    assert keep_count(n, 1e-9) == 1


def test_keep_count_rounds_to_nearest():
    assert keep_count(576, 0.25) == 144
    assert keep_count(20, 0.35) == 7  # 6.999... in floats
    assert keep_count(10, 0.05) == 1  # 0.5 rounds half up
    assert keep_count(144, 0.1) == 14


def test_split_keep_shares_k_over_runs_by_size():
    assert split_keep(7, [256, 256, 256]) == [3, 2, 2]  # the remainder to the earlier runs
    assert split_keep(2, [10, 10, 10]) == [1, 1, 0]  # a run may get nothing
    assert split_keep(5, [30, 10]) == [4, 1]  # 3.75 / 1.25: the larger remainder wins
    assert split_keep(40, [30, 10]) == [30, 10] and split_keep(0, [3]) == [0]
    for k in range(0, 41):
        shares = split_keep(k, [12, 4, 24])
        assert sum(shares) == k and all(0 <= s <= n for s, n in zip(shares, [12, 4, 24]))
    with pytest.raises(ValueError):
        split_keep(41, [30, 10])


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0001, math.nan, math.inf])
def test_keep_count_rejects_bad_ratio(bad):
    with pytest.raises(ValueError):
        keep_count(10, bad)


def test_keep_count_rejects_empty_image():
    with pytest.raises(ValueError):
        keep_count(0, 0.5)


@pytest.mark.parametrize("raw,expected", [("0.25", 0.25), (" 1 ", 1.0), (0.5, 0.5), (1, 1.0),
                                          ("1e-3", 0.001), ("2.5E-1", 0.25), (".5", 0.5), ("+1.", 1.0)])
def test_parse_budget_accepts_numbers(raw, expected):
    assert parse_budget(raw, param="X-Keep-Ratio header") == expected


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "0", "-0.5", "1.01", "abc", "",
                                 "0x1", "0x1p-2", "0.2_5", "\uff10.5", "1e", "9" * 100, 10**400,
                                 1e400, True, None, [0.5], {"a": 1}])
def test_parse_budget_rejects_bad_numbers_and_names_the_param(raw):
    with pytest.raises(PruneRequestError) as err:
        parse_budget(raw, param="X-Keep-Ratio header")
    assert err.value.param == "X-Keep-Ratio header"
    assert "X-Keep-Ratio header" in str(err.value)


def test_parse_method():
    assert parse_method(" Random ", param="p") == "random"
    with pytest.raises(PruneRequestError, match="unknown prune method 'magic'"):
        parse_method("magic", param="p")
    with pytest.raises(PruneRequestError):
        parse_method(3, param="p")


def test_policy_floor_and_step():
    policy = PrunePolicy(default_keep_ratio=0.5, min_keep_ratio=0.1, keep_ratio_step=0.05)
    assert policy.apply(None) == 0.5
    assert policy.apply(0.26) == 0.25
    assert policy.apply(0.276) == 0.3
    assert policy.apply(0.01) == 0.1  # floor wins over the step
    assert policy.apply(1.0) == 1.0
    assert PrunePolicy().apply(0.123) == 0.123


def test_policy_travels_in_the_model_config():
    policy = PrunePolicy(default_keep_ratio=0.5, min_keep_ratio=0.1, keep_ratio_step=0.05,
                         allowed_mm_kwargs=("max_pixels",), max_quadratic_tokens=1024)
    overrides = policy.to_overrides()
    assert overrides == {"tokenprune_default_keep_ratio": 0.5, "tokenprune_min_keep_ratio": 0.1,
                         "tokenprune_keep_ratio_step": 0.05, "tokenprune_allowed_mm_kwargs": ["max_pixels"],
                         "tokenprune_max_quadratic_tokens": 1024}
    assert PrunePolicy().to_overrides() == {}
    assert PrunePolicy.from_config(SimpleNamespace(**overrides)) == policy
    assert PrunePolicy.from_config(SimpleNamespace()) == PrunePolicy()
    with pytest.raises(ValueError, match="tokenprune policy in the model config: min_keep_ratio"):
        PrunePolicy.from_config(SimpleNamespace(tokenprune_min_keep_ratio="lots"))


@pytest.mark.parametrize("kwargs", [{"default_keep_ratio": 0}, {"min_keep_ratio": 2},
                                    {"keep_ratio_step": -1}, {"allowed_mm_kwargs": "max_pixels"},
                                    {"allowed_mm_kwargs": ["keep_ratio"]}, {"max_quadratic_tokens": -1},
                                    {"max_quadratic_tokens": 2.5}])
def test_policy_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        PrunePolicy(**kwargs)


POLICY = PrunePolicy(default_keep_ratio=0.5, min_keep_ratio=0.1, keep_ratio_step=0.05,
                     allowed_mm_kwargs=("max_pixels",))


def test_resolve_applies_the_policy_and_passes_allowed_kwargs():
    assert resolve(None, POLICY) == PruneRequest(0.5, None, {})
    assert resolve({"keep_ratio": 0.26, "prune_method": "Random"}, POLICY) == PruneRequest(0.25, "random", {})
    assert resolve({"keep_ratio": "0.01"}, POLICY).keep_ratio == 0.1
    got = resolve({"max_pixels": 1000, "keep_ratio": None}, POLICY)
    assert got == PruneRequest(0.5, None, {"max_pixels": 1000})
    assert resolve({"tokenprune_not_served": True}, POLICY).served is False


@pytest.mark.parametrize("kwargs,param", [
    ({"min_pixels": 1}, "mm_processor_kwargs.min_pixels"),
    ({"keep_ratio": 0.5, "size": {"height": 9}}, "mm_processor_kwargs.size"),
    ({"keep_ratio": "nan"}, "mm_processor_kwargs.keep_ratio"),
    ({"keep_ratio": 10**400}, "mm_processor_kwargs.keep_ratio"),
    ({"keep_ratio": "0.2_5"}, "mm_processor_kwargs.keep_ratio"),
    ({"keep_ratio": "\uff10.5"}, "mm_processor_kwargs.keep_ratio"),
    ({"prune_method": "magic"}, "mm_processor_kwargs.prune_method"),
])
def test_resolve_refuses_and_names_the_key(kwargs, param):
    with pytest.raises(PruneRequestError) as err:
        resolve(kwargs, POLICY)
    assert err.value.param == param
    assert param in str(err.value)


# --- auto -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw,expected", [
    ("auto", AutoBudget()), (" AUTO ", AutoBudget()), ("auto;min=0.1", AutoBudget(low=0.1)),
    ("auto; max = .5", AutoBudget(high=0.5)), ("auto;max=0.5;min=0.1", AutoBudget(0.1, 0.5)),
    ("auto;min=0.3;max=0.3", AutoBudget(0.3, 0.3)), ("0.25", 0.25), (0.5, 0.5),
])
def test_parse_budget_accepts(raw, expected):
    assert parse_budget(raw, param="X-Keep-Ratio header") == expected


@pytest.mark.parametrize("raw", ["auto;", "auto;min", "auto;min=", "auto;min=0", "auto;max=1.5", "auto;min=nan",
                                 "auto;min=0.5;max=0.2", "auto;min=0.1;min=0.2", "auto;size=3", "autox",
                                 "auto;min=0.1;" + "9" * 80, "auto,min=0.1"])
def test_parse_budget_refuses_and_names_the_param(raw):
    with pytest.raises(PruneRequestError) as err:
        parse_budget(raw, param="X-Keep-Ratio header")
    assert err.value.param == "X-Keep-Ratio header"
    assert str(err.value).startswith("X-Keep-Ratio header")


def test_auto_budget_has_one_canonical_string():
    for text in ("auto", "auto;min=0.1", "auto;max=0.5", "auto;min=0.1;max=0.5"):
        assert str(parse_budget(text, param="p")) == text
    assert str(parse_budget(" Auto ; MAX=0.50 ; min=.1", param="p")) == "auto;min=0.1;max=0.5"


def test_auto_applies_bounds_then_step_then_floor_per_image():
    policy = PrunePolicy(min_keep_ratio=0.1, keep_ratio_step=0.05)
    budget = policy.apply(AutoBudget(0.2, 0.6))
    assert budget == AutoBudget(0.2, 0.6)
    assert [policy.image_ratio(budget, f) for f in (0.01, 0.33, 0.9)] == [0.2, 0.35, 0.6]
    assert policy.image_ratio(policy.apply(AutoBudget()), 0.01) == 0.1  # the floor, without bounds
    # A lower bound under the floor changes nothing, so it is dropped (one cache key).
    assert policy.apply(AutoBudget(low=0.05)) == policy.apply(AutoBudget()) == AutoBudget()
    assert policy.image_ratio(0.25, None) == 0.25  # a number is resolved by apply alone
    with pytest.raises(ValueError):
        policy.image_ratio(AutoBudget(), None)


def test_the_default_may_be_auto_and_travels_in_the_model_config():
    policy = PrunePolicy(default_keep_ratio="auto;max=0.5", min_keep_ratio=0.1)
    assert policy.default_keep_ratio == AutoBudget(high=0.5)
    assert policy.to_overrides()["tokenprune_default_keep_ratio"] == "auto;max=0.5"
    assert PrunePolicy.from_config(SimpleNamespace(**policy.to_overrides())) == policy
    assert resolve(None, policy).keep_ratio == AutoBudget(high=0.5)
    assert resolve({"keep_ratio": "auto;min=0.2"}, policy).keep_ratio == AutoBudget(low=0.2)
    assert resolve({"keep_ratio": 0.3}, policy).keep_ratio == 0.3
    with pytest.raises(ValueError, match="default_keep_ratio"):
        PrunePolicy(default_keep_ratio="auto;max=2")
    with pytest.raises(PruneRequestError) as err:
        resolve({"keep_ratio": "auto;min=0"}, policy)
    assert err.value.param == "mm_processor_kwargs.keep_ratio"
