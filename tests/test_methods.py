"""The selection methods against their definitions on small inputs worked out by hand or by
brute force; the tower attention statistics against transformers' own attention weights;
and those statistics as vLLM's towers produce them (offline, tiny checkpoints)."""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import noise_image

from vllm_tokenprune.families import FAMILIES, of_architectures
from vllm_tokenprune.policy import video_keep_count
from vllm_tokenprune.selection import methods
from vllm_tokenprune.selection.methods import (
    ATTENTION,
    GLOBAL_ATTENTION,
    KEYS,
    LATE,
    METHOD_NAMES,
    MIDDLE,
    Probe,
    Tokens,
)
from vllm_tokenprune.selection.methods.attention import TowerProbe, cls_attention, global_attention, statistics
from vllm_tokenprune.selection.methods.divprune import greedy_max_min
from vllm_tokenprune.selection.methods.grid import with_neighbours
from vllm_tokenprune.selection.methods.pool import cells, shares
from vllm_tokenprune.selection.methods.visionzip import split
from vllm_tokenprune.selection.selector import SelectorConfig, TokenSelector
from vllm_tokenprune.testbed.tiny import cpu_dtype

ALL_PROBES = [Probe(stat, layer) for stat in (ATTENTION, GLOBAL_ATTENTION, KEYS) for layer in (LATE, MIDDLE)]


