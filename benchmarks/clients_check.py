"""Third-party clients against a real server: does each way they have of choosing the keep
ratio reach it?

    PYTHONPATH=. .venv/bin/python benchmarks/clients_check.py --out benchmarks/results/clients

aiperf, guidellm and lmms-eval are each installed at a pinned version into a virtual
environment of their own (``python -m venv`` and pip; ``--venvs`` keeps them for the next
run), and each sends a few requests, one of the demo's scenes each, choosing the keep ratio
every way the tool allows: the ``X-Keep-Ratio`` header, the body's ``mm_processor_kwargs``,
a model alias (``NAME:0.1``). Each way asks for its own ratio, so a way that does not arrive
shows up as another K (the server's default keeps everything).

What the tools report is not trusted: the check reads the server's Prometheus counters
(``tokenprune_requests``, ``tokenprune_images``, ``tokenprune_image_tokens_in`` and
``_kept``, for the served model) before and after each run, and a run is ok when the server
counted one image per request sent, each keeping K = ``keep_count(N, ratio)`` tokens.

The script starts the shipped demo itself unless ``--url`` names a running server; aliases
the server's /v1/models does not list are skipped with a note. Needs the package registry,
not the model or dataset hubs: data is local (``make-eval-set``), tokenizers are the demo's.
Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.testbed.tasks import write_eval_set
from vllm_tokenprune.tools.launcher import Server
from vllm_tokenprune.tools.provenance import add_allow_dirty, stamp, write_results
from vllm_tokenprune.tools.serve import default_model

# tool -> (distribution whose version is reported, pip requirements)
TOOLS = {
    "aiperf": ("aiperf", ["aiperf==0.13.0"]),
    # the [vision] extra brings the image encoding; without it every image row fails (and the run is reported to hang)
    "guidellm": ("guidellm", ["guidellm[vision]==0.8.1"]),
    # lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed; it logs the error and exits 0
    "lmms-eval": ("lmms_eval", ["lmms-eval==0.7.3", "filelock<4"]),
}
OUTPUT_TOKENS = 2
CONCURRENCY = 2
TIMEOUT_S = 600  # a tool that hangs (guidellm without [vision]) fails its run instead of the check


@dataclass(frozen=True)
class Way:
    name: str
    ratio: float
    alias: bool = False  # the ratio travels in the model name
    refused: bool = False  # the tool is expected to refuse this way (a quirk the notes work around)


# Distinct ratios per way, so that the K the server kept says which way arrived.
HEADER, BODY, ALIAS = Way("header", 0.25), Way("body", 0.5), Way("alias", 0.1, alias=True)
AIPERF_PLAIN_HEADER = Way("header, written 0.25", 0.25, refused=True)


@dataclass
class Context:
    root: str  # the server's http root
    model: str  # its first served name
    data: Path  # make-eval-set's folder
    work: Path
    requests: int
    served: list[str]  # the names /v1/models lists

    def model_for(self, way: Way) -> str:
        return f"{self.model}:{way.ratio}" if way.alias else self.model


def body(way: Way) -> dict:
    return {"mm_processor_kwargs": {"keep_ratio": way.ratio}}


def aiperf(bin_dir: Path, way: Way, ctx: Context) -> list[str]:
    items = ctx.work / "aiperf.jsonl"  # its single_turn format: a text and an image path per line
    items.write_text("".join(json.dumps({"text": i["question"], "image": str(ctx.data / i["image"])}) + "\n"
                             for i in read_items(ctx.data)))
    command = [str(bin_dir / "aiperf"), "profile", "--model", ctx.model_for(way), "--url", ctx.root,
               "--endpoint-type", "chat", "--input-file", str(items), "--custom-dataset-type", "single_turn",
               "--request-count", str(ctx.requests), "--concurrency", str(CONCURRENCY),
               "--output-tokens-mean", str(OUTPUT_TOKENS), "--tokenizer", str(default_model()[0]),
               "--artifact-dir", str(ctx.work / "aiperf-artifacts"), "--ui-type", "none"]
    if way is AIPERF_PLAIN_HEADER:
        command += ["--header", f"X-Keep-Ratio:{way.ratio}"]
    elif way is HEADER:
        command += ["--header", f"X-Keep-Ratio:+{way.ratio}"]
    elif way is BODY:
        command += ["--extra-inputs", json.dumps(body(way))]
    return command


def guidellm(bin_dir: Path, way: Way, ctx: Context) -> list[str]:
    items = ctx.work / "guidellm.jsonl"  # its column mapper finds "prompt" and "image" by name
    items.write_text("".join(json.dumps({"prompt": i["question"], "image": str(ctx.data / i["image"])}) + "\n"
                             for i in read_items(ctx.data)))
    # extras are nested, so the backend is given as JSON rather than key=value pairs
    backend = {"kind": "openai_http", "target": ctx.root, "model": ctx.model_for(way), "max_tokens": OUTPUT_TOKENS}
    if way is HEADER:
        backend["extras"] = {"headers": {"X-Keep-Ratio": str(way.ratio)}}  # header values must be strings
    elif way is BODY:
        backend["extras"] = {"body": body(way)}
    return [str(bin_dir / "guidellm"), "run", "--backend", json.dumps(backend),
            "--data", f"kind=json_file,path={items}", "--profile", f"kind=concurrent,streams={CONCURRENCY}",
            "--constraint", f"kind=max_requests,count={ctx.requests}",
            "--tokenizer", f"kind=huggingface_auto,model={default_model()[0]}",
            "--output", f"kind=json,path={ctx.work / 'guidellm.json'}", "--disable-console-interactive"]


LMMS_TASK = """\
task: tokenprune_scenes
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {tokens}
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
LMMS_UTILS = """\
from pathlib import Path
from PIL import Image

def doc_to_visual(doc):
    return [Image.open(Path({data!r}) / doc["image"]).convert("RGB")]
"""


