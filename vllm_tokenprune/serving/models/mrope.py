"""Pruning for the M-RoPE families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): placeholders,
selection, positions, for images and videos.

What the method sees: the merged tokens the language model receives, i.e. the vision
module's output after the patch merger, laid out as the image's merged grid. Those are
what the placeholders count (one per 2 x 2 patch group) and the only units the model can
keep or drop. The selector checkpoint's ``vision_signature`` records ``out_hidden_size``
(the merger's output width) as its feature dim accordingly. Tower attention statistics
are per patch; a merged token gets the mean over its 2 x 2 patches (keys likewise), in
stock order (Qwen2.5-VL's tower runs its tokens in window order).

Positions. The language model places a text token at (p, p, p) and an image's merged
token at row r, column c at (b, b + r, b + c), b = the position after the image's
``<|vision_start|>``; text after the image continues at b + max(grid_h, grid_w). A
pruned image keeps the (t, h, w) positions its kept tokens have in the stock model, and
everything after it keeps its stock positions, which therefore depend only on the grid,
never on which tokens were kept. A video is placed alike: on Qwen2-VL and Qwen2.5-VL one run
whose token (t, h, w) sits at (b + t', b + h, b + w), t' the frame's time
(``frame_times``); on Qwen3-VL each frame its own run after a timestamp, placed like an
image. In vLLM's V1 runner that takes three steps:

1. ``get_mrope_input_positions`` runs when a request arrives, before the encoder. It
   computes the stock positions of the unpruned prompt (vLLM's own code, on the prompt
   with every item's dropped placeholders put back: at the end of its run, or of each
   frame's) and keeps the columns of the tokens this prompt has: text exact, each item's
   K tokens provisionally at its first K cells (exact at keep 1.0), and the stock
   position delta for decode.
2. ``embed_multimodal`` keeps each item's K rows (a merged row at the position its
   method gives it) and appends their relative (t, h, w) positions as extra columns
   (``POSITION_COLUMNS``); a video served whole gets -1s there, because the runner strips
   the columns of every multimodal embedding.
3. ``recompute_mrope_positions``, called by the runner for each scheduled request
   while it gathers the step's embeddings (a prefill chunk's, or none), strips the
   columns and writes the kept tokens' true positions (b + relative, b after the nearest
   ``<|vision_start|>`` before them). Text, and videos served whole, are left as step 1
   made them.

Because text positions never depend on the kept set, a prefix-cache hit (no encoder
run, no recompute for the cached part) and chunked prefill (an image split over steps)
see the same positions as one uncached prefill. The runner calls the recompute only
when its ``is_multimodal_pruning_enabled`` is set. On the V1 runners (vLLM's CPU runner,
and the GPU runner with ``VLLM_USE_V2_MODEL_RUNNER=0``) the plugin's
``_let_runner_recompute_mrope`` sets it for these models; Model Runner V2 (the GPU
default) runs the same recompute through the model state ``runner_v2.py`` gives it. Either
sets the model's flag of the same name too, so the model appends columns exactly when
the runner strips them. ``check_position_recompute`` stops the model at start-up where
neither would happen (a runner that moved, pipeline parallelism).

The columns travel in the embedding dtype: exact in fp32, and in bf16 for grids of up
to 256 merged rows or columns, which is why they hold relative, not absolute, positions
(a video's time, which grows with its length, takes two columns).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence

import torch
from vllm.config import CompilationMode
from vllm.logger import init_logger
from vllm.multimodal.parse import ImageSize

from vllm_tokenprune.selection import methods
from vllm_tokenprune.selection.methods.attention import TowerProbe
from vllm_tokenprune.selection.methods.batch import to_device
from vllm_tokenprune.serving.models.model import Clip, NoEncoderCudaGraphsMixin, PruningModelMixin
from vllm_tokenprune.serving.models.processor import PruningProcessorMixin

logger = init_logger(__name__)

# Appended to every multimodal embedding: its relative (t, h, w), t in two columns (t =
# 256 * high + low, exact in bf16 for a video's times); -1 in all four: the token keeps
# the position step 1 gave it (a video served whole).
POSITION_COLUMNS = 4
_T_BASE = 256
# hf_config attribute (set with --hf-overrides) that tells the processor, which cannot see
# the compilation config, that the tower is compiled: attention methods are refused then.
TOWER_COMPILED_KEY = "tokenprune_tower_compiled"


class MRopePruningProcessorMixin(PruningProcessorMixin):
    """The Qwen processors' image token counts and per-image pixel rows."""

    def _unpruned_tokens(self, image_size: ImageSize, hf_kwargs: Mapping[str, object]) -> int:
        return self.info.get_num_image_tokens(
            image_width=image_size.width, image_height=image_size.height,
            image_processor=self.info.get_image_processor(), mm_kwargs=hf_kwargs,
        )

    def _video_tokens(self, processed) -> list[tuple[int, int]]:
        unit = self.info.get_hf_config().vision_config.spatial_merge_size ** 2
        return [(t * h * w // unit, h * w // unit) for t, h, w in processed["video_grid_thw"].tolist()]

    def _tower_statistics_unavailable(self) -> str | None:
        if self.info.ctx.model_config.multimodal_config.mm_encoder_tp_mode == "data":
            return "this server spreads over data-parallel encoder ranks (--mm-encoder-tp-mode data)"
        if getattr(self.info.get_hf_config(), TOWER_COMPILED_KEY, False):
            return "this server compiles (compile_mm_encoder), so no hook can read it"
        return None


def _relative_positions(index: torch.Tensor, grid: tuple[int, int], times: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """(K, 4) the position columns of merged tokens ``index`` of an item of (rows, cols)
    frames, relative to its first token, on the index's device: an image's t is 0 (one
    temporal slice); a video frame's is its entry of ``times`` (on the device)."""
    rows, cols = grid
    t = torch.zeros_like(index) if times is None else times[index // (rows * cols)]
    return torch.stack([t // _T_BASE, t % _T_BASE, index // cols % rows, index % cols], dim=1)


def frame_times(frames: int, t_factor: float) -> list[int]:
    """A video's frames' temporal positions, relative to its first: frame f at
    int(f * t_factor), t_factor its seconds per frame times ``tokens_per_second``; as the
    stock Qwen2-VL / Qwen2.5-VL place them (``get_mrope_input_positions``)."""
    return [int(f * t_factor) for f in range(frames)]


def check_tower_compilation(compilation_config, hf_config) -> None:
    """Refuse to start with a compiled tower unless the processor knows it is compiled."""
    if (compilation_config.compile_mm_encoder and compilation_config.mode != CompilationMode.NONE
            and not getattr(hf_config, TOWER_COMPILED_KEY, False)):
        raise ValueError(
            "compile_mm_encoder compiles the vision tower, whose attention the methods "
            f"{', '.join(n for n in methods.METHOD_NAMES if methods.get(n).needs)} read through a hook "
            f"that compiled code skips; add \"{TOWER_COMPILED_KEY}\": true to --hf-overrides so that "
            "requests for them are refused, or drop compile_mm_encoder")


def check_position_recompute(vllm_config, model) -> None:
    """Refuse to start where kept image tokens would keep provisional positions: the
    runner this server will use must recompute them (step 3 of the module docstring)."""
    name = type(model).__name__
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError(f"{name}: pipeline parallelism is not supported with pruning: later stages "
                         "compute M-RoPE positions without the encoder's kept tokens")
    if vllm_config.use_v2_model_runner:
        try:
            from vllm.v1.worker.gpu.model_states import resolve_model_state_cls
        except ImportError as exc:
            raise ValueError(f"{name}: vLLM's Model Runner V2 moved its model states ({exc}); "
                             "set VLLM_USE_V2_MODEL_RUNNER=0 to serve pruned models on V1") from None
        if resolve_model_state_cls(vllm_config, model) is not model.get_model_state_cls():
            raise ValueError(f"{name}: Model Runner V2 ignores the model's own state, so it would not "
                             "recompute M-RoPE positions; set VLLM_USE_V2_MODEL_RUNNER=0")
    else:
        from vllm_tokenprune.serving.plugin import v1_runners_recompute_mrope

        if not v1_runners_recompute_mrope():
            raise ValueError(f"{name}: vLLM's V1 runners moved, so they would not recompute M-RoPE "
                             "positions of pruned images (see plugin._let_runner_recompute_mrope)")


class MRopePruningModelMixin(NoEncoderCudaGraphsMixin, PruningModelMixin):
    """Mix into a Qwen-VL model class (before it in the MRO). Expects the stock class's
    ``visual``, ``config``, ``_parse_and_validate_multimodal_inputs``,
    ``_process_image_input``, ``_process_video_input`` and ``get_mrope_input_positions``."""

    tokenprune_prunes_mrope_images = True  # plugin.PRUNES_MROPE_IMAGES: the V1 runners' shim looks for it
    # A video's frames each in their own run, after a timestamp, placed like images (Qwen3-VL);
    # otherwise one run of T x h x w tokens at (t, h, w) (Qwen2-VL, Qwen2.5-VL).
    video_frames_apart = False

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # Off until the runner turns its recompute on (the V1 shim, or V2's model state);
        # Qwen2-VL, which has no EVS, never sets it itself.
        self.is_multimodal_pruning_enabled = False
        check_tower_compilation(vllm_config.compilation_config, self.config)
        check_position_recompute(vllm_config, self)
        self._init_pruning(vllm_config, self.visual.device)

    def get_model_state_cls(self):
        """Model Runner V2's hook for a model's own state (``models/runner_v2.py``): the one V2
        would choose, hybrid or not, with the pruner on."""
        from vllm_tokenprune.serving.models.runner_v2 import PrunedMRopeHybridModelState, PrunedMRopeModelState

        return PrunedMRopeHybridModelState if getattr(self, "is_hybrid", False) else PrunedMRopeModelState

    def _selection_features(self, embeds: torch.Tensor) -> torch.Tensor:
        """The part of an image's embeddings (N, D) the method scores."""
        return embeds

    def _probe_blocks(self) -> dict[str, int]:
        """The tower blocks of ``methods.LATE`` and ``methods.MIDDLE``: for towers whose
        every block attends over the whole image, the last one and the one at half depth
        (HiPrune's object layer)."""
        depth = len(self.visual.blocks)
        return {methods.LATE: depth - 1, methods.MIDDLE: max(0, depth // 2 - 1)}

    def _tower_order(self, grid: list[int]) -> torch.Tensor | None:
        """The merged token at each position of the tower's sequence for an image, or None
        when the tower runs them in stock order."""
        return None

    def _visual_features(self, mm_input, grids: list[list[int]], probes: set[methods.Probe]
                         ) -> tuple[Sequence[torch.Tensor], list[dict[methods.Probe, torch.Tensor]]]:
        """Each image's embeddings and, per merged token, the statistics of ``probes``."""
        if not probes:
            return self._process_image_input(mm_input), [{}] * len(grids)
        ops = {layer: self.visual.blocks[block].attn.attn for layer, block in self._probe_blocks().items()}
        probe = TowerProbe(ops, probes, has_cls=False, total_heads=self.config.vision_config.num_heads)
        with probe:
            embeds = self._process_image_input(mm_input)
        patches = [t * h * w for t, h, w in grids]  # all images packed in one sequence
        unit = self.config.vision_config.spatial_merge_size ** 2
        stats = []
        for image, grid in zip(probe.results(list(zip(itertools.accumulate([0, *patches]), patches))), grids):
            order = self._tower_order(grid)
            merged = {p: v.reshape(len(v) // unit, unit, *v.shape[1:]).mean(dim=1) for p, v in image.items()}
            stats.append(merged if order is None else
                         {p: v[to_device(order.argsort(), v.device)] for p, v in merged.items()})
        return embeds, stats

    # -- embeddings -------------------------------------------------------------------

    def embed_multimodal(self, **kwargs: object):
        fields = self._pop_prune_fields(kwargs)
        video_fields = self._pop_prune_fields(kwargs, "video")
        merge = self.config.vision_config.spatial_merge_size
        out: list[torch.Tensor] = []
        for modality, mm_input in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality.startswith("video"):  # "video"; Qwen2-VL says "videos"
                thw = mm_input["video_grid_thw"].tolist()
                if video_fields is not None and mm_input["type"] == "pixel_values_videos":
                    out += self._in_tower_chunks(self._pruned_videos, mm_input, video_fields,
                                                 [t * h * w // merge**2 for t, h, w in thw],
                                                 {"pixel_values_videos": [t * h * w for t, h, w in thw]})
                else:
                    out += [self._with_positions(e, None) for e in self._process_video_input(mm_input)]
                continue
            thw = mm_input["image_grid_thw"].tolist()  # kept on the CPU by vLLM
            if fields is not None and mm_input["type"] == "pixel_values":
                out += self._in_tower_chunks(self._pruned_images, mm_input, fields,
                                             [t * h * w // merge**2 for t, h, w in thw],
                                             {"pixel_values": [t * h * w for t, h, w in thw]})
            else:
                out += [self._with_positions(e, _relative_positions(torch.arange(len(e), device=e.device),
                                                                   (t * h // merge, w // merge)))
                        for e, (t, h, w) in zip(self._process_image_input(mm_input), thw)]
        return tuple(out)

    def _pruned_images(self, mm_input, fields: dict[str, list]) -> list[torch.Tensor]:
        """Each image's kept rows, with their relative positions appended."""
        merge = self.config.vision_config.spatial_merge_size
        thw = mm_input["image_grid_thw"].tolist()
        grids = [(t * h // merge, w // merge) for t, h, w in thw]  # merged tokens
        image_embeds, stats = self._visual_features(mm_input, thw, self._requested_probes(
            fields, [h * w for h, w in grids]))
        kept = self._select([self._candidates(fields, i, self._selection_features(embeds), values=embeds,
                                              grids=(grid,), stats=stats[i])
                             for i, (embeds, grid) in enumerate(zip(image_embeds, grids))])
        return [self._with_positions(rows.values, _relative_positions(rows.index, grid))
                for rows, grid in zip(kept, grids)]

    def _pruned_videos(self, mm_input, fields: dict[str, list]) -> list[torch.Tensor]:
        """Each video's kept rows (``PruningModelMixin._select_videos``), with their relative
        positions appended."""
        merge = self.config.vision_config.spatial_merge_size
        thw = mm_input["video_grid_thw"].tolist()  # on the CPU, as second_per_grid_ts
        seconds = mm_input.get("second_per_grid_ts")
        seconds = [1.0] * len(thw) if seconds is None else seconds.tolist()
        # frames apart are each placed like an image, after their own <|vision_start|>
        per_second = 0.0 if self.video_frames_apart else getattr(self.config.vision_config, "tokens_per_second", 1.0)
        clips = [Clip(self._selection_features(embeds), embeds, (h // merge, w // merge), t)
                 for embeds, (t, h, w) in zip(self._process_video_input(mm_input), thw)]
        kept = self._select_videos(fields, clips, frames_apart=self.video_frames_apart)
        return [self._with_positions(rows.values, _relative_positions(
                    rows.index, clip.grid, to_device(frame_times(clip.frames, spg * per_second), rows.index.device)))
                for rows, clip, spg in zip(kept, clips, seconds)]

    def _with_positions(self, embeds: torch.Tensor, relative: torch.Tensor | None
                        ) -> torch.Tensor:
        """Append the rows' relative positions (-1s for a video served whole: step 1's stand)
        when the runner strips them again; otherwise the embeddings as they are."""
        if not self.is_multimodal_pruning_enabled:
            return embeds
        if relative is None:
            relative = embeds.new_full((len(embeds), POSITION_COLUMNS), -1)
        return torch.cat([embeds, relative.to(embeds.dtype)], dim=1)

    # -- positions --------------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features):
        """Stock positions of the unpruned prompt at the tokens this prompt has (see the
        module docstring, step 1), and the stock delta."""
        image_token = self.config.image_token_id
        merge = self.config.vision_config.spatial_merge_size
        stock_tokens: list[int] = []
        stock_features = []
        dropped: list[tuple[int, int]] = []  # spans of the stock prompt absent here
        cursor = 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            place = feature.mm_position
            start = place.offset + len(stock_tokens) - cursor  # offset in the stock prompt
            stock_tokens += input_tokens[cursor:place.offset + place.length]
            cursor = place.offset + place.length
            stock_features.append(dataclasses.replace(
                feature, mm_position=dataclasses.replace(place, offset=start)))
            if feature.modality == "image" or not self.video_frames_apart:
                # a pruned item's run lost its last N - K tokens
                grid, token = ((feature.data["image_grid_thw"], image_token) if feature.modality == "image"
                               else (feature.data["video_grid_thw"], self.config.video_token_id))
                missing = int(grid.data.prod()) // merge**2 - place.length
                if missing > 0:
                    stock_tokens += [token] * missing
                    dropped.append((start + place.length, start + place.length + missing))
            else:  # each frame's run lost its last tokens: put them back before its <|vision_end|>
                stock_tokens = stock_tokens[:len(stock_tokens) - place.length]
                span = input_tokens[place.offset:place.offset + place.length]
                frame = int(feature.data["video_grid_thw"].data[1:].prod()) // merge**2
                stock_tokens += self._frames_restored(span, frame, len(stock_tokens), dropped)
                stock_features[-1] = dataclasses.replace(stock_features[-1], mm_position=dataclasses.replace(
                    place, offset=start, length=len(stock_tokens) - start,
                    is_embed=None if place.is_embed is None else torch.tensor(
                        [t == self.config.video_token_id for t in stock_tokens[start:]])))
        stock_tokens += input_tokens[cursor:]
        positions, delta = super().get_mrope_input_positions(stock_tokens, stock_features)
        if not dropped:
            return positions, delta
        present = torch.ones(positions.shape[1], dtype=torch.bool)
        for begin, end in dropped:
            present[begin:end] = False
        return positions[:, present], delta + len(stock_tokens) - len(input_tokens)

    def _frames_restored(self, span: list[int], frame: int, at: int, dropped: list[tuple[int, int]]) -> list[int]:
        """A video span whose frames' runs were cut, with each run filled back to ``frame``
        tokens before its ``<|vision_end|>``; the filled spans (from ``at``, the span's offset in
        the stock prompt) are appended to ``dropped``."""
        video, end = self.config.video_token_id, self.config.vision_end_token_id
        out: list[int] = []
        run = 0
        for token in span:
            if token == end and run < frame:
                dropped.append((at + len(out), at + len(out) + frame - run))
                out += [video] * (frame - run)
            run = run + 1 if token == video else 0
            out.append(token)
        return out

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.Tensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """Strip the position columns and write the image tokens' true positions (module
        docstring, step 3). The V1 runners call it for every request on every step, decode
        included (token ids as a list); V2 only for requests whose step holds media
        embeddings (token ids as a device tensor, resumed outputs included)."""
        positions = mrope_positions
        stripped = [e[:, :-POSITION_COLUMNS] for e in multimodal_embeddings]
        if multimodal_embeddings:
            device = positions.device
            ids = torch.as_tensor(input_ids).to(device)
            relative = torch.cat([e[:, -POSITION_COLUMNS:] for e in multimodal_embeddings])
            relative = relative.to(device).long()
            # The embeddings of this step fill the media tokens from num_computed_tokens
            # on, in order (a partly computed item continues where it stopped).
            media = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
            media[:num_computed_tokens] = False
            rows = media.nonzero().squeeze(1)[: len(relative)]
            relative = relative[: len(rows)]
            thw = torch.stack([relative[:, 0] * _T_BASE + relative[:, 1], relative[:, 2], relative[:, 3]])
            index = torch.arange(len(ids), device=device)
            last_start = torch.where(ids == self.config.vision_start_token_id, index, -1).cummax(0).values
            positions = positions.clone()
            positions[:, rows] = torch.where(relative[:, 0] >= 0, positions[0, last_start[rows]] + 1 + thw,
                                             positions[:, rows])
        # Equals the stock delta of step 1: the prompt's last position is text
        # (<|vision_end|> follows every image), and text positions are never rewritten.
        delta = int(positions.max()) + 1 - len(input_ids)
        return stripped, positions, delta

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(weights) | set(self._selector_weight_names())