def random_tokens(grids, dim: int = 8, seed: int = 0, **kwargs) -> Tokens:
    """Tokens with random features, every statistic a method may ask for and a question."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(r * c for r, c in grids)
    stats = {p: torch.randn(n, 4, generator=gen) if p.stat == KEYS else torch.rand(n, generator=gen)
             for p in ALL_PROBES}
    kwargs.setdefault("query", torch.randn(3, dim, generator=gen))
    if "query_selector" not in kwargs:
        torch.manual_seed(seed)
        kwargs["query_selector"] = TokenSelector(SelectorConfig(feature_dim=dim, query_dim=dim)).eval()
    return Tokens(torch.randn(n, dim, generator=gen), tuple(grids), seed=seed, stats=stats, **kwargs)


# --- the registry ------------------------------------------------------------------------

def test_wire_ids_are_stable_and_every_name_resolves():
    assert METHOD_NAMES[:3] == ("learned", "random", "norm")  # ids already on the wire
    assert len(set(METHOD_NAMES)) == len(METHOD_NAMES)
    for ident, name in enumerate(METHOD_NAMES):
        assert methods.method_id(name) == ident and methods.get(name).name == name


def test_every_method_has_its_paragraph_in_the_methods_doc():
    """docs/architecture.md, "Adding a method": each name leads a paragraph of "The methods"."""
    doc = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    section = doc.split("\n## The methods\n", 1)[1].split("\n## ", 1)[0]
    leads = " ".join(re.findall(r"^\*\*(.+?)\*\*", section, flags=re.M))
    assert [name for name in METHOD_NAMES if f"`{name}`" not in leads] == []


def test_importing_the_method_names_imports_neither_torch_nor_vllm():
    code = ("import sys, vllm_tokenprune.selection.methods, vllm_tokenprune.policy; "
            "sys.exit('torch' in sys.modules or 'vllm' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("name", METHOD_NAMES[1:])
def test_every_k_gives_k_rows_at_ascending_stock_positions(name):
    # a [CLS]-like 1 x 1 grid, then a patch grid; for a method of whole videos, three frames
    tokens = random_tokens([(3, 4)] * 3 if methods.get(name).video_only else [(1, 1), (3, 4)])
    for k in range(1, len(tokens)):
        rows = methods.select(name, tokens, k)
        assert len(rows.index) == k == len(rows.values), (name, k)
        assert rows.index.diff().gt(0).all() and 0 <= rows.index.min() and rows.index.max() < len(tokens)
    everything = methods.select(name, tokens, len(tokens))
    assert torch.equal(everything.index, torch.arange(len(tokens)))
    assert everything.values is tokens.values  # K = N: the stock rows, untouched


def test_rows_carry_the_values_not_the_scored_features():
    """Qwen3-VL scores the main embedding and carries the DeepStack channels along."""
    tokens = random_tokens([(4, 4)])
    wide = torch.cat([tokens.features, -tokens.features], dim=1)
    tokens.values = wide
    for name in METHOD_NAMES[1:]:
        rows = methods.select(name, tokens, 5)
        assert rows.values.shape == (5, 16)
        assert torch.allclose(rows.values[:, :8], -rows.values[:, 8:]), name


# --- [CLS]-attention ---------------------------------------------------------------------

def test_cls_attention_keeps_the_k_tokens_the_cls_token_attends_to_most():
    tokens = random_tokens([(4, 4)])
    tokens.stats[Probe(ATTENTION, LATE)] = torch.tensor(
        [.01, .2, .02, .03, .3, .04, .05, .06, .07, .08, .09, .1, .25, .11, .12, .13])
    rows = methods.select("cls_attention", tokens, 3)
    assert rows.index.tolist() == [1, 4, 12]
    assert torch.equal(rows.values, tokens.features[[1, 4, 12]])


# --- VisionZip ---------------------------------------------------------------------------

def test_visionzip_splits_k_as_the_paper():
    assert [split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert split(1) == (1, 0)


def test_visionzip_keeps_the_top_attention_tokens_and_merges_the_rest_into_uniform_targets():
    n, k = 20, 13  # 11 dominant + 2 contextual
    tokens = random_tokens([(4, 5)])
    attention = torch.linspace(0, 1, n)[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    tokens.stats[Probe(ATTENTION, LATE)] = attention
    dominant = attention.argsort(descending=True)[:11].sort().values
    rest = [i for i in range(n) if i not in dominant]  # 9 tokens; targets every 9 // 2 = 4th
    targets = [rest[0], rest[4]]
    # Keys: rest[1..3] point like the first target, rest[5..8] like the second.
    keys = torch.zeros(n, 2)
    keys[:, 0] = 1
    for i in rest[4:]:
        keys[i] = torch.tensor([0.1, 1.0])
    tokens.stats[Probe(KEYS, LATE)] = keys

    rows = methods.select("visionzip", tokens, k)
    assert rows.index.tolist() == sorted([*dominant.tolist(), *targets])
    values = dict(zip(rows.index.tolist(), rows.values))
    for i in dominant.tolist():
        assert torch.equal(values[i], tokens.features[i])
    assert torch.allclose(values[rest[0]], tokens.features[rest[:4]].mean(0))
    assert torch.allclose(values[rest[4]], tokens.features[rest[4:]].mean(0))


# --- HiPrune -----------------------------------------------------------------------------

def test_neighbours_stay_inside_each_grid():
    grids = ((3, 3), (2, 4))  # tokens 0-8, then 9-16

    def marked(index):
        return with_neighbours(torch.tensor(index), grids).nonzero().squeeze(1).tolist()

    assert marked([4]) == [1, 3, 4, 5, 7]
    assert marked([2]) == [1, 2, 5]  # no wrap to token 3
    assert marked([9]) == [9, 10, 13]  # not token 8 of grid one
    assert marked([8, 16]) == [5, 7, 8, 12, 15, 16]


def test_hiprune_takes_anchors_their_buffers_then_registers():
    tokens = random_tokens([(10, 10)])
    k = 50  # round(50 * 0.1 / 5) = 1 anchor
    obj = torch.zeros(100)
    obj[44] = 1.0  # the anchor: row 4, column 4
    tokens.stats[Probe(GLOBAL_ATTENTION, MIDDLE)] = obj
    deep = torch.arange(100.0)  # registers: the highest deep attention, outside the anchor's cross
    tokens.stats[Probe(GLOBAL_ATTENTION, LATE)] = deep
    rows = methods.select("hiprune", tokens, k)
    local = {34, 43, 44, 45, 54}
    registers = set(range(55, 100))  # 45 of them, fills K = 50
    assert set(rows.index.tolist()) == local | registers
    assert torch.equal(rows.values, tokens.features[rows.index])


def test_hiprune_without_anchors_for_small_k_is_deep_attention_top_k():
    tokens = random_tokens([(6, 6)])
    rows = methods.select("hiprune", tokens, 10)  # round(10 * 0.1 / 5) = 0 anchors
    deep = tokens.stats[Probe(GLOBAL_ATTENTION, LATE)]
    assert rows.index.tolist() == deep.argsort(descending=True)[:10].sort().values.tolist()


# --- DivPrune ----------------------------------------------------------------------------

def cosine_distances(points: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(points.double(), dim=-1)
    return 1 - unit @ unit.T


def min_pairwise(dist: torch.Tensor, subset) -> float:
    return min(dist[i, j].item() for i, j in itertools.combinations(subset, 2))


CIRCLE_DEGREES = torch.tensor([0, 10, 20, 90, 100, 180, 185, 270, 275], dtype=torch.float64)
CIRCLE = torch.stack([CIRCLE_DEGREES.deg2rad().cos(), CIRCLE_DEGREES.deg2rad().sin()], dim=1)


def test_divprune_finds_the_brute_force_max_min_subset_on_a_tiny_case():
    dist = cosine_distances(CIRCLE)
    tokens = Tokens(CIRCLE.float(), ((1, len(CIRCLE)),), seed=0)
    for k in range(2, len(CIRCLE)):
        best = max(min_pairwise(dist, s) for s in itertools.combinations(range(len(CIRCLE)), k))
        kept = methods.select("divprune", tokens, k).index.tolist()
        if k == 3:  # the greedy rule is the paper's approximation: 90 deg where 95 exist
            assert min_pairwise(dist, kept) == pytest.approx(1 - math.cos(math.radians(90)), abs=1e-6)
            assert best == pytest.approx(1 - math.cos(math.radians(95)))
        else:
            assert min_pairwise(dist, kept) == pytest.approx(best, abs=1e-6), k
    # By hand: ties go to the lower index; 0 deg first (nearest neighbour 10 deg away,
    # like 10, 20, 90 and 100), then 180, then 90 (90 deg from both, like 270), then 270.
    assert methods.select("divprune", tokens, 4).index.tolist() == [0, 3, 5, 7]


def test_divprune_each_pick_follows_the_greedy_rule():
    points = torch.randn(30, 6, generator=torch.Generator().manual_seed(2))
    dist = cosine_distances(points)
    picks = greedy_max_min(points, 12).tolist()
    off_diagonal = dist + torch.diag(torch.full((30,), math.inf, dtype=torch.float64))
    assert picks[0] == off_diagonal.min(dim=1).values.argmax().item()  # most isolated token
    for i in range(1, len(picks)):
        to_kept = dist[:, picks[:i]].min(dim=1).values
        to_kept[picks[:i]] = -math.inf
        assert dist[picks[i], picks[:i]].min() == pytest.approx(to_kept.max().item(), abs=1e-6)


def test_divprune_never_keeps_a_token_twice_among_duplicates():
    points = torch.ones(6, 3)
    assert sorted(greedy_max_min(points, 4).tolist()) == [0, 1, 2, 3]


def test_divprune_measures_diversity_as_the_language_model_sees_tokens():
    """LLaVA: distances between projected tokens; the rows still carry tower features."""
    features = torch.randn(len(CIRCLE), 4)
    tokens = Tokens(features, ((1, len(CIRCLE)),), seed=0, embed=lambda f: CIRCLE.float())
    rows = methods.select("divprune", tokens, 4)
    assert rows.index.tolist() == [0, 3, 5, 7]
    assert torch.equal(rows.values, features[[0, 3, 5, 7]])


# --- pooling -----------------------------------------------------------------------------

def test_pool_at_a_quarter_of_24x24_is_2x2_average_pooling():
    tokens = random_tokens([(24, 24)], dim=5)
    rows = methods.select("pool", tokens, 144)
    grid = tokens.features.T.reshape(1, 5, 24, 24)
    want = torch.nn.functional.avg_pool2d(grid, 2).reshape(5, 144).T
    assert torch.allclose(rows.values, want, atol=1e-6)
    top_left = torch.arange(0, 24, 2)[:, None] * 24 + torch.arange(0, 24, 2)[None, :]
    assert torch.equal(rows.index, top_left.flatten())


@pytest.mark.parametrize("rows_cols", [(5, 7), (1, 9), (6, 2), (4, 4)])
def test_pool_partitions_any_grid_into_exactly_k_cells(rows_cols):
    rows, cols = rows_cols
    tokens = random_tokens([rows_cols])
    for k in range(1, rows * cols):
        cell_of, centres = cells(rows, cols, k)
        assert sorted(set(cell_of.tolist())) == list(range(k))  # every cell has a token
        assert torch.equal(cell_of[centres], torch.arange(k))  # a cell sits at one of its own
        blocks = cell_of.view(rows, cols)
        for cell in range(k):  # cells are rectangles
            ys, xs = (blocks == cell).nonzero(as_tuple=True)
            assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        pooled = methods.select("pool", tokens, k)
        assert torch.equal(pooled.index, centres)
        for cell in range(k):
            assert torch.allclose(pooled.values[cell], tokens.features[cell_of == cell].mean(0), atol=1e-6)


def test_pool_shares_k_between_grids_in_proportion():
    assert shares(10, [576, 1200]) == [3, 7]  # 3.24 and 6.76
    assert shares(3, [4, 4, 4]) == [1, 1, 1]
    assert shares(2, [1, 576]) == [0, 2]  # a [CLS] 1 x 1 grid gets its share, here none
    tokens = random_tokens([(2, 2), (4, 6)])
    rows = methods.select("pool", tokens, 7)  # 1 cell from the first grid, 6 from the second
    assert rows.index[0] == 0 and torch.allclose(rows.values[0], tokens.features[:4].mean(0))
    assert (rows.index[1:] >= 4).all()


# --- tower attention statistics ----------------------------------------------------------

def tiny_clip(layers: int = 3):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                              num_attention_heads=4, image_size=56, patch_size=14)
    config._attn_implementation = "eager"
    return CLIPVisionModel(config).eval()


def clip_queries_keys(model, hidden: torch.Tensor, layer: int):
    """A CLIP layer's queries and keys (B, S, H, d) from its input hidden states."""
    attn = model.encoder.layers[layer]
    x = attn.layer_norm1(hidden)
    heads = model.config.num_attention_heads

    def split_heads(t):
        return t.reshape(*t.shape[:2], heads, -1)

    return split_heads(attn.self_attn.q_proj(x)), split_heads(attn.self_attn.k_proj(x)), attn.self_attn.scale


