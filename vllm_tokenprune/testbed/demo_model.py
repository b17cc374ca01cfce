"""A small LLaVA-1.5 trained here, from scratch, on both testbed tasks; and its selector.

    vllm-tokenprune train-demo --out DIR

No real VLM can be downloaded here, so this is the model that shows pruning keeping what
matters: a CLIP-style tower, a projector and a small Llama, with a word-level tokenizer
and LLaVA-1.5's chat template, written in the hub layout that transformers and vLLM load
(``DIR/model``). It answers the questions of every ``testbed.tasks`` variant: how many
shapes, which colour appears the most (the shapes task), the colour of the one shape of a
kind and the three digits in the box (the clutter task). Then its selector (and budget
predictor) is trained with ``vllm-tokenprune train`` on textured training scenes
(``DIR/selector.safetensors``).
The package ships this recipe's model in ``vllm_tokenprune/testbed/demo/``, trained on in
several runs (``--continue-from``; its ``training.json`` records each run's settings) and with
its selector fitted to the model's attention (``vllm-tokenprune train-query``); that is what
``vllm-tokenprune serve`` with no MODEL serves. docs/quality.md has the commands and times.

Token dropout: a model trained on full token sets only answers from how many tokens look
coloured and breaks under any pruning (docs/quality.md). So most samples keep every
content patch (any shape pixel) plus a random number of the other tokens, in order, like
a pruned request; the rest keep all tokens. The other tokens fade in over the first
steps (``curriculum_steps``): started cold on the full mix, counting stayed at chance for
4000 steps; with the fade-in the shapes task is learned in about 1500.

Patch labels (``aux_loss``): a linear head on the image tokens learns each patch's shape
kind and whether it holds a shape's centre, from the scene's construction; answers alone
left the tower unable to tell the kinds apart (docs/quality.md). ``--continue-from DIR``
trains a saved model further.

Deterministic: same seed and thread count on the same kind of CPU give the same weights
(the data, the dropout and the initialization all come from the seed; the selector's
header also records its training time). ``--selector-only`` keeps the model and retrains
the selector alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from vllm_tokenprune.testbed import synthetic, tasks
from vllm_tokenprune.testbed.demo_build import Prompts, build_config, build_processor, grow
from vllm_tokenprune.testbed.synthetic import TASK_IMAGE_SIZE, TASK_PATCH, scene_seed
from vllm_tokenprune.training.options import add_options, from_args, opt, warmup_cosine

DEMO_DIR = Path(__file__).parent / "demo"  # the shipped result: model/ and selector.safetensors


@dataclass
class DemoConfig:
    # model (vLLM's CPU attention needs head_dim in {32, 64, ...}: 128 / 4 = 32)
    vision_hidden: int = opt(128, "CLIP tower width")
    vision_layers: int = opt(4, "CLIP tower layers (the last one feeds the projector)")
    vision_heads: int = opt(4, "CLIP tower heads")
    vision_intermediate: int = opt(256, "CLIP tower MLP width (2x: a third less compute than 4x)")
    text_hidden: int = opt(128, "Llama width")
    text_layers: int = opt(2, "Llama layers")
    text_heads: int = opt(4, "Llama heads (and KV heads)")
    text_intermediate: int = opt(256, "Llama MLP width")
    # training
    steps: int = opt(6000, "optimizer steps")
    batch_size: int = opt(16, "scenes per step (each asked every question of its task)")
    lr: float = opt(1e-3, "AdamW peak learning rate (warmup, cosine to lr/10); at 3e-3 it stays at chance")
    warmup_steps: int = opt(100, "learning-rate warmup steps")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    dropout_frac: float = opt(0.75, "share of samples that keep content + a random part of the rest")
    curriculum_steps: int = opt(1000, "steps over which the other tokens fade in (0: none)")
    shown_frac: float = opt(0.0, "share of scenes shown at another size first, as real images arrive, and "
                                 "resized back by the processor (tasks.shown; make-eval-set --shown-scale)")
    shown_low: float = opt(0.5, "smallest factor of that size")
    shown_high: float = opt(4.0, "largest factor of that size")
    aux_weight: float = opt(0.5, "weight of the patch-label loss on the image tokens (0: answers only)")
    eval_every: int = opt(500, "steps between validation accuracy reports (0: only at the end)")
    eval_scenes: int = opt(96, "validation scenes per variant (questions in turn)")
    seed: int = opt(0, "seed of initialization, data order and dropout")
    threads: int = opt(1, "CPU threads (the bytes depend on it; 1 is kind to a shared machine)")
    weights_dtype: str = opt("float32", "dtype of the saved weights: bfloat16 halves the file, and vLLM "
                                        "serves float32 checkpoints in bfloat16 on CPU anyway")
    # selector, trained afterwards with `vllm-tokenprune train`
    selector_images: int = opt(2000, "textured training scenes for the selector (1200 kept 76% of the shapes at 0.25)")
    selector_steps: int = opt(600, "selector optimizer steps")


# ---------------------------------------------------------------------------------------
# Data

# Variants of training samples, in turn: two thirds from the harder clutter task.
TRAIN_VARIANTS = ("clutter", "clutter-plain", "textured", "clutter", "clutter-plain", "plain")
VAL_VARIANTS = ("textured", "plain", "clutter", "clutter-plain")


def pixel_values(images, processor) -> torch.Tensor:
    """The tower's input: CLIP normalization of task-sized images (the processor's resize and
    crop are no-ops at this size; tests check the result equals the processor's), and the
    processor's own resize first when an image has another size."""
    ip = processor.image_processor
    if any(im.size != (TASK_IMAGE_SIZE, TASK_IMAGE_SIZE) for im in images):
        return ip(images=images, return_tensors="pt")["pixel_values"]
    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images])).permute(0, 3, 1, 2)
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    return (x * ip.rescale_factor - mean) / std


