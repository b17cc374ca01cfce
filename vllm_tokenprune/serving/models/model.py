"""The model half of every pruned family, in vLLM's workers: the selector loaded and
checked against the served model, the tower run in chunks of the encoder budget, each
image's candidate tokens made a selection job, and all the jobs of a tower call selected
at once from the fields the processor attached (``common``). Methods that read the
tower's attention get it from ``methods.attention.TowerProbe``, used only for a tower call
in which some image asked for such a method (or the profile's probe, ``common``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
from vllm.logger import init_logger

from vllm_tokenprune import families
from vllm_tokenprune.policy import AutoBudget, PrunePolicy, frame_shares
from vllm_tokenprune.selection import methods
from vllm_tokenprune.serving.models.common import (
    FIELDS,
    KEEP_FIELD,
    METHOD_FIELD,
    PROBE_KEEP_FIELD,
    PROBE_METHODS_FIELD,
    PRUNE_FIELDS,
    QUERY_FIELD,
    SEED_FIELD,
    UNPRUNED_FIELD,
    PruningInputs,
    selector_path,
    served_budget_predictor,
)

logger = init_logger(__name__)


def _chunks(counts: Sequence[int], budget: int) -> list[slice]:
    """Consecutive runs of ``counts`` adding up to at most ``budget``; a count past it alone."""
    found, start, total = [], 0, 0
    for i, n in enumerate(counts):
        if i > start and total + n > budget:
            found.append(slice(start, i))
            start, total = i, 0
        total += n
    return found + [slice(start, len(counts))] if counts else found


def check_budget_predictor(path: str | None, hf_config) -> None:
    """At start-up, in the model: the selector checkpoint's budget predictor loads, and a
    server whose default is ``auto`` has one."""
    has_predictor = path is not None and served_budget_predictor(path) is not None
    if isinstance(PrunePolicy.from_config(hf_config).default_keep_ratio, AutoBudget) and not has_predictor:
        raise ValueError("the default keep ratio is auto, which needs a budget predictor, and "
                         f"{'the selector ' + path if path else 'this server (no selector)'} has none")
    if has_predictor:
        logger.info("tokenprune: the selector's budget predictor serves keep ratio 'auto'")


def check_video_pruning(model_config) -> None:
    """At start-up: vLLM's own video pruning (engine-wide) never runs under ours (per request),
    and a default video ratio under 1 needs a family whose videos are pruned."""
    if model_config.multimodal_config.is_multimodal_pruning_enabled():
        raise ValueError(
            "--video-pruning-rate prunes every video engine-wide, and this server prunes per request: "
            "drop it and set the videos' default instead (vllm-tokenprune serve --default-video-keep-ratio "
            f"R, with R = 1 - rate; their default method is {methods.DEFAULT_VIDEO_METHOD}, vLLM's)")
    policy = PrunePolicy.from_config(model_config.hf_config)
    family = families.of_model_type(model_config.hf_config.model_type)
    if policy.default_video_keep_ratio < 1.0 and not family.videos:
        raise ValueError(f"default_video_keep_ratio {policy.default_video_keep_ratio!r}: {family.name}'s videos "
                         f"are served whole (video pruning serves {families.serving_videos()})")


class NoEncoderCudaGraphsMixin:
    """For stock models that capture their tower in encoder CUDA graphs (``cudagraph_mm_encoder``):
    no graphs, because their replay bypasses ``embed_multimodal``, and so pruning."""

    def get_encoder_cudagraph_config(self):
        return dataclasses.replace(super().get_encoder_cudagraph_config(), modalities=[])


class Clip(NamedTuple):
    """One video's candidate tokens, frame after frame: what its method scores and what its
    rows carry (T x P rows each), and each frame's (rows, cols) grid."""

    features: torch.Tensor
    values: torch.Tensor
    grid: tuple[int, int]
    frames: int


class Job(NamedTuple):
    """One image's (or crop's) selection: its method, candidate tokens and K, and the
    profile's probe, (method, K) pairs whose rows are dropped."""

    method: str
    tokens: methods.Tokens
    k: int
    probe: tuple[tuple[str, int], ...] = ()