@torch.no_grad()
def test_attention_statistics_equal_transformers_attention_weights(monkeypatch):
    model = tiny_clip()
    pixels = torch.randn(2, 3, 56, 56)
    out = model(pixels, output_attentions=True, output_hidden_states=True)
    for layer in range(model.config.num_hidden_layers):
        q, k, scale = clip_queries_keys(model, out.hidden_states[layer], layer)
        weights = out.attentions[layer]  # (B, H, S, S), softmax(q k^T * scale)
        assert torch.allclose(cls_attention(q, k, scale), weights[:, :, 0].mean(1), atol=1e-6)
        assert torch.allclose(global_attention(q, k, scale), weights.mean(dim=(1, 2)), atol=1e-6)
        # Query chunks of one row at a time give the same sums.
        monkeypatch.setattr("vllm_tokenprune.selection.methods.attention._CHUNK_ELEMENTS", 1)
        assert torch.allclose(global_attention(q, k, scale), weights.mean(dim=(1, 2)), atol=1e-6)
        monkeypatch.undo()
        found = statistics(q, k, scale, {ATTENTION, GLOBAL_ATTENTION, KEYS}, has_cls=False)
        assert torch.equal(found[ATTENTION], found[GLOBAL_ATTENTION])  # no [CLS]: all queries
        assert torch.allclose(found[KEYS], k.mean(dim=2))