@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 3, H, W)
    image_of: list[int]  # per sequence, its image's row in pixels
    keep: list[torch.Tensor]  # per sequence, ascending token indices the language model sees
    questions: list[str]
    answers: list[str]
    labels: torch.Tensor | None = None  # (B, N, 2) per image token: its shape kind, its shape's centre

    @classmethod
    def of(cls, items: list[tasks.Item], keep: list[torch.Tensor], processor) -> Batch:
        """One sequence per item."""
        return cls(pixel_values([it.scene.image for it in items], processor), list(range(len(items))), keep,
                   [it.question for it in items], [it.answer for it in items])


def patch_labels(scene) -> torch.Tensor:
    """(N, 2) int64 per patch, row-major: the kind of the shape with the most ink in it
    (0 none, 1 + its index in SHAPES), and 1 where a shape's centre pixel lies (else 0).

    Read from the scene's construction, for the auxiliary loss (``aux_loss``)."""
    size = scene.image.size[0]
    grid = size // TASK_PATCH
    ink = np.zeros((len(scene.shapes) + 1, grid, grid), np.int32)
    centre = np.zeros((grid, grid), np.int64)
    for i, shape in enumerate(scene.shapes):
        canvas = Image.new("1", (size, size))
        synthetic.draw_shape(ImageDraw.Draw(canvas), shape, 1)
        ink[i + 1] = np.asarray(canvas).reshape(grid, TASK_PATCH, grid, TASK_PATCH).sum(axis=(1, 3))
        x0, y0, x1, y1 = shape.box
        centre[(y0 + y1) // 2 // TASK_PATCH, (x0 + x1) // 2 // TASK_PATCH] = 1
    kinds = np.array([0] + [1 + synthetic.SHAPES.index(shape.kind) for shape in scene.shapes])
    kind = kinds[ink.argmax(axis=0)]  # 0 where no shape inks the patch
    return torch.from_numpy(np.stack([kind.reshape(-1), centre.reshape(-1)], axis=1))


def aux_loss(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each image token's shape kind (cross-entropy) and whether it holds a shape's centre
    (binary), read linearly off the tokens the language model gets: a direct signal that the
    answers alone pass to the tower only weakly (a linear probe on its tokens told the three
    kinds apart 59% of the time after 6000 steps of answers)."""
    out = head(features)  # (B, N, kinds + 1)
    kind = F.cross_entropy(out[..., :-1].flatten(0, 1), labels[..., 0].flatten())
    centre = F.binary_cross_entropy_with_logits(out[..., -1].flatten(), labels[..., 1].flatten().float())
    return kind + centre


def training_batch(step: int, cfg: DemoConfig, processor, rng: np.random.Generator) -> Batch:
    """Scenes step*B .. step*B+B-1 of the train split (variants in turn), each asked every
    question of its task (the tower runs once per scene), with dropout; a ``shown_frac`` share
    of them shown at another size, as the server would get them.

    Curriculum: over the first curriculum_steps the other tokens fade in (at most a
    growing fraction of them is kept, and full-token samples start at zero), so the
    language model first learns to read the content with little else in the way.
    """
    ramp = min(1.0, step / cfg.curriculum_steps) if cfg.curriculum_steps else 1.0
    images, image_of, keep, questions, answers, labels = [], [], [], [], [], []
    for j in range(cfg.batch_size):
        index = step * cfg.batch_size + j
        variant = TRAIN_VARIANTS[index % len(TRAIN_VARIANTS)]
        scene = tasks.make_scene(variant, scene_seed("train", index))
        content = scene.content_patches().reshape(-1)
        for kind in tasks.kinds(variant):
            if rng.random() < 1 - (1 - cfg.dropout_frac) * ramp:
                rest = np.flatnonzero(~content)
                extra = rng.choice(rest, size=int(rng.integers(0, round(ramp * len(rest)) + 1)), replace=False)
                kept = np.sort(np.concatenate([np.flatnonzero(content), extra]))
            else:
                kept = np.arange(len(content))
            image_of.append(j)
            keep.append(torch.from_numpy(kept))
            questions.append(scene.question(kind))
            answers.append(scene.answer(kind))
        shown = cfg.shown_frac and rng.random() < cfg.shown_frac
        images.append(tasks.shown(scene.image, int(rng.integers(2**31)), (cfg.shown_low, cfg.shown_high))
                      if shown else scene.image)
        if cfg.aux_weight:  # drawn per shape: not worth it when the loss is off
            labels.append(patch_labels(scene))
    return Batch(pixel_values(images, processor), image_of, keep, questions, answers,
                 torch.stack(labels) if labels else None)


# ---------------------------------------------------------------------------------------
# The forward pass on pruned token sets


def image_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """(B, N, H): the projector's output per image, what the language model reads."""
    per_image = model.model.get_image_features(
        pixel_values=pixels, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output
    return torch.stack(list(per_image))  # one tensor per image, all of the task's size


def answer_logits(model, batch: Batch, prompts: Prompts, features: torch.Tensor | None = None
                  ) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Teacher-forced logits of each answer: per sample (T, V) at the last prompt token and
    at each answer word, and the T target ids (the answer's words, then </s>); ``features``
    the batch's ``image_tokens`` when already computed.

    Each sequence is exactly what the server prefills: prompt text, the kept image rows in
    order, the rest of the prompt (then the answer); right-padded (causal attention never
    looks at the padding). Greedy decoding gives the answer iff every row's argmax is its
    target.
    """
    mm = model.model
    if features is None:
        features = image_tokens(model, batch.pixels)
    embed = mm.language_model.get_input_embeddings()
    seqs, starts, targets = [], [], []
    for i, (question, answer) in enumerate(zip(batch.questions, batch.answers)):
        before, after = prompts.pieces(question)
        target = prompts.target(answer)
        seqs.append(torch.cat([embed(torch.tensor(before)), features[batch.image_of[i]][batch.keep[i]],
                               embed(torch.tensor(after + target[:-1]))]))
        starts.append(len(before) + len(batch.keep[i]) + len(after) - 1)  # the last prompt token
        targets.append(target)
    x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    hidden = mm.language_model(inputs_embeds=x).last_hidden_state
    return [model.lm_head(hidden[i, s:s + len(t)]) for i, (s, t) in enumerate(zip(starts, targets))], targets


def greedy_right(logits: list[torch.Tensor], targets: list[list[int]]) -> list[bool]:
    """Per sample: would greedy decoding produce exactly the answer and stop?"""
    return [row.argmax(-1).tolist() == t for row, t in zip(logits, targets)]


@torch.no_grad()
def validation_accuracy(model, processor, prompts: Prompts, cfg: DemoConfig, keep: str = "all") -> dict:
    """Greedy answer accuracy on the val split, {variant: {question kind: accuracy}}, keeping
    all tokens or (keep="content") only the content patches (the most pruning could hope to keep)."""
    model.eval()
    out = {}
    for variant in VAL_VARIANTS:
        right = {kind: [] for kind in tasks.kinds(variant)}
        for start in range(0, cfg.eval_scenes, 64):
            items = [tasks.item(variant, "val", i) for i in range(start, min(start + 64, cfg.eval_scenes))]
            n = items[0].scene.content_patches().size
            kept = [torch.from_numpy(np.flatnonzero(it.scene.content_patches().reshape(-1))) if keep == "content"
                    else torch.arange(n) for it in items]
            for it, ok in zip(items, greedy_right(*answer_logits(model, Batch.of(items, kept, processor), prompts))):
                right[it.kind].append(ok)
        out[variant] = {kind: round(float(np.mean(r)), 3) for kind, r in right.items() if r}
    model.train()
    return out


# ---------------------------------------------------------------------------------------
# Training


def train_vlm(cfg: DemoConfig, progress: bool = True, log=tqdm.write, init: Path | None = None):
    """Train from scratch, or (``init``, a train-demo output folder) continue its model for
    cfg.steps more: a fresh optimizer with its own warmup and cosine schedule, on the scenes
    after the ones it was trained on; options describing a wider or deeper language model grow
    it first (``demo_build.grow``). Returns (model, processor, report)."""
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    processor = build_processor()
    earlier, first = None, 0
    if init is None:
        model = LlavaForConditionalGeneration(build_config(cfg, processor.tokenizer)).float()
    else:
        earlier = json.loads((init / "training.json").read_text())
        first = earlier.get("first_step", 0) + earlier["config"]["steps"]  # scenes and curriculum go on
        model = LlavaForConditionalGeneration.from_pretrained(init / "model").float()
        described = build_config(cfg, processor.tokenizer)
        with torch.device("meta"):  # shapes only: no memory, no draw from the seed
            shapes = [{k: v.shape for k, v in m.state_dict().items()}
                      for m in (model, LlavaForConditionalGeneration(described))]
        if shapes[0] != shapes[1]:
            try:  # a larger language model: grown from this one, answering as it does
                model = grow(model, described)
            except ValueError as err:
                raise SystemExit(f"{init / 'model'} is not the model these options describe, nor grows into it "
                                 f"({err}); continue with the options it was trained with (its training.json), "
                                 "or a wider, deeper language model") from None
    rng = np.random.default_rng([cfg.seed, 1, first])
    model.train()
    prompts = Prompts(processor.tokenizer)
    # Training only: not part of the checkpoint.
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(synthetic.SHAPES) + 2)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    history = []
    start, cpu_start = time.time(), time.process_time()
    bar = tqdm(range(first, first + cfg.steps), desc="train-demo", unit="step", disable=not progress)
    for step in bar:
        lr = warmup_cosine(step - first, cfg.steps, cfg.lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = training_batch(step, cfg, processor, rng)
        features = image_tokens(model, batch.pixels)
        logits, targets = answer_logits(model, batch, prompts, features)
        # mean over each answer's words, then over answers: a three-digit reading counts as
        # much as a one-word answer, not three times as much
        loss = torch.stack([F.cross_entropy(row, torch.tensor(t)) for row, t in zip(logits, targets)]).mean()
        if cfg.aux_weight:
            loss = loss + cfg.aux_weight * aux_loss(head, features, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", kept=f"{np.mean([len(k) for k in batch.keep]):.0f}")
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step == first + cfg.steps - 1:
            row = {"step": step + 1, "loss": round(loss.item(), 4), "seconds": round(time.time() - start, 1),
                   "val_all": validation_accuracy(model, processor, prompts, cfg),
                   "val_content_only": validation_accuracy(model, processor, prompts, cfg, keep="content")}
            history.append(row)
            log(json.dumps(row))
    model.eval()
    report = {"config": asdict(cfg), "train_seconds": round(time.time() - start, 1),
              "train_cpu_seconds": round(time.process_time() - cpu_start, 1),
              "parameters": sum(p.numel() for p in model.parameters()), "history": history}
    if earlier is not None:
        report.update(first_step=first, continued={"from": str(init), **earlier})
    return model, processor, report


def save_checkpoint(model, processor, out_dir: Path, dtype: str = "float32") -> Path:
    """The hub layout both transformers and vLLM load (safetensors in ``dtype``, which the
    config records, LLaVA key names). Training reads it back in float32."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from vllm_tokenprune.testbed.tiny.parts import LLAVA_HUB_PREFIXES
    from vllm_tokenprune.testbed.tiny.weights import to_hub_layout

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    save_file(to_hub_layout(state, LLAVA_HUB_PREFIXES), out_dir / "model.safetensors",
              metadata={"format": "pt"})
    for config in (model.config, model.config.text_config, model.config.vision_config):
        config.dtype = dtype
    model.config.save_pretrained(out_dir)
    text = model.config.text_config
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                     pad_token_id=text.pad_token_id).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def train_demo_selector(model_dir: Path, out: Path, cfg: DemoConfig, progress: bool = True) -> int:
    """``vllm-tokenprune train`` on textured training scenes, exactly as a user would run it."""
    from vllm_tokenprune.training.train import TrainConfig, train_on_folder

    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        # Scenes from the far end of the train range: the VLM never saw these.
        write_selector_images(images, cfg.selector_images)
        train = TrainConfig(steps=cfg.selector_steps, seed=cfg.seed, threads=cfg.threads,
                            cache_dir=str(Path(tmp) / "cache"))
        return train_on_folder(str(model_dir), images, out, train, progress=progress)


SELECTOR_SCENES_START = 5 * 10**8  # train-split indices far beyond any VLM training run
# Textured shapes scenes only: a selector trained on every variant learned from the clutter
# scenes to keep a sample of each texture, and kept 85% of the shapes at keep 0.25 on
# textured scenes instead of all of them (docs/quality.md).
SELECTOR_VARIANT = "textured"


def write_selector_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        tasks.make_scene(SELECTOR_VARIANT, scene_seed("train", SELECTOR_SCENES_START + i)).image.save(
            folder / f"{SELECTOR_VARIANT}_{i:05d}.png")


# ---------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for model/ (the checkpoint), selector.safetensors, training.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--selector-only", action="store_true",
                        help="keep OUT/model and retrain only its selector (minutes, not a quarter hour)")
    parser.add_argument("--continue-from", type=Path, metavar="DIR",
                        help="train DIR's model (a train-demo --out folder) for --steps more, on the scenes "
                             "after those it saw, with a fresh optimizer and schedule; OUT gets the result. "
                             "--text-* options of a wider or deeper language model grow DIR's first, "
                             "answering as it did (function-preserving)")
    add_options(parser, DemoConfig)


def run(args: argparse.Namespace) -> int:
    cfg = from_args(DemoConfig, args)
    progress = not args.no_progress
    out: Path = args.out
    model_dir = out / "model"
    if args.selector_only:
        report = json.loads((out / "training.json").read_text())
        selector_fields = {"selector_images", "selector_steps"}
        report["config"].update({k: v for k, v in asdict(cfg).items() if k in selector_fields})
    else:
        model, processor, report = train_vlm(cfg, progress=progress, log=tqdm.write if progress else print,
                                             init=args.continue_from)
        if model_dir.exists():
            shutil.rmtree(model_dir)  # replace, never merge with an older checkpoint
        save_checkpoint(model, processor, model_dir, cfg.weights_dtype)
        print(f"wrote {model_dir} ({report['parameters']} parameters, {report['train_seconds']:.0f} s, "
              f"{report['train_cpu_seconds']:.0f} s CPU)")
    code = train_demo_selector(model_dir, out / "selector.safetensors", cfg, progress)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return code
