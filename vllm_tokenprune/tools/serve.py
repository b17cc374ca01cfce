"""``vllm-tokenprune serve [MODEL] [--selector PATH] [policy flags] [any vllm serve args]``.

Starts vLLM's own OpenAI-compatible server with what pruning needs, so users don't
have to assemble it:

  --hf-overrides '{"architectures": ["Pruned..."], "tokenprune_selector": PATH, <policy>}'
  --middleware vllm_tokenprune.serving.http.KeepRatioMiddleware
  --trust-request-mm-kwargs --enable-prompt-tokens-details

Everything it adds can be written by hand on a plain ``vllm serve`` command line (the
README shows how). Problems we can see before vLLM starts (unsupported architecture,
a selector trained for another model) stop here with a clear message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from vllm_tokenprune.policy import (
    ALIAS_SEPARATOR,
    AUTO,
    KEEP_RATIO_KEY,
    METHOD_KEY,
    AutoBudget,
    PrunePolicy,
    PruneRequestError,
    parse_alias_tag,
)

ACCEPTS_EXTRA_ARGS = True  # everything we don't know goes to `vllm serve`

MIDDLEWARE = "vllm_tokenprune.serving.http.KeepRatioMiddleware"
DEFAULT_SERVED_NAME = "tokenprune-default"
DEMO_ALIASES = "0.5,0.25,0.1,auto,learned_query@0.25"  # what the demo is published under besides its name
log = logging.getLogger("vllm_tokenprune.tools.serve")


class ServeError(SystemExit):
    """A start-up problem found before vLLM starts; printed without a traceback."""

    def __init__(self, message: str):
        super().__init__(f"vllm-tokenprune serve: error: {message}")


def default_model() -> tuple[Path, Path]:
    """The embedded default, shipped in the package: the demo LLaVA trained on the
    synthetic shapes task (``vllm-tokenprune train-demo``), and its selector."""
    from vllm_tokenprune.testbed.demo_model import DEMO_DIR

    return DEMO_DIR / "model", DEMO_DIR / "selector.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s [MODEL] [--selector PATH] [policy flags] [vllm serve args...]"
    parser.add_argument("--selector", metavar="PATH",
                        help="selector checkpoint (.safetensors) from `vllm-tokenprune train`; "
                             "enables the 'learned' method and makes it the default")
    policy = PrunePolicy()
    parser.add_argument("--default-keep-ratio", default=policy.default_keep_ratio,
                        help="keep ratio for requests that send none: a number in (0, 1], or auto "
                             "(auto;min=R;max=R, bounds optional; needs a selector with a budget "
                             "predictor) (default: %(default)s)")
    parser.add_argument("--default-video-keep-ratio", type=float, default=policy.default_video_keep_ratio,
                        metavar="R", help="keep ratio for videos of requests that send none, a number in (0, 1], "
                        "on the families that prune videos (default: %(default)s, videos whole)")
    parser.add_argument("--min-keep-ratio", type=float, default=policy.min_keep_ratio,
                        help="floor: lower requested ratios are raised to it (default: none)")
    parser.add_argument("--keep-ratio-step", type=float, default=policy.keep_ratio_step,
                        help="round requested ratios to multiples of this step, so near-equal "
                             "ratios share cache entries (default: no rounding)")
    parser.add_argument("--max-quadratic-tokens", type=int, default=policy.max_quadratic_tokens, metavar="N",
                        help="largest image, in tokens, the methods that hold N x N values (mmtok, cdpruner) "
                             "accept; larger ones get a 400 (0: any) (default: %(default)s)")
    parser.add_argument("--allow-mm-kwargs", metavar="KEY[,KEY]", default="",
                        help="HF processor kwargs clients may send in mm_processor_kwargs besides "
                             "keep_ratio and prune_method (default: none; others get a 400)")
    parser.add_argument("--aliases", metavar="TAG[,TAG]",
                        help="publish the model under NAME:TAG too (NAME: the first --served-model-name), "
                             "for clients that can only pick a model name: TAG is a keep ratio (0.25, auto), "
                             "a method (divprune) or METHOD@RATIO; a header or the body still wins over it "
                             f"(default: none; for the demo {DEMO_ALIASES})")
    parser.epilog = ("MODEL is a local checkpoint directory or hub id; without it the embedded "
                     "demo LLaVA is served with its selector. All other arguments go to `vllm serve`.")


def pruned_architecture(model: str) -> str:
    from vllm_tokenprune.families import FAMILIES, of_architectures

    archs = list(_load_config(model).architectures or [])
    family = of_architectures(archs)
    if family is None:
        raise ServeError(
            f"{model} is a {', '.join(archs) or 'model without architectures'}; pruning "
            f"supports {', '.join(sorted(f.stock for f in FAMILIES))}"
        )
    return family.pruned


def _load_config(model: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise ServeError(f"cannot read the config of {model!r}: {err}") from None


def check_selector(path: str | None, model: str, policy: PrunePolicy,
                   aliases: dict[str, dict] | None = None) -> None:
    """The selector fits the model, its budget predictor and question reader (if any) load
    and fit, and a default of ``auto`` has a predictor; so do the methods and budgets of the
    model ``aliases`` (name -> kwargs)."""
    from vllm_tokenprune.selection import methods
    from vllm_tokenprune.selection.budget import load_budget_predictor
    from vllm_tokenprune.selection.selector import (
        check_compatible,
        check_question_width,
        load_query_selector,
        load_selector,
    )

    try:
        has_predictor = has_reader = False
        if path:
            _, metadata = load_selector(path)
            config = _load_config(model)
            check_compatible(metadata, config)
            has_predictor = load_budget_predictor(path) is not None
            if (reader := load_query_selector(path)) is not None:
                check_question_width(reader[0], config)
                has_reader = True
    except (OSError, ValueError) as err:
        raise ServeError(f"selector {path}: {err}") from None
    missing = (f"the selector {path} has none (retrain it with `vllm-tokenprune train`)" if path
               else "no --selector is given")
    if isinstance(policy.default_keep_ratio, AutoBudget) and not has_predictor:
        raise ServeError(f"--default-keep-ratio {policy.default_keep_ratio} needs a budget predictor, and {missing}")
    for name, kwargs in (aliases or {}).items():
        uses = methods.get(kwargs[METHOD_KEY]).uses_selector if METHOD_KEY in kwargs else None
        if str(kwargs.get(KEEP_RATIO_KEY)).startswith(AUTO) and not has_predictor:
            raise ServeError(f"--aliases: {name} chooses auto, which needs a budget predictor, and {missing}")
        if (uses == "selector" and not path) or (uses == "query" and not has_reader):
            raise ServeError(f"--aliases: {name} chooses {kwargs[METHOD_KEY]}, which needs a selector"
                             + (" that reads the question (`vllm-tokenprune train-query` adds one)" if uses == "query"
                                else "") + f", and {'the selector ' + path + ' has none' if path else missing}")


def pop_option(extra: list[str], name: str) -> str | None:
    """Remove ``name VALUE`` or ``name=VALUE`` from ``extra``; return VALUE."""
    for i, arg in enumerate(extra):
        if arg == name and i + 1 < len(extra):
            value = extra[i + 1]
            del extra[i : i + 2]
            return value
        if arg.startswith(name + "="):
            del extra[i]
            return arg.split("=", 1)[1]
    return None


def _pop_served_names(extra: list[str]) -> list[str]:
    """Remove ``--served-model-name NAME [NAME ...]`` (or ``=NAME``) from ``extra``; the names."""
    for i, arg in enumerate(extra):
        if arg.startswith("--served-model-name="):
            del extra[i]
            return [arg.split("=", 1)[1]]
        if arg == "--served-model-name":
            end = next((j for j in range(i + 1, len(extra)) if extra[j].startswith("-")), len(extra))
            names = extra[i + 1:end]
            del extra[i:end]
            return names
    return []


def with_aliases(model: str, extra: list[str], tags: str) -> tuple[list[str], dict[str, dict]]:
    """``extra`` with ``NAME:TAG`` added to its served names for each of ``tags`` (NAME the first
    served name, else MODEL, vLLM's default), and the aliases with the kwargs each carries."""
    if not tags.strip():
        return extra, {}
    extra = list(extra)
    names = _pop_served_names(extra) or [model]
    aliases = {}
    for tag in (t.strip() for t in tags.split(",") if t.strip()):
        try:
            aliases[names[0] + ALIAS_SEPARATOR + tag] = parse_alias_tag(tag, param=f"--aliases {tag!r}")
        except PruneRequestError as err:
            raise ServeError(str(err)) from None
    return [*extra, "--served-model-name", *names, *(a for a in aliases if a not in names)], aliases


def _pop_model(extra: list[str]) -> str | None:
    """MODEL as the first positional argument or as vLLM's older ``--model X`` form."""
    if extra and not extra[0].startswith("-"):
        return extra.pop(0)
    return pop_option(extra, "--model")


def has_option(extra: list[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in extra for n in names)


def build_vllm_args(model: str, selector: str | None, extra: list[str],
                    policy: PrunePolicy | None = None) -> list[str]:
    """The `vllm serve` argument list (without the leading 'serve')."""
    extra = list(extra)
    overrides = json.loads(pop_option(extra, "--hf-overrides") or "{}")
    overrides["architectures"] = [pruned_architecture(model)]
    if selector:
        overrides["tokenprune_selector"] = str(Path(selector).resolve())
    overrides.update((policy or PrunePolicy()).to_overrides())
    args = [model, *extra, "--hf-overrides", json.dumps(overrides), "--middleware", MIDDLEWARE,
            "--trust-request-mm-kwargs", "--enable-prompt-tokens-details"]
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not has_option(
        extra, "--enforce-eager", "--no-enforce-eager", "--compilation-config", "-O"
    ):
        args.append("--enforce-eager")  # start-up in ~25 s instead of ~50 s on CPU
    return args


def _cpu_environment(extra: list[str]) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    # vLLM on CPU refuses to start without a KV-cache size, and binds a non-loopback
    # address for its engine unless told otherwise.
    if not has_option(extra, "--kv-cache-memory-bytes"):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")


def run(args: argparse.Namespace) -> int:
    from vllm_tokenprune.tools.vllm_cli import run_vllm_cli

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    extra = list(args.extra_args)
    model = _pop_model(extra)
    aliases_given = args.aliases
    if model is None:
        model, selector = map(str, default_model())
        args.selector = args.selector or selector
        if not has_option(extra, "--served-model-name"):
            extra += ["--served-model-name", DEFAULT_SERVED_NAME]
        aliases_given = DEMO_ALIASES if aliases_given is None else aliases_given
    extra, aliases = with_aliases(model, extra, aliases_given or "")
    try:
        policy = PrunePolicy(args.default_keep_ratio, args.min_keep_ratio, args.keep_ratio_step,
                             tuple(k for k in args.allow_mm_kwargs.split(",") if k), args.max_quadratic_tokens,
                             args.default_video_keep_ratio)
    except ValueError as err:
        raise ServeError(str(err)) from None
    check_selector(args.selector, model, policy, aliases)
    vllm_args = build_vllm_args(model, args.selector, extra, policy)
    _cpu_environment(extra)
    log.info("vllm serve %s", " ".join(vllm_args))
    return run_vllm_cli(["serve", *vllm_args])
