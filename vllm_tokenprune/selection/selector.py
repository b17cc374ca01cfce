"""The learned token selector, as the server runs it, and its checkpoint.

Method: "When Less is Enough: Adaptive Token Reduction for Efficient Image Representation"
(arXiv 2503.16660). A small Transformer scores every image token coming out of the vision
tower (``TokenSelector.scores``); the ``learned`` method keeps the K best
(``methods.scores``), K from ``policy.keep_count``. Training (the Gumbel-Softmax
keep mask, the reconstructor, the loss, checkpoint writing) is in ``training``.

The selector has no position encoding of its own: the tower's features already carry
position, and without one it scores any token count (other resolutions, crops, Qwen's
variable grids) with the same weights. Training batches images of several sizes with a
padding mask that attention ignores, so an image's scores do not depend on its batch.

A selector may also read the request's question (``SelectorConfig.query_dim``): its
word embeddings, projected to the selector's width and marked as question, join the image
tokens in the Transformer, so that every image token's score can depend on what is asked.
Such a selector ships as its own section of the checkpoint (``QUERY_SECTION``) and serves
the ``learned_query`` method; ``learned`` keeps the paper's image-only selector.

Checkpoints are safetensors only; their JSON metadata header holds everything needed to
rebuild the selector and to check at start-up that it fits the served model
(``check_compatible``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

FORMAT = "vllm_tokenprune.selector"  # written into every checkpoint: independent of the code layout
FORMAT_VERSION = 1
# What the writer of a checkpoint (training.reconstruction.save_selector) must record.
REQUIRED_METADATA = ("source_model", "feature_layer", "vision_signature")
RESERVED = ("format", "format_version", "selector_config", "reconstructor_config", "feature_dim",
            "budget_predictor", "query_selector")
# The question-reading selector's section: header key, its tensors' prefix, its version.
QUERY_SECTION = "query_selector"
QUERY_PREFIX = "query_selector."
QUERY_SECTION_VERSION = 1
# The header key recording that the image-only selector was refitted to the model's
# attention (``train-query --image-only``); its budget predictor then has that target.
ATTENTION_SECTION = "attention_training"
DROP, KEEP = 0, 1  # index of each logit in the head's output


class SelectorCheckpointError(ValueError):
    """The file is not a usable selector checkpoint (not safetensors, or not ours)."""


class SelectorMismatchError(ValueError):
    """The selector was trained on features other than the ones this model produces."""


# ---------------------------------------------------------------------------------------
# Models


@dataclass
class SelectorConfig:
    feature_dim: int  # D of the vision features the selector scores
    width: int | None = None  # None -> min(256, feature_dim): slim keeps it ~1% of a CLIP-L tower
    num_layers: int = 3  # Transformer encoder layers (the paper uses 3)
    num_heads: int | None = None  # None -> max(1, width // 64)
    mlp_ratio: float = 4.0  # feed-forward width = mlp_ratio * width
    dropout: float = 0.0
    query_dim: int = 0  # > 0: also reads a question, embeddings of this width (the LM's); 0: images only

    def __post_init__(self):
        resolve_width_and_heads(self)


def resolve_width_and_heads(config) -> None:
    if config.width is None:
        config.width = min(256, config.feature_dim)
    if config.num_heads is None:
        config.num_heads = max(1, config.width // 64)
    if config.width % config.num_heads:
        raise ValueError(f"width {config.width} is not divisible by num_heads {config.num_heads}")


def encoder_stack(width: int, num_layers: int, num_heads: int, mlp_ratio: float, dropout: float) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        width, num_heads, dim_feedforward=int(width * mlp_ratio), dropout=dropout,
        activation="gelu", batch_first=True, norm_first=True,
    )
    return nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)


class TokenSelector(nn.Module):
    """Scores image tokens: Linear(D -> width), Transformer layers, a keep/drop head.

    Features are standardized per dimension with buffers set from the training set
    (``set_normalization``), so they travel with the checkpoint.
    """

    def __init__(self, config: SelectorConfig):
        super().__init__()
        self.config = config
        d, w = config.feature_dim, config.width
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_std", torch.ones(d))
        self.proj = nn.Linear(d, w)
        self.encoder = encoder_stack(w, config.num_layers, config.num_heads, config.mlp_ratio, config.dropout)
        self.head = nn.Linear(w, 2)
        if config.query_dim:
            # Word embeddings live on another scale than the standardized features: normed first.
            self.query_norm = nn.LayerNorm(config.query_dim)
            self.query_proj = nn.Linear(config.query_dim, w)
            self.query_type = nn.Parameter(torch.zeros(w))  # tells question tokens from image tokens

    @torch.no_grad()
    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp(min=eps))

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.config.feature_dim:
            raise ValueError(
                f"selector expects features of dim {self.config.feature_dim}, got shape {tuple(features.shape)}"
            )
        x = features.to(self.feature_mean.dtype)
        return (x - self.feature_mean) / self.feature_std

    def forward(self, features: torch.Tensor, padding: torch.Tensor | None = None,
                query: torch.Tensor | None = None, query_padding: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, N, D) -> logits (B, N, 2), [..., DROP] and [..., KEEP].

        ``padding`` (B, N), True at tokens that pad an image of fewer than N (a training
        batch of images of several sizes): no token attends to them. ``query`` (B, Q,
        query_dim), the question's embeddings, with ``query_padding`` (B, Q) likewise;
        Q = 0 or None: no question.
        """
        x = self.proj(self.normalize(features))
        asked = 0
        if query is not None and query.shape[1]:
            if not self.config.query_dim:
                raise ValueError("this selector reads no question (its query_dim is 0)")
            q = self.query_proj(self.query_norm(query.to(self.query_proj.weight.dtype))) + self.query_type
            asked = q.shape[1]
            x = torch.cat([q, x], dim=1)
            if padding is not None or query_padding is not None:
                none = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
                padding = torch.cat([none[:, :asked] if query_padding is None else query_padding,
                                     none[:, asked:] if padding is None else padding], dim=1)
        return self.head(self.encoder(x, src_key_padding_mask=padding)[:, asked:])

    def scores(self, features: torch.Tensor, padding: torch.Tensor | None = None,
               query: torch.Tensor | None = None, query_padding: torch.Tensor | None = None) -> torch.Tensor:
        """Keep logit minus drop logit, float32: (B, N, D) -> (B, N), (N, D) -> (N,) (then
        ``query`` is (Q, query_dim)); -inf at ``padding``, so that top-K never picks it."""
        single = features.dim() == 2
        if single:
            features, query = features.unsqueeze(0), None if query is None else query.unsqueeze(0)
        logits = self(features, padding, query, query_padding)
        scores = (logits[..., KEEP] - logits[..., DROP]).float()
        if padding is not None:
            scores = scores.masked_fill(padding, float("-inf"))
        return scores[0] if single else scores


