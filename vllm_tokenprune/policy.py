"""The pruning contract: what a request may ask for, what the operator allows, and K.

``keep_count`` is the single definition of K. ``resolve`` turns a request's processor
kwargs into the ratio and method it gets, under the operator's ``PrunePolicy``. The
multimodal processor calls both for every request, whatever route or client it came
from (HTTP, batch, offline ``LLM``), sizes each image's placeholder run to K and hands
the integer to the model, which selects exactly that many embeddings.

A ratio is a number in (0, 1], or ``auto`` (``AutoBudget``): each image's ratio is then
its budget predictor's fraction (``selection.budget``), kept within the request's bounds,
and the operator's step and floor apply to it as to a number (``PrunePolicy.image_ratio``).

Videos have a ratio and method of their own (``video_keep_ratio``, ``video_prune_method``;
in a header, ``X-Keep-Ratio: 0.5, video=0.25``): a bare ratio or method is the images'.
A video's K is ``video_keep_count`` of its N, and where its frames keep shares of K,
``frame_shares`` gives them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace


def keep_count(num_tokens: int, keep_ratio: float) -> int:
    """K = round(N * ratio), clamped to [1, N]: never zero tokens, never more than N."""
    if num_tokens < 1:
        raise ValueError(f"an image must have at least one token, got {num_tokens}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    # Round half up; the small epsilon absorbs float error such as 0.35 * 20 = 6.999...
    k = math.floor(num_tokens * keep_ratio + 0.5 + 1e-9)
    return max(1, min(num_tokens, k))


def video_keep_count(num_tokens: int, frame_tokens: int, keep_ratio: float, first_frame_whole: bool) -> int:
    """A video's K: ``keep_count`` of its N, raised to one whole frame for a method that
    always keeps the first frame (EVS)."""
    k = keep_count(num_tokens, keep_ratio)
    return max(k, min(frame_tokens, num_tokens)) if first_frame_whole else k


def frame_shares(k: int, sizes: list[int], first_frame_whole: bool) -> list[int]:
    """A video's K over its frames where each frame keeps its own share (a frame by frame
    method, or a prompt that holds each frame's run apart): ``split_keep``'s shares, or,
    for a method that keeps the first frame whole, that frame first and the rest shared
    over the others."""
    if not first_frame_whole:
        return split_keep(k, sizes)
    first = min(k, sizes[0])
    return [first, *split_keep(k - first, sizes[1:])]


# --- The question, for methods that read it -------------------------------------------

# A question is the prompt's last this-many text tokens: where a question usually sits,
# and a bound on what a long prompt adds to each image's hash and to the method's work.
QUESTION_TOKENS = 256


def markup_ids(tokenizer) -> frozenset[int]:
    """Token ids that are markup, not words: a tokenizer's special and added tokens."""
    return frozenset(tokenizer.all_special_ids) | frozenset(tokenizer.get_added_vocab().values())


def question_tokens(prompt: Iterable[int], markup: Container[int]) -> list[int]:
    """The question a prompt asks about its images: its token ids that are not ``markup``
    (special and added tokens: image placeholders, chat-template markers), the last
    ``QUESTION_TOKENS``. Template words that are plain text (role names) stay: they are
    the same for every request."""
    words = [int(t) for t in prompt if t not in markup]
    return words[-QUESTION_TOKENS:]