def lmms_eval(bin_dir: Path, way: Way, ctx: Context) -> list[str]:
    # A local task: the "json" dataset builder ships with datasets, so nothing comes from a hub.
    task = ctx.work / "lmms-task"
    task.mkdir(exist_ok=True)
    (task / "tokenprune_scenes.yaml").write_text(LMMS_TASK.format(items=ctx.data / "items.jsonl",
                                                                  tokens=OUTPUT_TOKENS))
    (task / "utils.py").write_text(LMMS_UTILS.format(data=str(ctx.data)))
    model_args = (f"model={ctx.model_for(way)},base_url={ctx.root}/v1,api_key=unused,"
                  f"num_concurrent={CONCURRENCY},max_retries=1")
    return [str(bin_dir / "lmms-eval"), "eval", "--model", "openai", "--model_args", model_args,
            "--tasks", "tokenprune_scenes", "--include_path", str(task), "--limit", str(ctx.requests),
            "--batch_size", "1", "--output_path", str(ctx.work / "lmms-eval-out")]


LMMS_NO_KWARGS = ("not possible: its openai model sends fixed payload keys (model, messages, max_tokens, "
                  "temperature, ...) and has no model_args for request headers or extra body fields")
# tool -> (the command builder, what every run of it needs, and per way how it is sent)
PLANS = {
    "aiperf": (aiperf, "--custom-dataset-type single_turn with a JSONL of text and image path; --tokenizer the "
                       "demo's folder (an alias is no hub id), with HF_HUB_OFFLINE unset: set, aiperf looks the "
                       "folder up in the hub cache and fails", {
        AIPERF_PLAIN_HEADER: "refused (exit 1): its config loader reads 0.25 as a float and rejects the header, "
                             "also when given as JSON {\"X-Keep-Ratio\": \"0.25\"}",
        HEADER: "--header X-Keep-Ratio:+0.25: the sign keeps it a string; the server reads +0.25 as 0.25",
        BODY: "--extra-inputs with a JSON object (its key:value form cannot nest)",
        ALIAS: "--model NAME:TAG",
    }),
    "guidellm": (guidellm, "installed with the [vision] extra, which encodes the images; --backend as JSON "
                           "(extras nest); --constraint kind=max_requests,count=N; a JSONL with prompt and image "
                           "(path) columns, found by name; --tokenizer the demo's folder (an alias is no hub id)", {
        HEADER: "--backend extras.headers, the value a string",
        BODY: "--backend extras.body",
        ALIAS: "--backend model NAME:TAG",
    }),
    "lmms-eval": (lmms_eval, "filelock<4 beside it (0.7.3 imports filelock._api, gone in filelock 4; it logs the "
                             "error and still exits 0, so only the server's counters tell); a local task through "
                             "--include_path: a YAML with dataset_path json and data_files, and a utils.py whose "
                             "doc_to_visual opens the PNG; HF_HUB_OFFLINE and HF_DATASETS_OFFLINE set", {
        HEADER: LMMS_NO_KWARGS,
        BODY: LMMS_NO_KWARGS,
        ALIAS: "--model openai, model=NAME:TAG in --model_args",
    }),
}