def test_tower_probe_records_queries_and_keys_only_while_active():
    class Op(torch.nn.Module):  # the interface of vLLM's MMEncoderAttention that is used
        num_heads, head_size, scale = 2, 3, 0.5

        def forward(self, query, key, value, cu_seqlens=None):
            return value

    op = Op()
    q, k = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    probes = {Probe(ATTENTION, LATE), Probe(KEYS, LATE)}
    for call in (lambda: op(q, k, k), lambda: op(query=q, key=k, value=k)):
        with TowerProbe({LATE: op, MIDDLE: op}, probes, has_cls=True, total_heads=2) as probe:
            call()
        assert not op._forward_pre_hooks
        found = probe.results()
        q4, k4 = q.view(2, 5, 2, 3), k.view(2, 5, 2, 3)
        assert len(found) == 2 and set(found[0]) == probes
        for b in range(2):
            assert torch.allclose(found[b][Probe(ATTENTION, LATE)], cls_attention(q4, k4, 0.5)[b])
            assert torch.allclose(found[b][Probe(KEYS, LATE)], k4[b].mean(1))
        packed = probe.results(spans=[(0, 2), (2, 3)])  # one packed row of two sequences
        assert [len(s[Probe(KEYS, LATE)]) for s in packed] == [2, 2, 3, 3]


