"""Prometheus metrics, served on vLLM's own ``/metrics`` endpoint.

vLLM's API server exposes prometheus_client's default registry, so metrics created in
that process appear there (under vLLM's multiprocess collector too, when it is on).
Our prefix is ``tokenprune_``: vLLM unregisters its own ``vllm:`` collectors at start-up.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

IMAGE_TOKENS_IN = Counter(
    "tokenprune_image_tokens_in",
    "Image tokens the vision tower produced for requests, before pruning.",
    ["model_name"],
)
IMAGE_TOKENS_KEPT = Counter(
    "tokenprune_image_tokens_kept",
    "Image tokens kept after pruning (what the language model prefilled).",
    ["model_name"],
)
IMAGES = Counter(
    "tokenprune_images",
    "Images processed, by selection method.",
    ["model_name", "method"],
)
REQUESTS = Counter(
    "tokenprune_requests",
    "Requests carrying at least one image, by selection method.",
    ["model_name", "method"],
)
VIDEO_TOKENS_IN = Counter(
    "tokenprune_video_tokens_in",
    "Video tokens the vision tower produced for requests, before pruning.",
    ["model_name"],
)
VIDEO_TOKENS_KEPT = Counter(
    "tokenprune_video_tokens_kept",
    "Video tokens kept after pruning (what the language model prefilled).",
    ["model_name"],
)
VIDEOS = Counter(
    "tokenprune_videos",
    "Videos processed where videos are pruned, by selection method.",
    ["model_name", "method"],
)
ALIAS_REQUESTS = Counter(
    "tokenprune_alias_requests",
    "Requests whose model was an alias (one of the served model's NAME:TAG names).",
    ["model_name", "alias"],
)
_RATIO_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)
KEEP_RATIO = Histogram(
    "tokenprune_keep_ratio",
    "Keep ratio requested (after the operator's floor and rounding), per request with images "
    "and a numeric ratio.",
    ["model_name"],
    buckets=_RATIO_BUCKETS,
)
AUTO_KEEP_FRACTION = Histogram(
    "tokenprune_auto_keep_fraction",
    "Fraction of its tokens an image kept (K / N) under keep ratio auto, per image.",
    ["model_name"],
    buckets=_RATIO_BUCKETS,
)


def record_request(
    model_name: str, method: str, keep_ratio: float | None, counts: list[tuple[int | None, int]]
) -> None:
    """One request's images: ``counts`` holds (tokens before, tokens kept) per image, tokens
    before None where unknown (the image is then left out of the token counts);
    ``keep_ratio`` is None under auto, where each image's own fraction is observed."""
    if not counts:
        return
    REQUESTS.labels(model_name, method).inc()
    IMAGES.labels(model_name, method).inc(len(counts))
    known = [(n, k) for n, k in counts if n is not None]
    if keep_ratio is None:
        for n, k in known:
            AUTO_KEEP_FRACTION.labels(model_name).observe(k / n)
    else:
        KEEP_RATIO.labels(model_name).observe(keep_ratio)
    IMAGE_TOKENS_IN.labels(model_name).inc(sum(n for n, _ in known))
    IMAGE_TOKENS_KEPT.labels(model_name).inc(sum(k for _, k in known))


def record_videos(model_name: str, method: str, counts: list[tuple[int | None, int]]) -> None:
    """One request's videos, (tokens before, tokens kept) each, as ``record_request``'s images."""
    known = [(n, k) for n, k in counts if n is not None]
    VIDEOS.labels(model_name, method).inc(len(counts))
    VIDEO_TOKENS_IN.labels(model_name).inc(sum(n for n, _ in known))
    VIDEO_TOKENS_KEPT.labels(model_name).inc(sum(k for _, k in known))


def record_alias(model_name: str, alias: str) -> None:
    ALIAS_REQUESTS.labels(model_name, alias).inc()