def read_items(data: Path) -> list[dict]:
    return [json.loads(line) for line in (data / "items.jsonl").read_text().splitlines()]


def counters(root: str, model: str) -> dict[str, float]:
    """The server's tokenprune_ counters for ``model``, summed over their other labels (the
    method), plus images per method as ``images/METHOD``."""
    with urllib.request.urlopen(root + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix("tokenprune_")
        if family.name == name or family.type != "counter":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("model_name") == model:
                out[name] = out.get(name, 0.0) + sample.value
                if name == "images":
                    key = f"images/{sample.labels['method']}"
                    out[key] = out.get(key, 0.0) + sample.value
    return out


def served_models(root: str) -> list[str]:
    with urllib.request.urlopen(root + "/v1/models", timeout=10) as response:
        return [m["id"] for m in json.load(response)["data"]]


def venv(tool: str, where: Path) -> tuple[Path, str]:
    """The tool's environment (made when missing; pip installs the pins, a no-op when they are
    met) and the version installed."""
    dist, requirements = TOOLS[tool]
    path = where / tool
    if not (path / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", *requirements],
                         capture_output=True, text=True)
    if pip.returncode:
        raise SystemExit(f"pip install {' '.join(requirements)} failed:\n{pip.stdout[-3000:]}{pip.stderr[-3000:]}")
    version = subprocess.run([str(path / "bin" / "python"), "-c",
                              f"import importlib.metadata as m; print(m.version({dist!r}))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return path / "bin", version


def run_way(tool: str, bin_dir: Path, way: Way, ctx: Context) -> dict:
    build, _, notes = PLANS[tool]
    row = {"way": way.name, "keep_ratio": way.ratio, "model": ctx.model_for(way), "notes": notes[way]}
    if notes[way] is LMMS_NO_KWARGS:
        return {**row, "ok": None}
    if way.alias and ctx.model_for(way) not in ctx.served:
        return {**row, "ok": None, "notes": f"skipped: the server does not list the alias {ctx.model_for(way)}"}
    command = build(bin_dir, way, ctx)
    # The tool's own environment (not this checkout's PYTHONPATH), with no hub to reach.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "HF_HUB_OFFLINE")}
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '')}", HF_DATASETS_OFFLINE="1", HF_HOME=str(ctx.work / "hf"))
    if tool != "aiperf":  # aiperf, hub offline, looks a tokenizer folder up in the hub cache and fails
        env["HF_HUB_OFFLINE"] = "1"
    log = ctx.work / "tool.log"  # its tail goes into the results of a run that is not ok
    before = counters(ctx.root, ctx.model)
    start = time.monotonic()
    # Its own session, so that a timeout ends the tool's worker processes too.
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ctx.work,
                                start_new_session=True)
        try:
            returncode = proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
    seconds = time.monotonic() - start
    delta = {k: v - before.get(k, 0.0) for k, v in counters(ctx.root, ctx.model).items()}
    images = int(delta.get("images", 0))
    per_image = {k: delta.get(f"image_tokens_{k}", 0.0) / images if images else None for k in ("in", "kept")}
    expected = keep_count(round(per_image["in"]), way.ratio) if images else None
    if way.refused:
        ok = returncode != 0 and images == 0
    else:
        ok = (returncode == 0 and int(delta.get("requests", 0)) == ctx.requests and images == ctx.requests
              and per_image["kept"] == expected)
    row.update(command=shlex.join(command), returncode=returncode,
               seconds=round(seconds, 1), requests_sent=ctx.requests, requests_counted=int(delta.get("requests", 0)),
               images_counted=images, image_tokens_in_per_image=per_image["in"],
               image_tokens_kept_per_image=per_image["kept"], expected_kept=expected,
               images_by_method={k.split("/", 1)[1]: int(v) for k, v in delta.items() if k.startswith("images/") and v},
               ok=ok)
    if not ok:
        row["output_tail"] = log.read_text(errors="replace").strip().splitlines()[-25:]
    return row