TP_ORDER = """
import torch
from vllm_tokenprune.selection.methods import ATTENTION, GLOBAL_ATTENTION, KEYS, LATE, MIDDLE, Probe
from vllm_tokenprune.selection.methods.attention import TowerProbe

class Op(torch.nn.Module):
    num_heads, head_size, scale = 2, 3, 0.5

    def forward(self, query, key, value):
        return value

reduced = []
TowerProbe._all_heads = lambda self, v, op: reduced.append(round(float(v.flatten()[1]), 5)) or v
ops, q = {LATE: Op(), MIDDLE: Op()}, torch.arange(30.0).reshape(1, 5, 6) / 30
with TowerProbe(ops, {Probe(s, l) for s in (ATTENTION, GLOBAL_ATTENTION, KEYS) for l in (LATE, MIDDLE)},
                has_cls=True, total_heads=4) as probe:
    ops[LATE](q, q * 2, q)
    ops[MIDDLE](q, q * 3, q)
probe.results()
print(reduced)
"""


def test_tower_probe_reduces_in_one_order_whatever_the_process():
    """Tensor-parallel ranks are separate processes, whose set orders differ (salted string
    hashes); their all-reduces of head averages must still pair up."""
    orders = {subprocess.run([sys.executable, "-c", TP_ORDER], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
              for seed in range(4)}
    assert len(orders) == 1, orders


def test_attention_is_computed_only_for_pruned_images_of_methods_that_read_it():
    from vllm_tokenprune.serving.models.common import KEEP_FIELD, METHOD_FIELD, PROBE_KEEP_FIELD, PROBE_METHODS_FIELD
    from vllm_tokenprune.serving.models.model import PruningModelMixin

    def fields(*pairs, probe=()):
        return {METHOD_FIELD: [methods.method_id(m) for m, _ in pairs], KEEP_FIELD: [k for _, k in pairs],
                PROBE_METHODS_FIELD: [methods.method_mask(probe)] * len(pairs),
                PROBE_KEEP_FIELD: [1 if probe else 0] * len(pairs)}

    requested = PruningModelMixin._requested_probes
    assert requested(fields(("norm", 5), ("pool", 5), ("divprune", 5)), [10, 10, 10]) == set()
    assert requested(fields(("visionzip", 10), ("hiprune", 10)), [10, 10]) == set()  # K = N
    assert requested(fields(("norm", 5), ("visionzip", 5)), [10, 10]) == {Probe(ATTENTION, LATE), Probe(KEYS, LATE)}
    assert requested(fields(("cls_attention", 5), ("hiprune", 5)), [10, 10]) == {
        Probe(ATTENTION, LATE), Probe(GLOBAL_ATTENTION, LATE), Probe(GLOBAL_ATTENTION, MIDDLE)}
    # the memory profile's probe asks for what its methods read, at any K
    assert requested(fields(("norm", 10), probe=("norm", "visionzip")), [10]) == {
        Probe(ATTENTION, LATE), Probe(KEYS, LATE)}


# --- the statistics as vLLM's towers produce them ----------------------------------------

STOCK_ARCH = {f.name: f.stock for f in FAMILIES
              if f.name in ("llava", "gemma3", "gemma4", "internvl") or f.features == "qwen"}


def hf_eager(path):
    """transformers' model in fp32 with eager attention (the only one returning weights)."""
    import transformers
    from transformers import AutoConfig

    model_class = getattr(transformers, AutoConfig.from_pretrained(path).architectures[0])
    return model_class.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


# The tiny towers' probed layers (2 layers each): LLaVA's vision_feature_layer = -2 leaves one
# layer, both LATE and MIDDLE; Gemma 3 and InternVL use both, MIDDLE at round(2 x 9/24) - 1.
SQUARE_TOWER_LAYERS = {"llava": {LATE: 0, MIDDLE: 0}, "gemma3": {LATE: 1, MIDDLE: 0}, "internvl": {LATE: 1, MIDDLE: 0}}


@torch.no_grad()
def hf_square_tower_statistics(path, arch, pixels) -> list[dict[Probe, torch.Tensor]]:
    """Per crop, at the tokens the model's tower gives the methods: the [CLS] row (InternVL,
    LLaVA's CLIP) or the mean over queries (SigLIP) of transformers' attention weights, the
    mean over queries, and the keys. InternVL's per-patch statistics are averaged over the
    2 x 2 patches its pixel shuffle folds into a token."""
    tower = hf_eager(path).model.vision_tower
    out = tower(pixels, output_attentions=True, output_hidden_states=True)
    layers = tower.encoder.layers if arch != "internvl" else tower.encoder.layer
    has_cls = arch != "gemma3"
    per_layer = {}
    for name, index in SQUARE_TOWER_LAYERS[arch].items():
        layer = layers[index]
        if arch == "internvl":
            keys = layer.attention.k_proj(layer.layernorm_before(out.hidden_states[index]))
        else:
            keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[index]))
        keys = keys.reshape(*keys.shape[:2], tower.config.num_attention_heads, -1).mean(2)
        weights = out.attentions[index]
        mean = weights.mean(dim=(1, 2))
        found = {ATTENTION: weights[:, :, 0].mean(1) if has_cls else mean, GLOBAL_ATTENTION: mean, KEYS: keys}
        per_layer[name] = {stat: v[:, 1:] if has_cls else v for stat, v in found.items()}
    if arch == "internvl":
        from transformers.models.internvl.modeling_internvl import InternVLModel

        def folded(v):  # (B, patches[, d]) -> (B, tokens[, d]): the mean of each token's patches
            side = math.isqrt(v.shape[1])
            grid = v.reshape(len(v), side, side, -1)
            shuffled = InternVLModel.pixel_shuffle(None, grid, scale_factor=0.5)
            return shuffled.reshape(len(v), -1, 4, grid.shape[-1]).mean(2).reshape(len(v), -1, *v.shape[2:])

        per_layer = {name: {stat: folded(v) for stat, v in found.items()} for name, found in per_layer.items()}
    return [{probe: per_layer[probe.layer][probe.stat][b] for probe in ALL_PROBES} for b in range(len(pixels))]


