"""Train the question-reading selector (``learned_query``) by distilling where the served
model itself looks when asked.

    vllm-tokenprune train-query MODEL --selector SEL.safetensors --data items.jsonl [--data ...] [--out OUT]

The image-only selector (``train``) learns what can be rebuilt from what; it cannot know
what a question needs. The model does: at keep 1.0, the attention its language model pays
to each image token while it reads the question and writes the answer (the positions after
the image, the answer teacher-forced when the items have one) is a question-conditioned
relevance map. Each head's attention to a token is weighted by how much that token's value
moves the head's output, ||W_O^h W_V^h x_j|| (Kobayashi et al., "Attention is Not Only a
Weight", EMNLP 2020), and summed over heads and layers: a head that attends but writes
little into the residual stream (an attention sink, or capacity a model has yet to use)
teaches nothing. The selector, given the image's features
and the question's word embeddings (the same ones the server hands it,
``policy.question_tokens``), learns to predict that map: its softmax over the image's
tokens is fitted to the attention by cross-entropy. It needs images and questions,
answers if there are any, no labels, and starts from the checkpoint's image-only
selector, whose weights and feature statistics it shares.

Held-out items measure what serving cares about: the share of the model's attention that
the top K tokens hold at the keep ratio asked (``--keep-ratio``), for the trained
selector, for the image-only one and for the attention itself (the bound). The result is
written into the selector checkpoint as its question-reading section; the rest of the
checkpoint is kept as it is.

Families: LLaVA-1.5 and the Qwen families (images at their own resolutions, so token
counts vary and batches are padded), whose placeholder runs hold an image's candidate
tokens one to one. The teacher holds every item's features, question and map in memory: this is a recipe
for thousands of questions, not for streaming millions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from vllm_tokenprune.policy import QUESTION_TOKENS, keep_count, markup_ids, question_tokens
from vllm_tokenprune.selection.budget import PREFIX as BUDGET_PREFIX
from vllm_tokenprune.selection.budget import SECTION as BUDGET_SECTION
from vllm_tokenprune.selection.budget import section as budget_section
from vllm_tokenprune.selection.selector import (
    ATTENTION_SECTION,
    QUERY_PREFIX,
    QUERY_SECTION,
    SelectorConfig,
    SelectorMismatchError,
    TokenSelector,
    check_compatible,
    load_selector,
    query_section,
)
from vllm_tokenprune.training.budget import above_even_share, format_budget_report, thumbnails, train_share_budget
from vllm_tokenprune.training.options import add_options, from_args, opt, warmup_cosine
from vllm_tokenprune.training.reconstruction import replace_section


@dataclass
class QueryConfig:
    steps: int = opt(1000, "optimizer steps")
    batch_size: int = opt(32, "questions per step")
    lr: float = opt(1e-3, "peak learning rate (warmup, then cosine decay)")
    warmup_steps: int = opt(50, "learning-rate warmup steps")
    heldout: float = opt(0.1, "share of the items held out for evaluation")
    keep_ratio: float = opt(0.1, "keep ratio at which held-out items are scored")
    eval_every: int = opt(250, "evaluate the held-out items every N steps (0: at the end only)")
    seed: int = opt(0, "seed of the split and of the batches")
    threads: int = opt(1, "CPU threads (0: torch's default)")
    budget_steps: int = opt(2000, "with --image-only or --budget-only: steps fitting the budget predictor of keep "
                                  "ratio auto (0: none)")
    budget_margin: float = opt(0.2, "auto: an image keeps (1 + margin) times the tokens its selector rates above "
                                    "an even share, plus --budget-extra")
    budget_extra: float = opt(4.0, "auto: tokens added to every image's count (room for the predictor's error)")


@dataclass
class Questions:
    """Every item as the selector and its teacher see it (N_i varies on Qwen)."""

    features: list[torch.Tensor]  # M x (N_i, D): tower features, what the selector scores
    questions: list[torch.Tensor]  # M x (Q_i, H): the question's word embeddings
    attention: list[torch.Tensor]  # M x (N_i,): the model's attention to each image token, sums to 1
    images: list[Path]  # M: each item's image file

    def take(self, index) -> Questions:
        return Questions(*([part[int(i)] for i in index]
                           for part in (self.features, self.questions, self.attention, self.images)))


def read_items(path: Path) -> list[tuple[Path, str, str | None]]:
    """(image path, question, answer or None) of each line of an items file
    (``make-eval-set``'s format; answers are optional)."""
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                raw = json.loads(line)
                answer = None if raw.get("answer") is None else str(raw["answer"])
                items.append((path.parent / raw["image"], str(raw["question"]), answer))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: need a JSON object with image and question ({err})") from None
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def moved(layer, hidden: torch.Tensor) -> torch.Tensor:
    """(heads, T): the norm of what each head would write from each of the T tokens whose
    layer inputs are ``hidden`` (T, D), W_O^h W_V^h of the normed input (a Llama or Qwen2
    decoder layer; the value projection's bias included)."""
    attn = layer.self_attn
    values = attn.v_proj(layer.input_layernorm(hidden)).unflatten(-1, (-1, attn.head_dim))  # (T, kv, d)
    values = values.repeat_interleave(attn.num_key_value_groups, dim=1)  # (T, heads, d)
    out_proj = attn.o_proj.weight.unflatten(1, (-1, attn.head_dim))  # (D, heads, d)
    return torch.einsum("thd,ehd->the", values, out_proj).norm(dim=-1).T


@torch.inference_mode()
def teach(model_dir: str, items: list[tuple[Path, str, str | None]], *, progress: bool = True) -> Questions:
    """Run the model on every (image, question, answer): the tower features the selector
    scores (as ``train`` reads them), the question's word embeddings, and the language
    model's attention to the image tokens from every position after the image that
    predicts a token: the question's, and the answer's, teacher-forced, when there is one
    (reading a string, the model looks at it while it writes it, more than while it reads
    the question)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from vllm_tokenprune.families import FAMILIES, of_model_type
    from vllm_tokenprune.training.features import load_tower

    config = AutoConfig.from_pretrained(model_dir)
    family = of_model_type(config.model_type)
    if not family.query_teacher:
        teachers = ", ".join(f.name for f in FAMILIES if f.query_teacher)
        raise ValueError(f"train-query trains on {teachers}, whose placeholders hold an image's candidate "
                         f"tokens one to one; {model_dir} is {config.model_type!r}")
    placeholder = getattr(config, "image_token_index", None)
    placeholder = config.image_token_id if placeholder is None else placeholder
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    tower = load_tower(model_dir)
    markup = markup_ids(processor.tokenizer)
    table = model.get_input_embeddings()
    decoder = model.model.language_model
    taught = Questions([], [], [], [])
    for image_path, question, answer in tqdm(items, desc="teacher", unit="q", disable=not progress):
        image = Image.open(image_path).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        text = prompt if answer is None else processor.apply_chat_template(
            [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}])
        inputs = processor(images=[image], text=text, return_tensors="pt")
        ids = inputs["input_ids"][0]
        placeholders = (ids == placeholder).nonzero().flatten()
        # Rows that predict a token: through the prompt's last, or the answer's last but one.
        reading = torch.arange(int(placeholders[-1]) + 1, len(ids) - (answer is not None))
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
        # per layer (1, heads, queries, keys) -> the reading rows' attention to the image, per head
        looked = sum((a[0][:, reading][:, :, placeholders].mean(dim=1) * moved(layer, hidden[0, placeholders])).sum(0)
                     for a, layer, hidden in zip(out.attentions, decoder.layers, out.hidden_states))
        features = tower([image]).tokens
        if len(features) != len(looked):
            raise RuntimeError(f"{image_path}: {len(looked)} placeholders for {len(features)} tower tokens")
        taught.features.append(features)
        taught.attention.append(looked / looked.sum())
        taught.images.append(image_path)
        words = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        taught.questions.append(table(torch.tensor(question_tokens(words, markup))))
    return taught


def recall(scores: torch.Tensor, attention: torch.Tensor, padding: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B,) the share of each item's attention that its top K scores hold, K its own
    ``keep_count`` at ``ratio``; ``padding`` (B, N) marks tokens past an item's N."""
    counts = (~padding).sum(dim=1).tolist()
    return torch.stack([a.gather(0, s.topk(keep_count(n, ratio)).indices).sum()
                        for s, a, n in zip(scores, attention, counts)])


def _padded(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length rows -> (B, L, ...) zero-padded, and the (B, L) padding mask."""
    padding = pad_sequence([torch.zeros(len(p), dtype=torch.bool) for p in parts], batch_first=True,
                           padding_value=True)
    return pad_sequence(parts, batch_first=True), padding


def _batch(data: Questions, index) -> tuple[torch.Tensor, ...]:
    """features, their padding, questions, their padding, attention (zero at padding)."""
    part = data.take(index)
    features, padding = _padded(part.features)
    questions, question_padding = _padded(part.questions)
    return features, padding, questions, question_padding, _padded(part.attention)[0]


def _scores(selector: TokenSelector, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    features, padding, questions, question_padding, _ = batch
    if not selector.config.query_dim:  # an image-only selector
        questions = question_padding = None
    return selector.scores(features, padding, questions, question_padding)


@torch.no_grad()
def evaluate(selector: TokenSelector, data: Questions, ratio: float, *, batch_size: int = 64) -> float:
    """Mean held-out attention share of the top K at ``ratio``."""
    selector.eval()
    shares = []
    for start in range(0, len(data.features), batch_size):
        batch = _batch(data, range(start, min(start + batch_size, len(data.features))))
        shares.append(recall(_scores(selector, batch), batch[4], batch[1], ratio))
    return float(torch.cat(shares).mean())


def train_reader(image_selector: TokenSelector, train: Questions, held: Questions, cfg: QueryConfig,
                 *, image_only: bool = False, progress: bool = True) -> tuple[TokenSelector, dict]:
    """The question-reading selector, started from ``image_selector``, and its history; with
    ``image_only``, an image-only selector fitted to the same maps (their mean over the
    questions an image may be asked), in place of the reconstruction objective."""
    torch.manual_seed(cfg.seed)
    query_dim = 0 if image_only else train.questions[0].shape[1]
    reader = TokenSelector(SelectorConfig(**{**asdict(image_selector.config), "query_dim": query_dim}))
    missing, unexpected = reader.load_state_dict(image_selector.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("query_") for name in missing), (missing, unexpected)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=cfg.lr, weight_decay=0.01)
    start_share = evaluate(image_selector, held, cfg.keep_ratio)
    bound = float(torch.stack([a.topk(keep_count(len(a), cfg.keep_ratio)).values.sum() for a in held.attention]).mean())
    history = [{"step": 0, "heldout_recall": evaluate(reader, held, cfg.keep_ratio)}]
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train-query", unit="step", disable=not progress)
    for step in bar:
        reader.train()
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        batch = _batch(train, torch.randint(len(train.features), (cfg.batch_size,), generator=gen).tolist())
        log_p = torch.log_softmax(_scores(reader, batch), dim=1).masked_fill(batch[1], 0.0)  # -inf at padding
        loss = -(batch[4] * log_p).sum(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            history.append({"step": step + 1, "loss": round(loss.item(), 5),
                            "heldout_recall": round(evaluate(reader, held, cfg.keep_ratio), 5)})
            bar.write(f"step {step + 1}: loss {loss.item():.4f}, held-out attention kept at keep {cfg.keep_ratio}: "
                      f"{history[-1]['heldout_recall']:.3f} (the selector it started from {start_share:.3f}, "
                      f"bound {bound:.3f})")
    tokens = [len(f) for f in train.features]
    info = {"keep_ratio": cfg.keep_ratio, "image_tokens": [min(tokens), max(tokens)],
            "heldout_items": len(held.features), "train_items": len(train.features),
            "train_seconds": round(time.perf_counter() - start, 1),
            "heldout_recall": {"trained": history[-1]["heldout_recall"], "start": round(start_share, 5),
                               "attention": round(bound, 5)},
            "history": history, "training_config": asdict(cfg)}
    return reader.eval(), info


Images = dict[Path, torch.Tensor]  # distinct images: each one's tower features (N_i, D)


def distinct_images(data: Questions) -> Images:
    """The items' images, each once."""
    return dict(zip(data.images, data.features))


@torch.no_grad()
def image_counts(selector: TokenSelector, images: Images, *, batch_size: int = 64
                 ) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    """Per image: its path, its token count N and how many of its tokens ``selector``
    rates above an even share (``above_even_share``)."""
    paths, features = list(images), list(images.values())
    selector.eval()
    counts = [torch.zeros(0, dtype=torch.long)]
    for start in range(0, len(features), batch_size):
        batch, padding = _padded(features[start:start + batch_size])
        counts.append(above_even_share(selector.scores(batch, padding), padding))
    return paths, torch.tensor([len(f) for f in features]), torch.cat(counts)


def fit_budget(selector: TokenSelector, train: Images, held: Images, cfg: QueryConfig):
    """The budget predictor's checkpoint section for an image-only selector fitted to the
    model's attention (``training.budget``: the tokens it rates above an even share),
    fitted on the training items' images and reported on the held-out ones (those that
    are not also training images)."""
    paths, lengths, counts = image_counts(selector, train)
    held_paths, held_lengths, held_counts = image_counts(selector, {p: f for p, f in held.items() if p not in train})
    predictor, report = train_share_budget(
        (thumbnails(paths), lengths, counts),
        (thumbnails(held_paths), held_lengths, held_counts) if held_paths else None,
        margin=cfg.budget_margin, extra=cfg.budget_extra, steps=cfg.budget_steps, seed=cfg.seed)
    print(format_budget_report(report))
    return budget_section(predictor, report)


def tower_features(model_dir: str, paths: list[Path]) -> Images:
    """``--budget-only``: the tower features of each image, without the teacher's pass
    through the language model (the count needs the selector's scores only)."""
    from vllm_tokenprune.training.features import load_tower

    tower = load_tower(model_dir)
    with torch.inference_mode():
        return {path: tower([Image.open(path).convert("RGB")]).tokens for path in dict.fromkeys(paths)}


def split_index(n: int, heldout: float, seed: int) -> tuple[list[int], list[int]]:
    """Training and held-out item indices."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = max(1, math.floor(n * heldout))
    return order[n_held:], order[:n_held]


def split(data: Questions, heldout: float, seed: int) -> tuple[Questions, Questions]:
    train, held = split_index(len(data.features), heldout, seed)
    return data.take(train), data.take(held)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the served checkpoint (a directory or hub id)")
    parser.add_argument("--selector", type=Path, required=True,
                        help="the checkpoint's image-only selector (`vllm-tokenprune train`), the starting point")
    parser.add_argument("--data", type=Path, required=True, action="append",
                        help="items.jsonl: {\"image\": path, \"question\": ..., \"answer\": optional} per line "
                             "(make-eval-set writes them); repeat for several files")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the checkpoint with its question-reading section (default: --selector)")
    parser.add_argument("--image-only", action="store_true",
                        help="instead, fit the image-only selector (the one `learned` serves) to the model's "
                             "attention, in place of its reconstruction training, and its budget predictor "
                             "(keep ratio auto) to what it then rates above an even share")
    parser.add_argument("--budget-only", action="store_true",
                        help="refit only the budget predictor of a selector fitted with --image-only (another "
                             "--budget-margin or --budget-extra); the selector stays")
    add_options(parser, QueryConfig)


def run(args: argparse.Namespace) -> int:
    cfg = from_args(QueryConfig, args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    image_selector, meta = load_selector(args.selector)
    out = args.out or args.selector
    items = [item for path in args.data for item in read_items(path)]
    if args.budget_only:
        return _refit_budget(args, cfg, image_selector, meta, items, out)
    train, held = split(teach(args.model, items), cfg.heldout, cfg.seed)
    reader, info = train_reader(image_selector, train, held, cfg, image_only=args.image_only)
    info = {**info, "question_tokens": QUESTION_TOKENS, "data": [str(path) for path in args.data]}
    if args.image_only:  # the learned method's selector, its training recorded beside the reconstruction's
        replace_section(args.selector, ATTENTION_SECTION, "selector.",
                        (info, {"selector." + k: v.contiguous() for k, v in reader.state_dict().items()}), out)
        if cfg.budget_steps:  # the predictor fitted to the selector it replaced no longer fits
            replace_section(out, BUDGET_SECTION, BUDGET_PREFIX,
                            fit_budget(reader, distinct_images(train), distinct_images(held), cfg))
    else:
        replace_section(args.selector, QUERY_SECTION, QUERY_PREFIX, query_section(reader, info), out)
    shares = info["heldout_recall"]
    print(f"wrote {out}: held-out attention kept at keep {cfg.keep_ratio}: "
          f"{'learned' if args.image_only else 'learned_query'} {shares['trained']:.3f} (from {shares['start']:.3f}), "
          f"the attention itself {shares['attention']:.3f}")
    return 0


def _refit_budget(args: argparse.Namespace, cfg: QueryConfig, selector: TokenSelector, meta: dict, items, out) -> int:
    """``--budget-only``: the budget predictor of a selector fitted with ``--image-only``
    refitted on the same split of the items' images; the rest of the checkpoint stays."""
    from transformers import AutoConfig

    if ATTENTION_SECTION not in meta:
        print(f"error: {args.selector}: --budget-only refits the predictor of a selector fitted with --image-only; "
              f"a reconstruction-trained one is refitted by `vllm-tokenprune train --budget-only`", file=sys.stderr)
        return 2
    try:
        check_compatible(meta, AutoConfig.from_pretrained(args.model))
    except SelectorMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    features = tower_features(args.model, [path for path, _, _ in items])

    def images(index: list[int]) -> Images:
        return {items[i][0]: features[items[i][0]] for i in index}

    section = fit_budget(selector, *map(images, split_index(len(items), cfg.heldout, cfg.seed)), cfg)
    replace_section(args.selector, BUDGET_SECTION, BUDGET_PREFIX, section, out)
    print(f"wrote {out} (budget predictor refitted)")
    return 0