# ---------------------------------------------------------------------------------------
# Checkpoints


def read_checkpoint(path: str | Path, map_location) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"selector checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise SelectorCheckpointError(
            f"{path} is not a safetensors file ({e}); selector checkpoints are written by "
            "`vllm-tokenprune train` (pickled torch files are not accepted)"
        ) from e
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        meta = {}
    if meta.get("format") != FORMAT:
        raise SelectorCheckpointError(
            f"{path} is a safetensors file but not a vllm_tokenprune selector checkpoint "
            f"(its metadata header lacks format={FORMAT!r}; found keys {sorted(raw)})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise SelectorCheckpointError(
            f"{path} has selector format version {meta.get('format_version')!r}; this code reads {FORMAT_VERSION}"
        )
    missing = [k for k in ("selector_config", "feature_dim", *REQUIRED_METADATA) if k not in meta]
    if missing:
        raise SelectorCheckpointError(f"{path} lacks required metadata {missing}")
    return tensors, meta


@contextlib.contextmanager
def float32_on_cpu():
    """Build modules in float32 on the CPU, whatever the defaults. vLLM builds the model under
    its dtype (bf16 / fp16) and device: a checkpoint's selector and budget predictor keep the
    precision they were trained in (the model moves the selector to its device)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)


def _rebuild(path, config: dict, tensors: dict[str, torch.Tensor], prefix: str, what: str) -> TokenSelector:
    try:
        with float32_on_cpu():
            selector = TokenSelector(SelectorConfig(**config))
        selector.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)},
                                 strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SelectorCheckpointError(f"{path}: cannot rebuild the {what} from the checkpoint: {e}") from e
    return selector.eval()


def load_selector(path: str | Path, *, map_location="cpu") -> tuple[TokenSelector, dict[str, Any]]:
    """Rebuild the selector (in eval mode) from nothing but the file; returns (selector, metadata)."""
    tensors, meta = read_checkpoint(path, map_location)
    return _rebuild(path, meta["selector_config"], tensors, "selector.", "selector"), meta


def section_header(path, meta: dict[str, Any], name: str, version: int, what: str) -> dict[str, Any] | None:
    """The header of a checkpoint's optional section ``name`` (None if it has none), checked
    to be of the ``version`` this code reads."""
    header = meta.get(name)
    if header is not None and (not isinstance(header, dict) or header.get("format_version") != version):
        found = header.get("format_version") if isinstance(header, dict) else header
        raise SelectorCheckpointError(f"{path}: {what} format version {found!r}; this code reads {version}")
    return header


def query_section(selector: TokenSelector, info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checkpoint header section and tensors of a question-reading selector; ``info``
    (JSON) says how it was trained (``training.query``)."""
    header = {"format_version": QUERY_SECTION_VERSION, "config": asdict(selector.config), **info}
    return header, {QUERY_PREFIX + k: v.detach().cpu().contiguous() for k, v in selector.state_dict().items()}