@torch.no_grad()
def hf_qwen_statistics(path, arch, pixels, grid_thw, blocks: dict[str, int], monkeypatch):
    """Per image, per merged token in stock order: the mean over heads and queries of
    transformers' attention weights and the head-mean keys of the given blocks, each
    patch statistic averaged over the 2 x 2 patches of its merged token."""
    import importlib

    model = hf_eager(path)
    visual = model.model.visual
    module = importlib.import_module(type(visual).__module__)
    seen: dict[str, list] = {layer: [] for layer in blocks}
    eager = module.eager_attention_forward

    def recording(attn, query, key, *args, **kwargs):
        output, weights = eager(attn, query, key, *args, **kwargs)
        for layer, block in blocks.items():
            if attn is visual.blocks[block].attn:  # one call per image: (1, H, n, n)
                seen[layer].append((weights[0].mean(dim=(0, 1)), key[0].mean(0)))
        return output, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    visual(pixels, grid_thw=grid_thw)
    unit = visual.spatial_merge_size ** 2
    order = None
    if arch == "qwen2.5-vl":  # transformers runs the tower in window order too
        from transformers.vision_utils import get_vision_window_index

        order, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                           window_size=visual.window_size, patch_size=visual.patch_size,
                                           kwargs={})
    sizes = (grid_thw.prod(-1) // unit).tolist()
    per_layer = {}
    for layer, calls in seen.items():
        attention = torch.cat([a for a, _ in calls]).reshape(-1, unit).mean(1)
        keys = torch.cat([k for _, k in calls]).reshape(-1, unit, calls[0][1].shape[-1]).mean(1)
        if order is not None:
            attention, keys = attention[order.argsort()], keys[order.argsort()]
        per_layer[layer] = (attention.split(sizes), keys.split(sizes))
    return [{probe: per_layer[probe.layer][probe.stat == KEYS][i] for probe in ALL_PROBES}
            for i in range(len(sizes))]


@torch.no_grad()
def hf_gemma4_statistics(path, pixels, positions, monkeypatch):
    """Per image, per soft token: the mean over heads and real queries of transformers'
    attention weights to each real patch, and the head-mean keys (after norm and rotary), of
    the last layer (LATE) and the first (MIDDLE, round(2 x 9/24) - 1), each averaged over
    the patches transformers' pooler averages into the soft token."""
    import transformers.models.gemma4.modeling_gemma4 as module

    tower = hf_eager(path).model.vision_tower
    layers = {LATE: tower.encoder.layers[-1].self_attn, MIDDLE: tower.encoder.layers[0].self_attn}
    seen = {}
    eager = module.eager_attention_forward

    def recording(attn, query, key, *args, **kwargs):
        output, weights = eager(attn, query, key, *args, **kwargs)
        for layer, probed in layers.items():
            if attn is probed:
                seen[layer] = weights, key
        return output, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    tower(pixel_values=pixels, pixel_position_ids=positions)
    out = []
    for b, image_positions in enumerate(positions):
        real = (image_positions != -1).any(-1)
        length = int(real.sum()) // tower.config.pooling_kernel_size**2
        stats = {}
        for layer, (weights, key) in seen.items():
            attention = torch.zeros(len(real))
            attention[real] = weights[b][:, real][:, :, real].mean(dim=(0, 1))
            per_patch = {GLOBAL_ATTENTION: attention[:, None], KEYS: key[b].mean(0) * real[:, None]}
            for stat, v in per_patch.items():
                pooled, _ = tower.pooler._avg_pool_by_positions(
                    v[None], image_positions[None], len(real) // tower.config.pooling_kernel_size**2)
                stats[Probe(stat, layer)] = pooled[0, :length].squeeze(-1)
            stats[Probe(ATTENTION, layer)] = stats[Probe(GLOBAL_ATTENTION, layer)]  # no [CLS]
        out.append(stats)
    return out


# In the worker (sent by `LLM.apply_model`; results as lists, which survive the trip).

def _gemma4_statistics(pixels, positions, model):
    from vllm_tokenprune.serving.models.gemma4 import patch_grids

    image_input = {"pixel_values": pixels, "pixel_position_ids": positions}
    _, _, stats = model._probed_images(image_input, set(ALL_PROBES), patch_grids(positions))
    return [{tuple(p): v.tolist() for p, v in image.items()} for image in stats]


def _square_tower_statistics(pixels, model):
    _, stats = model._tower_features(pixels.to(next(model.vision_tower.parameters()).device), set(ALL_PROBES))
    return [{tuple(p): v.tolist() for p, v in image.items()} for image in stats]


def _qwen_statistics(pixels, grid, model):
    image_input = {"type": "pixel_values", "pixel_values": pixels, "image_grid_thw": grid}
    _, stats = model._visual_features(image_input, grid.tolist(), set(ALL_PROBES))
    return [{tuple(p): v.tolist() for p, v in image.items()} for image in stats]


def _probe_blocks(model):
    return model._probe_blocks()


@pytest.mark.vllm
@pytest.mark.parametrize("arch", list(STOCK_ARCH))
def test_tower_statistics_in_vllm_equal_transformers_attention(arch, tiny_checkpoint, monkeypatch):
    from transformers import AutoProcessor
    from vllm import LLM

    path = tiny_checkpoint(arch)
    images = [noise_image(336, 252, seed=1), noise_image(200, 300, seed=2)]
    image_processor = AutoProcessor.from_pretrained(path).image_processor
    processed = image_processor(images=images, return_tensors="pt")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends functions
    dtype = cpu_dtype(arch)
    llm = LLM(model=str(path), dtype=dtype, enforce_eager=True, max_model_len=2048, seed=0,
              hf_overrides={"architectures": [of_architectures([STOCK_ARCH[arch]]).pruned]})
    try:
        if arch == "gemma4":
            pixels, positions = processed["pixel_values"], processed["image_position_ids"]
            want = hf_gemma4_statistics(path, pixels, positions, monkeypatch)
            (got,) = llm.apply_model(functools.partial(_gemma4_statistics, pixels, positions))
        elif arch in SQUARE_TOWER_LAYERS:
            want = hf_square_tower_statistics(path, arch, processed["pixel_values"])
            (got,) = llm.apply_model(functools.partial(_square_tower_statistics, processed["pixel_values"]))
        else:
            pixels, grid = processed["pixel_values"], processed["image_grid_thw"]
            (blocks,) = llm.apply_model(_probe_blocks)
            want = hf_qwen_statistics(path, arch, pixels, grid, blocks, monkeypatch)
            # vLLM's Qwen towers rescale and normalise the pixels themselves (FusedMMInputNorm).
            raw = image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")
            (got,) = llm.apply_model(functools.partial(_qwen_statistics, raw["pixel_values"], grid))
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert len(got) == len(want) >= len(images)  # per image, or per crop / tile
    for image_got, image_want in zip(got, want):
        assert set(image_got) == {tuple(p) for p in ALL_PROBES}
        for probe in ALL_PROBES:
            expected = image_want[probe]
            # a bf16 tower (Qwen3.5 on CPU) against transformers' fp32: within 2% of the statistic's range
            atol = 1e-5 if dtype == "float32" else 0.02 * float(expected.abs().max())
            assert torch.allclose(torch.tensor(image_got[tuple(probe)]), expected, atol=atol), probe


# --- EVS -----------------------------------------------------------------------------------

def _clip(frames: int, rows: int, cols: int, dtype=torch.float32, seed: int = 0) -> Tokens:
    gen = torch.Generator().manual_seed(seed)
    return Tokens(torch.randn(frames * rows * cols, 16, generator=gen).to(dtype), ((rows, cols),) * frames, seed=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evs_keeps_the_tokens_vllms_own_evs_keeps(dtype):
    """The peer check: vLLM's EVS (--video-pruning-rate q) and ours at ratio 1 - q keep the same
    tokens, and K, wherever N (1 - q) is whole (vLLM floors it, keep_count rounds it)."""
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count, compute_retention_mask

    for frames, rows, cols, q in [(4, 3, 4, 0.75), (8, 2, 3, 0.5), (5, 4, 4, 0.9), (6, 2, 2, 0.25), (3, 5, 2, 0.8)]:
        clip = _clip(frames, rows, cols, dtype, seed=frames)
        n, frame = len(clip), rows * cols
        k = video_keep_count(n, frame, 1 - q, first_frame_whole=True)
        assert k == compute_retained_tokens_count(frame, frames, q), (frames, rows, cols, q)
        # vLLM's takes the unmerged grid (its spatial merge size 2)
        mask = compute_retention_mask(clip.features, (frames, 2 * rows, 2 * cols), 2, q)
        assert torch.equal(methods.select("evs", clip, k).index, mask.nonzero().squeeze(1)), (frames, q)


def test_evs_keeps_the_first_frame_and_then_what_moves():
    """A still clip in which two places change: after the first frame, those are kept."""
    still = torch.randn(1, 12, 16).expand(5, 12, 16).clone()
    still[2:, 7] += 3.0  # from frame 2 on: frame 2 differs from frame 1 there
    still[4, 1] = -still[4, 1]  # in the last frame only
    clip = Tokens(still.reshape(60, 16), ((3, 4),) * 5, seed=0)
    rows = methods.select("evs", clip, 12 + 2)
    assert rows.index.tolist() == list(range(12)) + [2 * 12 + 7, 4 * 12 + 1]


def test_evs_keeps_each_frames_share_where_the_frames_sit_apart():
    """Qwen3-VL's prompt fixes each frame's run: the first frame whole, the others their even
    share, each its own most changed tokens."""
    from vllm_tokenprune.policy import frame_shares
    from vllm_tokenprune.selection.methods.evs import dissimilarity

    clip = _clip(4, 3, 4, seed=9)
    clip.frames_apart = True
    score = dissimilarity(clip).reshape(4, 12)
    for k in (12, 13, 20, 47):
        index = methods.select("evs", clip, k).index
        shares = frame_shares(k, [12] * 4, first_frame_whole=True)
        assert [int((index // 12 == f).sum()) for f in range(4)] == shares, k
        for f, share in enumerate(shares):
            chosen = set((index[index // 12 == f] % 12).tolist())
            assert chosen == set(score[f].argsort(descending=True, stable=True)[:share].tolist()), (k, f)