def split_keep(k: int, sizes: list[int]) -> list[int]:
    """An image's K over the placeholder runs its prompt cuts it into (crops with text
    between them): in proportion to their sizes, largest remainders first, earlier runs on
    ties. Integer arithmetic only, so the processor, which sizes the runs, and the model,
    which fills them, get the same shares."""
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot keep {k} of {total} tokens")
    shares = [k * n // total for n in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(k * sizes[i] % total), i))
    for i in by_remainder[: k - sum(shares)]:
        shares[i] += 1
    return shares


# --- A request's ratio and method -------------------------------------------------------

KEEP_RATIO_KEY = "keep_ratio"
METHOD_KEY = "prune_method"
VIDEO_KEEP_RATIO_KEY = "video_keep_ratio"
VIDEO_METHOD_KEY = "video_prune_method"
# Set by the HTTP layer on routes that only render a prompt (/tokenize): such requests
# are processed like any other but not counted in the served-request metrics.
NOT_SERVED_KEY = "tokenprune_not_served"
CLIENT_KEYS = (KEEP_RATIO_KEY, METHOD_KEY, VIDEO_KEEP_RATIO_KEY, VIDEO_METHOD_KEY)
OUR_KEYS = (*CLIENT_KEYS, NOT_SERVED_KEY)
# A header's value may give each modality its own: ``0.5, video=0.25``; a bare value is
# the images'. The modality's kwarg, by the image kwarg it stands beside.
IMAGE, VIDEO = "image", "video"
VIDEO_KEYS = {KEEP_RATIO_KEY: VIDEO_KEEP_RATIO_KEY, METHOD_KEY: VIDEO_METHOD_KEY}
# Refuse absurd values before parsing them (a header is client-controlled).
MAX_VALUE_LENGTH = 64
# Plain decimal or exponent notation only: float() would also take "nan", "inf", "1_0"
# and non-ASCII digits.
_NUMBER = re.compile(r"[+]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


class PruneRequestError(ValueError):
    """A request the contract refuses, as the client gets it: an OpenAI-style error whose
    ``param`` names the header or field to fix (None: the request as a whole), with HTTP
    ``status`` 400 (413: a body too large). The HTTP layer answers it itself; the processor
    hands it to vLLM, which answers alike (``processor.PruningRequestError``)."""

    def __init__(self, message: str, param: str | None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _parse_fraction(raw: object, *, param: str, expected: str) -> float:
    """A number in (0, 1] from a header string or a JSON number."""
    bad = PruneRequestError(f"{param} must be {expected}, got {_short(raw)}", param)
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise bad
    if isinstance(raw, str):
        if len(raw) > MAX_VALUE_LENGTH:
            raise PruneRequestError(
                f"{param} is too long ({len(raw)} characters; at most {MAX_VALUE_LENGTH})", param)
        if not _NUMBER.fullmatch(raw.strip()):
            raise bad
    try:
        value = float(raw)
    except (ValueError, OverflowError):  # an integer with hundreds of digits
        raise bad from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise bad
    return value


AUTO = "auto"
_BOUNDS = {"min": "low", "max": "high"}


@dataclass(frozen=True)
class AutoBudget:
    """``auto``: each image keeps the fraction its budget predictor gives it, within
    [low, high]. Written ``auto``, ``auto;min=0.1``, ``auto;max=0.5`` or
    ``auto;min=0.1;max=0.5`` (``str`` gives this canonical form, which vLLM hashes)."""

    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"auto's min {self.low!r} is above its max {self.high!r}")

    def clamp(self, fraction: float) -> float:
        return min(max(fraction, self.low or 0.0), self.high or 1.0)

    def __str__(self) -> str:
        return AUTO + "".join(f";{name}={value!r}" for name, value in (("min", self.low), ("max", self.high))
                              if value is not None)


def parse_budget(raw: object, *, param: str) -> float | AutoBudget:
    """A keep ratio, from a header string or a JSON number: a number in (0, 1], or ``auto``
    with optional bounds (``AutoBudget``). The one parser of ratios: the HTTP layer, the
    processor and the operator's default all go through it."""
    if not isinstance(raw, str) or raw.strip().split(";", 1)[0].strip().lower() != AUTO:
        return _parse_fraction(raw, param=param, expected="a number in (0, 1] or auto")
    if len(raw) > MAX_VALUE_LENGTH:
        raise PruneRequestError(f"{param} is too long ({len(raw)} characters; at most {MAX_VALUE_LENGTH})", param)
    bounds: dict[str, float] = {}
    for part in raw.strip().split(";")[1:]:
        name, sep, value = (p.strip() for p in part.partition("="))
        if name.lower() not in _BOUNDS or not sep or _BOUNDS[name.lower()] in bounds:
            raise PruneRequestError(
                f"{param}: {part.strip()!r} is not a bound of auto (or one given twice); write auto, "
                "auto;min=R, auto;max=R or auto;min=R;max=R with R in (0, 1]", param)
        try:
            bounds[_BOUNDS[name.lower()]] = _parse_fraction(value, param=f"{param}: auto's {name.lower()}",
                                                            expected="a number in (0, 1]")
        except PruneRequestError as err:  # named by the header or field, which a client can find
            raise PruneRequestError(str(err), param) from None
    try:
        return AutoBudget(**bounds)
    except ValueError as err:
        raise PruneRequestError(f"{param}: {err}", param) from None


def parse_video_ratio(raw: object, *, param: str) -> float:
    """A video's keep ratio: a number in (0, 1] (``auto`` predicts from an image's pixels,
    so it is the images')."""
    if isinstance(raw, str) and raw.strip().lower().startswith(AUTO):
        raise PruneRequestError(f"{param}: auto is for images; a video's ratio is a number in (0, 1]", param)
    return _parse_fraction(raw, param=param, expected="a number in (0, 1]")


def parse_method(raw: object, *, param: str, video: bool = False) -> str:
    """A method name for images, or with ``video`` for videos (which also take the methods
    that read a whole clip, ``methods.VIDEO_ONLY``)."""
    from vllm_tokenprune.selection.methods import IMAGE_METHOD_NAMES, METHOD_NAMES, VIDEO_ONLY

    if not isinstance(raw, str) or len(raw) > MAX_VALUE_LENGTH:
        raise PruneRequestError(f"{param} must be a method name, got {_short(raw)}", param)
    name = raw.strip().lower()
    if name in VIDEO_ONLY and not video:
        raise PruneRequestError(f"{param}: prune method {name!r} is for videos; send it as "
                                f"{VIDEO_METHOD_KEY} (X-Prune-Method: video={name})", param)
    if name not in METHOD_NAMES:
        raise PruneRequestError(
            f"{param}: unknown prune method {raw!r}; choose one of "
            f"{', '.join(METHOD_NAMES if video else IMAGE_METHOD_NAMES)}", param)
    return name


def parse_video_method(raw: object, *, param: str) -> str:
    return parse_method(raw, param=param, video=True)


def parse_by_modality(raw: str, parsers: Mapping[str, Callable[..., object]], *, param: str) -> dict[str, object]:
    """A header's value per modality: ``VALUE``, ``image=VALUE``, ``video=VALUE``, or both
    comma-separated (``0.5, video=0.25``), each read by its modality's parser; at least one,
    each modality at most once."""
    if len(raw) > 2 * MAX_VALUE_LENGTH:
        raise PruneRequestError(f"{param} is too long ({len(raw)} characters; at most "
                                f"{2 * MAX_VALUE_LENGTH})", param)
    found: dict[str, object] = {}
    for part in raw.split(","):
        name, sep, value = part.partition("=")
        modality = name.strip().lower()
        if not sep or modality not in parsers:  # a bare value (auto's bounds hold '=' too)
            modality, value = IMAGE, part
        if modality in found:
            raise PruneRequestError(f"{param} gives the {modality} value twice; write VALUE, or "
                                    "image=VALUE, video=VALUE", param)
        found[modality] = parsers[modality](value.strip(), param=param)
    return found


# --- Model aliases ----------------------------------------------------------------------

ALIAS_SEPARATOR = ":"  # OpenRouter's model:variant, Ollama's name:tag
METHOD_AT = "@"


def parse_alias_tag(tag: str, *, param: str) -> dict[str, object]:
    """The kwargs an alias's tag carries: ``RATIO`` (anything X-Keep-Ratio takes, ``auto``
    included), ``METHOD``, or ``METHOD@RATIO``; a ratio in its canonical form."""
    method, at, ratio = tag.rpartition(METHOD_AT)
    if not at:  # one part: a ratio, or a method
        is_ratio = tag[:1].isdigit() or tag[:1] in ".+" or tag.lower().startswith(AUTO)
        method, ratio = ("", tag) if is_ratio else (tag, "")
    kwargs: dict[str, object] = {}
    if method or at:
        kwargs[METHOD_KEY] = parse_method(method, param=param)
    if ratio or at:
        value = parse_budget(ratio, param=param)
        kwargs[KEEP_RATIO_KEY] = str(value) if isinstance(value, AutoBudget) else value
    return kwargs


def model_aliases(served_names: Iterable[str]) -> dict[str, dict[str, object]]:
    """The aliases among a server's model names, with the kwargs each carries: the names
    after the first that read ``FIRST:TAG`` with a valid tag (``parse_alias_tag``)."""
    first, *others = served_names
    out = {}
    for name in others:
        if name.startswith(first + ALIAS_SEPARATOR):
            try:
                out[name] = parse_alias_tag(name[len(first) + 1:], param="model")
            except PruneRequestError:
                continue  # a plain other name
    return out


def _short(raw: object) -> str:
    text = repr(raw)
    return text if len(text) <= MAX_VALUE_LENGTH else text[:MAX_VALUE_LENGTH] + "..."


# --- The operator's policy --------------------------------------------------------------


@dataclass(frozen=True)
class PrunePolicy:
    """The operator's rules for client-chosen ratios, carried in the model config.

    ``min_keep_ratio`` is a floor clients cannot go under (lower requests are raised to
    it); ``keep_ratio_step`` rounds ratios to a grid, so that near-identical ratios
    share one processor/encoder/prefix cache entry instead of fragmenting the caches;
    ``default_video_keep_ratio`` is the videos' default, a number;
    ``allowed_mm_kwargs`` names the HF processor kwargs clients may still send (none by
    default: on Qwen, ``max_pixels`` decides how many tokens and how much memory an
    image costs). ``max_quadratic_tokens`` is the largest image, in tokens, that a method
    holding O(N^2) values per image accepts (0: any): a request beyond it is refused, not
    an out-of-memory engine. ``default_keep_ratio`` may be ``auto`` (with bounds), given as an
    ``AutoBudget`` or its string.

    The policy travels as ``tokenprune_*`` keys of ``--hf-overrides``, beside the
    selector path, so ``vllm serve``, ``vllm-tokenprune serve`` and offline ``LLM``
    follow the same one.
    """

    default_keep_ratio: float | AutoBudget = 1.0
    min_keep_ratio: float = 0.0
    keep_ratio_step: float = 0.0
    allowed_mm_kwargs: tuple[str, ...] = field(default=())
    # 4096 tokens: N x N float32 similarities of 64 MiB an image (MMTok holds about three).
    max_quadratic_tokens: int = 4096
    # Videos' ratio when a request gives none (a number: ``auto`` is the images'); the
    # floor and step apply to videos too.
    default_video_keep_ratio: float = 1.0

    CONFIG_PREFIX = "tokenprune_"

    def __post_init__(self):
        if not isinstance(self.default_keep_ratio, AutoBudget):
            try:
                default = parse_budget(self.default_keep_ratio, param="default_keep_ratio")
            except PruneRequestError as err:
                raise ValueError(str(err)) from None
            object.__setattr__(self, "default_keep_ratio", default)
        try:
            video = parse_video_ratio(self.default_video_keep_ratio, param="default_video_keep_ratio")
        except PruneRequestError as err:
            raise ValueError(str(err)) from None
        object.__setattr__(self, "default_video_keep_ratio", video)
        for name in ("min_keep_ratio", "keep_ratio_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if isinstance(self.allowed_mm_kwargs, str) or not all(
                isinstance(k, str) for k in self.allowed_mm_kwargs):
            raise ValueError(f"allowed_mm_kwargs must be a list of names, got {self.allowed_mm_kwargs!r}")
        if clash := set(self.allowed_mm_kwargs) & set(OUR_KEYS):
            raise ValueError(f"allowed_mm_kwargs cannot name our own keys {sorted(clash)}")
        object.__setattr__(self, "allowed_mm_kwargs", tuple(self.allowed_mm_kwargs))
        if isinstance(self.max_quadratic_tokens, bool) or not isinstance(self.max_quadratic_tokens, int) or (
                self.max_quadratic_tokens < 0):
            raise ValueError(f"max_quadratic_tokens must be a whole number >= 0, got {self.max_quadratic_tokens!r}")

    @classmethod
    def from_config(cls, hf_config) -> PrunePolicy:
        """The policy set on a model config (by ``--hf-overrides``); defaults for the rest."""
        values = {f.name: getattr(hf_config, cls.CONFIG_PREFIX + f.name) for f in fields(cls)
                  if getattr(hf_config, cls.CONFIG_PREFIX + f.name, None) is not None}
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"tokenprune policy in the model config: {err}") from None

    def to_overrides(self) -> dict[str, object]:
        """The ``--hf-overrides`` keys that carry this policy (only those not at default)."""
        default = PrunePolicy()
        def encoded(v):
            return list(v) if isinstance(v, tuple) else str(v) if isinstance(v, AutoBudget) else v

        return {self.CONFIG_PREFIX + f.name: encoded(v)
                for f in fields(self) if (v := getattr(self, f.name)) != getattr(default, f.name)}

    def apply(self, ratio: float | AutoBudget | None) -> float | AutoBudget:
        """A request's ratio under the policy: the default when it sent none; a number
        rounded to the step, then raised to the floor; ``auto`` as it is (its images'
        fractions go through ``image_ratio``)."""
        ratio = self.default_keep_ratio if ratio is None else ratio
        if isinstance(ratio, AutoBudget):
            # A lower bound at or under the floor does nothing the floor does not: dropped, so
            # that budgets which give the same counts hash alike.
            low = ratio.low if ratio.low is not None and ratio.low > self.min_keep_ratio else None
            return replace(ratio, low=low)
        if self.keep_ratio_step > 0:
            steps = max(1, math.floor(ratio / self.keep_ratio_step + 0.5 + 1e-9))
            ratio = min(1.0, round(steps * self.keep_ratio_step, 12))
        return max(ratio, self.min_keep_ratio)

    @property
    def lowest_ratio(self) -> float:
        """The smallest ratio any request gets under this policy (a number or ``auto``): the
        floor, or one step, or the smallest positive float (K = 1)."""
        return self.apply(math.ulp(0.0))

    def image_ratio(self, ratio: float | AutoBudget, predicted: float | None) -> float:
        """One image's ratio: a request's number as ``apply`` resolved it; under ``auto`` the
        image's predicted fraction, within the request's bounds, then rounded to the step
        and raised to the floor like a number."""
        if not isinstance(ratio, AutoBudget):
            return ratio
        if predicted is None:
            raise ValueError("an auto budget needs the image's predicted fraction")
        return self.apply(ratio.clamp(predicted))


    def video_ratio(self, ratio: float | None) -> float:
        """A request's video ratio under the policy: the default when it sent none; then
        the step and floor, as for images."""
        return self.apply(self.default_video_keep_ratio if ratio is None else ratio)


@dataclass(frozen=True)
class PruneRequest:
    """What a request gets: its ratio (policy applied; ``auto`` is resolved per image), its
    method (None: the server's default), the same two for its videos, the HF processor
    kwargs the operator lets through, and whether it counts as a served request."""

    keep_ratio: float | AutoBudget
    method: str | None
    hf_kwargs: Mapping[str, object]
    served: bool = True
    video_keep_ratio: float = 1.0
    video_method: str | None = None


def resolve(mm_kwargs: Mapping[str, object] | None, policy: PrunePolicy,
            *, param_prefix: str = "mm_processor_kwargs.") -> PruneRequest:
    """A request's processor kwargs -> what it gets. Raises PruneRequestError naming the
    offending key: a foreign key the operator did not allow, or a bad ratio or method."""
    mm_kwargs = mm_kwargs or {}
    for key in mm_kwargs:
        if key not in OUR_KEYS and key not in policy.allowed_mm_kwargs:
            raise PruneRequestError(
                f"{param_prefix}{key} is not accepted by this server: clients may set "
                f"{', '.join(CLIENT_KEYS[:-1])} and {CLIENT_KEYS[-1]}" + (
                    f", and {', '.join(policy.allowed_mm_kwargs)}" if policy.allowed_mm_kwargs else ""),
                f"{param_prefix}{key}")

    def given(key):
        return mm_kwargs.get(key) is not None

    ratio = (parse_budget(mm_kwargs[KEEP_RATIO_KEY], param=param_prefix + KEEP_RATIO_KEY)
             if given(KEEP_RATIO_KEY) else None)
    method, video_method = (parse(mm_kwargs[key], param=param_prefix + key) if given(key) else None
                            for key, parse in ((METHOD_KEY, parse_method), (VIDEO_METHOD_KEY, parse_video_method)))
    video_ratio = (parse_video_ratio(mm_kwargs[VIDEO_KEEP_RATIO_KEY], param=param_prefix + VIDEO_KEEP_RATIO_KEY)
                   if given(VIDEO_KEEP_RATIO_KEY) else None)
    return PruneRequest(
        keep_ratio=policy.apply(ratio),
        method=method,
        hf_kwargs={k: v for k, v in mm_kwargs.items() if k in policy.allowed_mm_kwargs},
        served=not mm_kwargs.get(NOT_SERVED_KEY),
        video_keep_ratio=policy.video_ratio(video_ratio),
        video_method=video_method,
    )