class PruningModelMixin:
    """Mix into a vLLM multimodal model class (before it in the MRO).

    ``_init_pruning`` loads the selector named in the config (validated against the
    served model); ``_candidates`` makes an image's selection job and ``_select`` runs all
    the jobs of a tower call together.
    """

    token_selector: nn.Module | None
    query_selector: nn.Module | None  # the checkpoint's question-reading section, if any

    def _init_pruning(self, vllm_config, device: torch.device) -> None:
        hf_config = vllm_config.model_config.hf_config
        check_video_pruning(vllm_config.model_config)
        path = selector_path(hf_config)
        self.token_selector = self.query_selector = None
        scheduler = vllm_config.scheduler_config
        # The encoder budget, in tokens as an unpruned image counts them: the most vLLM
        # schedules, and profiles its tower with, in one step at keep 1.0. The scheduler
        # charges a pruned image only K, so a step may hold N / K times as many tower tokens;
        # the tower runs them in chunks of this size (``_in_tower_chunks``).
        self.tower_budget = min(scheduler.max_num_encoder_input_tokens, scheduler.encoder_cache_size)
        if path is None:
            check_budget_predictor(None, hf_config)
            return
        from vllm_tokenprune.selection.selector import (
            check_compatible,
            check_question_width,
            load_query_selector,
            load_selector,
        )

        selector, metadata = load_selector(path)
        check_compatible(metadata, hf_config)
        self.token_selector = selector.to(device=device).eval()
        logger.info("tokenprune: loaded selector %s (trained for %s)", path,
                    metadata.get("source_model"))
        check_budget_predictor(path, hf_config)
        if (found := load_query_selector(path)) is not None:
            check_question_width(found[0], hf_config)
            self.query_selector = found[0].to(device=device).eval()
            logger.info("tokenprune: the selector's question-reading section serves 'learned_query'")

    def _in_tower_chunks(self, embed: Callable[[object, dict], list[torch.Tensor]], image_input,
                         fields: dict[str, list], counts: Sequence[int],
                         rows: Mapping[str, Sequence[int]] | None = None) -> list[torch.Tensor]:
        """``embed(image_input, fields)`` over consecutive images whose ``counts`` (tokens as
        unpruned, ``tower_budget``'s unit) add up to at most the tower budget, an image past it
        alone: the tower never takes more at once than vLLM profiled, whatever K the scheduler
        charged. ``rows`` names the inputs packed flat, with each image's rows in them (Qwen's
        patches, Gemma 3's crops); every other tensor or list of one entry per image is cut
        likewise."""
        # A TypedDict, or a vLLM TensorSchema (its inputs as attributes)
        schema = not isinstance(image_input, Mapping)
        named = ({k: v for k, v in vars(image_input).items() if not k.startswith("_")} if schema
                 else image_input)
        out: list[torch.Tensor] = []
        for images in _chunks(counts, self.tower_budget):
            part = {}
            for name, value in named.items():
                if rows is not None and name in rows:
                    first = sum(rows[name][:images.start])
                    part[name] = value[first:first + sum(rows[name][images])]
                elif isinstance(value, (torch.Tensor, list, tuple)) and len(value) == len(counts):
                    part[name] = value[images]
                else:
                    part[name] = value
            out += embed(type(image_input)(validate=False, **part) if schema else part,
                         {name: value[images] for name, value in fields.items()})
        return out

    @staticmethod
    def _pop_prune_fields(kwargs: dict, modality: str = "image") -> dict[str, list] | None:
        """The batch's plans for items of ``modality`` (``PruningInputs``, validated), as
        lists per column, and under ``QUERY_FIELD`` each item's question ids (a 1-D tensor).
        None without them, or when every item keeps all its tokens and none carries a probe:
        the stock path then gives the same embeddings with no per-item work."""
        plan_field, query_field = FIELDS[modality]
        plan, questions = kwargs.pop(plan_field, None), kwargs.pop(query_field, None)
        if plan is None or questions is None:
            return None
        plan = PruningInputs(tokenprune_plan=plan).tokenprune_plan
        fields = dict(zip(PRUNE_FIELDS, plan.T.tolist()))
        if fields[KEEP_FIELD] == fields[UNPRUNED_FIELD] and not any(fields[PROBE_KEEP_FIELD]):
            return None
        fields[QUERY_FIELD] = [q.reshape(-1) for q in questions]  # a (B, L) tensor, or B tensors
        if len(fields[QUERY_FIELD]) != len(fields[KEEP_FIELD]):
            raise ValueError(f"{len(fields[QUERY_FIELD])} questions for {len(fields[KEEP_FIELD])} items")
        return fields

    @staticmethod
    def _image_methods(fields: dict[str, list[int]], i: int, num_tokens: int) -> list[str]:
        """The methods image i runs: its own, if it keeps fewer than its ``num_tokens``,
        and those of the profile's probe."""
        own = [methods.method_name(fields[METHOD_FIELD][i])] if fields[KEEP_FIELD][i] < num_tokens else []
        return own + methods.mask_names(fields[PROBE_METHODS_FIELD][i])

    @classmethod
    def _requested_probes(cls, fields: dict[str, list[int]], counts: Sequence[int]) -> set[methods.Probe]:
        """The tower statistics that the images of a batch (of ``counts`` tokens) need."""
        names = {name for i, n in enumerate(counts) for name in cls._image_methods(fields, i, n)}
        return set().union(*(methods.get(name).needs for name in names))

    def _candidates(self, fields: dict[str, list[int]], i: int, features: torch.Tensor, *,
                    grids: tuple[tuple[int, int], ...], k: int | None = None, probe_keep: int | None = None,
                    probe_methods: Sequence[str] | None = None, **tokens: object) -> Job:
        """Image i's candidate tokens (N, D) as a selection job; ``k`` and ``probe_keep``, a
        part's share of the image's K and probe K where a family selects per crop (or per
        video frame), ``probe_methods`` those of the probe that run on this part;
        ``tokens`` fills the rest of ``methods.Tokens`` (values, embed, stats)."""
        name = methods.method_name(fields[METHOD_FIELD][i])
        k = fields[KEEP_FIELD][i] if k is None else k
        probe_keep = fields[PROBE_KEEP_FIELD][i] if probe_keep is None else probe_keep
        if probe_methods is None:
            probe_methods = methods.mask_names(fields[PROBE_METHODS_FIELD][i])
        probe = tuple((m, probe_keep) for m in probe_methods) if probe_keep else ()
        running = [m for m, _ in probe] + ([name] if k < len(features) else [])  # at K = N no method runs
        if any(methods.get(m).reads_query for m in running):
            tokens["query"] = self.get_language_model().embed_input_ids(fields[QUERY_FIELD][i].to(features.device))
        return Job(name, methods.Tokens(features, grids, seed=fields[SEED_FIELD][i], selector=self.token_selector,
                                        query_selector=self.query_selector, **tokens), k, probe)

    def _select_videos(self, fields: dict[str, list[int]], clips: Sequence[Clip], *, frames_apart: bool = False,
                       keep: Sequence[int] | None = None) -> list[methods.Rows]:
        """Each video's kept rows (indices into its T x P tokens, ascending), all videos of a
        tower call at once. A method that reads a whole clip (``methods.VIDEO_ONLY``) takes
        each video as one job (``frames_apart``: the prompt holds each frame's run apart, so
        it keeps each frame's share); any other takes each frame as an image, with its share of
        K (``policy.frame_shares``). ``keep``: each video's K where the family keeps some of
        its K rows itself (LLaVA-OneVision's newline); by default the plan's."""
        jobs: list[Job] = []
        owned: list[list[tuple[int, int]]] = []  # each video's (job, first token) whose rows it keeps
        for i, clip in enumerate(clips):
            frame = clip.grid[0] * clip.grid[1]
            k = fields[KEEP_FIELD][i] if keep is None else keep[i]
            probe = methods.mask_names(fields[PROBE_METHODS_FIELD][i])
            whole = methods.get(methods.method_name(fields[METHOD_FIELD][i])).video_only
            clip_job = self._candidates(fields, i, clip.features, values=clip.values, grids=(clip.grid,) * clip.frames,
                                        probe_methods=[m for m in probe if methods.get(m).video_only],
                                        k=k if whole else len(clip.features),  # at K = N: the probe's alone
                                        frames_apart=frames_apart)
            shares, probe_shares = (frame_shares(n, [frame] * clip.frames, first_frame_whole=False)
                                    for n in (k, fields[PROBE_KEEP_FIELD][i]))
            frame_jobs = [self._candidates(fields, i, clip.features[f * frame:(f + 1) * frame],
                                           values=clip.values[f * frame:(f + 1) * frame], grids=(clip.grid,),
                                           k=frame if whole else shares[f], probe_keep=probe_shares[f],
                                           probe_methods=[m for m in probe if not methods.get(m).video_only])
                          for f in range(clip.frames)]
            own = [(clip_job, 0)] if whole else [(job, f * frame) for f, job in enumerate(frame_jobs) if shares[f]]
            owned.append([(len(jobs) + j, first) for j, (_, first) in enumerate(own)])
            jobs += [job for job, _ in own]
            # the probe's other jobs (at K = N a job's own rows are its tokens, untouched)
            jobs += [job for job in (frame_jobs if whole else [clip_job]) if job.probe]
        kept = self._select(jobs)
        return [methods.Rows(torch.cat([kept[j].index + first for j, first in own]),
                             torch.cat([kept[j].values for j, _ in own])) for own in owned]

    @staticmethod
    def _select(jobs: Sequence[Job]) -> list[methods.Rows]:
        """The rows each job keeps, ascending stock positions: all the jobs of a tower call
        at once, each method once (``methods.select_all``)."""
        with torch.inference_mode():
            probe = [(name, job.tokens, k) for job in jobs for name, k in job.probe]
            if probe:  # the memory profile's (module docstring): run for the memory it takes
                methods.select_all(probe)
            return methods.select_all([(job.method, job.tokens, job.k) for job in jobs])

    def _selector_weight_names(self) -> Iterable[str]:
        """Names vLLM's loader must see as loaded (the selector loaded itself)."""
        return {f"{name}.{n}" for name in ("token_selector", "query_selector")
                if (module := getattr(self, name)) is not None for n, _ in module.named_parameters()}