def load_query_selector(path: str | Path, *, map_location="cpu") -> tuple[TokenSelector, dict[str, Any]] | None:
    """The question-reading selector of a checkpoint (eval mode) and its header section, or
    None when it has none. Raises SelectorCheckpointError for a damaged one."""
    tensors, meta = read_checkpoint(path, map_location)
    header = section_header(path, meta, QUERY_SECTION, QUERY_SECTION_VERSION, "question-reading selector")
    if header is None:
        return None
    selector = _rebuild(path, header.get("config", {}), tensors, QUERY_PREFIX, "question-reading selector")
    if not selector.config.query_dim:
        raise SelectorCheckpointError(f"{path}: the question-reading selector reads no question (query_dim 0)")
    return selector, header


# ---------------------------------------------------------------------------------------
# Compatibility with the served model


def vision_signature(hf_config) -> dict[str, Any]:
    """The facts about a VLM config that determine the features the selector sees.

    Works on transformers' LLaVA / LLaVA-NeXT / LLaVA-OneVision / Gemma 3 / Gemma 4 / InternVL / Qwen-VL
    configs (and vLLM's hf_config, the same objects). For the Qwen families the selector scores the
    merged tokens after the patch merger, so feature_dim is the merger's output width:
    ``out_hidden_size``, or on Qwen2-VL, which has none, the vision ``hidden_size`` (its
    tower's own width is ``embed_dim``).
    """
    vc = hf_config.vision_config
    layer = getattr(hf_config, "vision_feature_layer", None)
    out_hidden = getattr(vc, "out_hidden_size", None)
    downsample = getattr(hf_config, "downsample_ratio", None)
    if out_hidden is not None:
        feature_dim = out_hidden
    elif isinstance(layer, (list, tuple)):  # LLaVA concatenates the listed layers
        feature_dim = vc.hidden_size * len(layer)
    elif downsample is not None:  # InternVL's pixel shuffle folds 1 / ratio^2 patches into a token
        feature_dim = vc.hidden_size * round(1 / downsample) ** 2
    else:
        feature_dim = vc.hidden_size
    num_layers = getattr(vc, "num_hidden_layers", None)
    signature = {
        "model_type": hf_config.model_type,
        "vision_model_type": vc.model_type,
        "vision_hidden_size": vc.hidden_size,
        "feature_dim": feature_dim,
        "patch_size": getattr(vc, "patch_size", None),
        "image_size": getattr(vc, "image_size", None),
        "num_vision_layers": num_layers if num_layers is not None else getattr(vc, "depth", None),
        "vision_feature_layer": layer,
        "vision_feature_select_strategy": getattr(hf_config, "vision_feature_select_strategy", None),
        "spatial_merge_size": getattr(vc, "spatial_merge_size", None),
        "mm_tokens_per_image": getattr(hf_config, "mm_tokens_per_image", None),  # Gemma 3's pooling
        "downsample_ratio": downsample,
    }
    # Through JSON so tuples become lists and compare equal to a loaded checkpoint's.
    return json.loads(json.dumps(signature))


def check_compatible(metadata: dict[str, Any], hf_config) -> None:
    """Raise SelectorMismatchError listing every field where the served model differs."""
    expected = metadata["vision_signature"]
    found = vision_signature(hf_config)
    problems = [
        f"{key}: expected {expected.get(key)!r}, found {found.get(key)!r}"
        for key in sorted(set(expected) | set(found))
        if expected.get(key) != found.get(key)
    ]
    if metadata.get("feature_dim") != found["feature_dim"]:
        problems.append(f"selector input dim: expected {metadata.get('feature_dim')!r}, found {found['feature_dim']!r}")
    if problems:
        served = getattr(hf_config, "name_or_path", "") or found["model_type"]
        raise SelectorMismatchError(
            f"the selector was trained for {metadata.get('source_model')!r} and does not fit the served "
            f"model {served!r}: " + "; ".join(problems)
        )


def check_question_width(reader: TokenSelector, hf_config) -> None:
    """A question-reading selector reads word embeddings as wide as the served language
    model's; raise SelectorMismatchError otherwise."""
    hidden = hf_config.get_text_config().hidden_size
    if reader.config.query_dim != hidden:
        raise SelectorMismatchError(f"its question-reading selector reads questions of width "
                                    f"{reader.config.query_dim}, and this model embeds words at {hidden}")