def markdown(report: dict) -> str:
    lines = ["# Third-party clients: does the keep ratio each way reach the server?", "",
             f"`{report['command']}` at commit `{report['commit']}`, against {report['server']} "
             f"(models listed: {', '.join(report['served_models'])}). {report['requests']} requests per run, "
             f"one {report['image_tokens']}-token scene each, {OUTPUT_TOKENS} output tokens, concurrency "
             f"{CONCURRENCY}. Requests and tokens are the server's own counters (deltas of its /metrics).", "",
             "| tool | version | way | requests counted | image tokens kept per image (expected) | ok | notes "
             "| command |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["runs"]:
        way = f"{row['way']} ({row['model'] if row['alias'] else row['keep_ratio']})"
        counted = kept = command = "-"
        if "command" in row:
            counted = f"{row['requests_counted']} of {row['requests_sent']}"
            kept = row["image_tokens_kept_per_image"]
            kept = f"{'-' if kept is None else f'{kept:g}'} ({row['expected_kept'] or '-'})"
            command = f"`{row['command']}`"
        ok = {True: "yes", False: "**no**", None: "-"}[row["ok"]]
        lines.append(f"| {row['tool']} | {row['version']} | {way} | {counted} | {kept} | {ok} | {row['notes']} "
                     f"| {command} |")
    lines += ["", "What every run of each tool needs:", ""]
    lines += [f"- {tool} {t['version']} (`pip install {' '.join(map(shlex.quote, t['requirements']))}`): {t['notes']}"
              for tool, t in report["tools"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="http root of a running server (default: start the shipped demo)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/clients"))
    parser.add_argument("--venvs", type=Path,
                        help="folder for the tools' environments, kept for the next run (default: a temporary one)")
    parser.add_argument("--tools", nargs="+", choices=tuple(TOOLS), default=list(TOOLS))
    parser.add_argument("--requests", type=int, default=4, help="requests per run, one scene each")
    add_allow_dirty(parser)
    args = parser.parse_args(argv)
    record = stamp(Path(__file__), argv, args.allow_dirty)
    with tempfile.TemporaryDirectory(prefix="clients-check-") as tmp:
        work = Path(tmp)
        versions = {}  # installed before any server starts: pip takes minutes, the runs seconds
        for tool in tqdm(args.tools, desc="installing", unit="tool"):
            versions[tool] = venv(tool, args.venvs or work / "venvs")
        data = work / "data"
        write_eval_set(data, "plain", "test", args.requests)
        server = None if args.url else Server(None, log_path=work / "server.log")
        try:
            root = (args.url or server.root).rstrip("/")
            served = served_models(root)
            ctx = Context(root, served[0], data, work, args.requests, served)
            runs = []
            with tqdm([(tool, way) for tool in args.tools for way in PLANS[tool][2]], unit="run") as bar:
                for tool, way in bar:
                    bar.set_description(f"{tool} {way.name}")
                    bin_dir, version = versions[tool]
                    row = {"tool": tool, "version": version, "alias": way.alias, **run_way(tool, bin_dir, way, ctx)}
                    bar.write(f"{tool} {way.name}: ok={row['ok']} kept/image={row.get('image_tokens_kept_per_image')} "
                              f"expected={row.get('expected_kept')} requests={row.get('requests_counted')}")
                    runs.append(row)
        finally:
            if server is not None:
                server.stop()
    image_tokens = next((round(r["image_tokens_in_per_image"]) for r in runs if r.get("image_tokens_in_per_image")),
                        None)
    tools = {tool: {"version": version, "requirements": TOOLS[tool][1], "notes": PLANS[tool][1]}
             for tool, (_, version) in versions.items()}
    report = {**record, "server": args.url or "the shipped demo, started by this script", "served_models": served,
              "requests": args.requests, "image_tokens": image_tokens, "tools": tools, "runs": runs}
    write_results(args.out, report, markdown(report))
    return 0 if all(r["ok"] is not False for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
