"""infra/ checked as far as it can be without a cloud: every YAML parses; the `ray up` configs, filled
the way infra/render.py fills them, pass Ray's own validation; the KubeRay manifests pass KubeRay's CRD
schema; the roles, network and registry of infra/aws/stack.yaml and infra/gcp/setup.sh allow what the
cluster does and no more; images are tagged by commit; every job a config or infra/README.md runs
exists and its config and overrides load. Then live pieces: the MLflow launch script (its password
handling against a stand-in `mlflow`, a real server round trip, retries through a store that answers
"database is locked"), the log shipper on real folders.

Cloud APIs, the docker build and GPUs cannot exist here. CloudFormation is evaluated by a small IAM
reader below (Allow statements, wildcards, StringEquals), not by AWS; infra/gcp/setup.sh runs against a
`gcloud` that records its arguments, so what it asks Google for is checked, not that Google accepts it.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import functools
import gzip
import importlib.util
import itertools
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import typing
import urllib.error
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import mlflow
import mlflow.pytorch
import psutil
import pytest
import ray.autoscaler
import tomllib
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.server.security_utils import is_allowed_host_header
from mlflow_server import SERVE_SCRIPT, mlflow_server
from packaging.requirements import Requirement
from ray._private.runtime_env.packaging import _zip_files
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.autoscaler._private.node_provider_availability_tracker import (
    NodeAvailabilitySummary,
)
from ray.autoscaler._private.resource_demand_scheduler import (
    _default_utilization_scorer,
    get_nodes_for,
)
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
from ray.runtime_env import RuntimeEnv

from cluster_train import tracking
from cluster_train.tracking import RunTracker, TrackingConfig
from cluster_train.train.config import load_train_config
from data_prep.config import ConfigError, PrepConfig, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
INFRA = REPO_ROOT / "infra"
CLUSTER_CONFIGS = {"aws": INFRA / "aws" / "cluster.yaml", "gcp": INFRA / "gcp" / "cluster.yaml"}
AWS_STACK = INFRA / "aws" / "stack.yaml"
GCP_SETUP = INFRA / "gcp" / "setup.sh"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
MLFLOW_MANIFEST = INFRA / "kuberay" / "mlflow.yaml"
SERVICE_ACCOUNTS = {"eks": INFRA / "kuberay" / "serviceaccount-eks.yaml", "gke": INFRA / "kuberay" / "serviceaccount-gke.yaml"}
KUBERAY_SCHEMAS = INFRA / "kuberay" / "kuberay-crd-schemas.json.gz"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
README = INFRA / "README.md"
SHIP_LOGS = INFRA / "logs" / "ship_logs.py"
IMAGE_HOME = "/home/ray/deepemocluster"  # the Dockerfile's WORKDIR: the project inside the image
PROJECT_IMAGE = "{{RepositoryUri}}:{{GitCommit}}"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # what `git rev-parse HEAD` gives


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_module(INFRA / "render.py")


def pins() -> dict[str, str]:
    """name -> version of every `==` pin in pyproject.toml's dependencies."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"pyproject.toml: {line} is not pinned"
        found[requirement.name] = spec.version
    return found


RAY_VERSION = pins()["ray"]
PY_TAG = "py311"  # requires-python >=3.11,<3.12


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_manifests(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def walk(node, key: str):
    """Every value stored under `key` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


# --- infra/aws/stack.yaml, read the way CloudFormation resolves it (for a made-up account) -----------

ACCOUNT, REGION = "123456789012", "us-west-2"
STACK_PARAMETERS = {"Bucket": "example-bucket", "SshCidr": "203.0.113.7/32", "AmiId": "ami-0123456789abcdef0"}


@functools.cache
def stack() -> dict:
    return load_yaml(AWS_STACK)


def stack_parameter(name: str) -> str:
    return STACK_PARAMETERS.get(name) or stack()["Parameters"][name]["Default"]


def cfn_ref(name: str) -> str:
    if name == "AWS::Region":
        return REGION
    if name == "AWS::AccountId":
        return ACCOUNT
    if name in stack()["Parameters"]:
        return stack_parameter(name)
    kind = stack()["Resources"][name]["Type"]
    return {
        "AWS::IAM::ManagedPolicy": f"arn:aws:iam::{ACCOUNT}:policy/{name}",
        "AWS::SecretsManager::Secret": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{name}-AbCdEf",
    }.get(kind, f"{name}-id")


def cfn_getatt(name: str, attribute: str) -> str:
    resource = stack()["Resources"][name]
    kind = resource["Type"]
    if kind == "AWS::IAM::Role" and attribute == "Arn":
        return f"arn:aws:iam::{ACCOUNT}:role/{name}"
    if kind == "AWS::IAM::InstanceProfile" and attribute == "Arn":
        return f"arn:aws:iam::{ACCOUNT}:instance-profile/{name}"
    if kind == "AWS::ECR::Repository":
        repository = cfn(resource["Properties"]["RepositoryName"])
        return {"Arn": f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/{repository}",
                "RepositoryUri": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{repository}"}[attribute]
    if kind == "AWS::RDS::DBInstance" and attribute == "Endpoint.Address":
        return f"{name.lower()}.abcdefghijkl.{REGION}.rds.amazonaws.com"
    raise AssertionError(f"stack.yaml: no stand-in for {name}.{attribute}")


def cfn(node):
    """`node` with Ref, Fn::GetAtt and Fn::Sub resolved."""
    if isinstance(node, dict) and len(node) == 1 and next(iter(node)) in ("Ref", "Fn::GetAtt", "Fn::Sub"):
        ((function, argument),) = node.items()
        if function == "Ref":
            return cfn_ref(argument)
        if function == "Fn::GetAtt":
            return cfn_getatt(*argument)
        text, names = (argument, {}) if isinstance(argument, str) else argument

        def value(match: re.Match) -> str:
            name = match.group(1)
            if name in names:
                return cfn(names[name])
            return cfn_getatt(*name.split(".", 1)) if "." in name else cfn_ref(name)

        return re.sub(r"\$\{([\w:.]+)\}", value, text)
    if isinstance(node, dict):
        return {k: cfn(v) for k, v in node.items()}
    if isinstance(node, list):
        return [cfn(v) for v in node]
    return node


def aws_values() -> dict[str, str]:
    """What `aws cloudformation describe-stacks` would print as the stack's outputs."""
    return {name: cfn(output["Value"]) for name, output in stack()["Outputs"].items()}


def role_statements(role: str) -> list[dict]:
    """Every policy statement of a stack role: inline policies and attached managed policies of the stack."""
    properties = stack()["Resources"][role]["Properties"]
    documents = [policy["PolicyDocument"] for policy in properties.get("Policies", [])]
    for arn in properties.get("ManagedPolicyArns", []):
        (name,) = arn.values()
        documents.append(stack()["Resources"][name]["Properties"]["PolicyDocument"])
    return [cfn(statement) for document in documents for statement in document["Statement"]]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def allowed(statements: list[dict], action: str, resource: str, context: dict[str, str] | None = None) -> bool:
    """IAM's answer for one request, for Allow/Deny statements with wildcards and StringEquals conditions."""
    context = context or {}

    def matches(statement: dict) -> bool:
        if not any(fnmatch.fnmatch(action.lower(), a.lower()) for a in as_list(statement["Action"])):
            return False
        if not any(fnmatch.fnmatchcase(resource, r) for r in as_list(statement["Resource"])):
            return False
        for operator, conditions in statement.get("Condition", {}).items():
            assert operator == "StringEquals", f"no stand-in for condition {operator}"
            if any(context.get(key) not in as_list(value) for key, value in conditions.items()):
                return False
        return True

    matching = [s for s in statements if matches(s)]
    return any(s["Effect"] == "Allow" for s in matching) and not any(s["Effect"] == "Deny" for s in matching)


def rays_network_interface_handling():
    """Ray's own `_configure_from_network_interfaces` (what `ray up` does with NetworkInterfaces),
    lifted out of ray/autoscaler/_private/aws/config.py, which imports boto3 (not installed here)."""
    path = Path(ray.autoscaler.__file__).parent / "_private" / "aws" / "config.py"
    wanted = {"_configure_from_network_interfaces", "_configure_node_type_from_network_interface",
              "_configure_subnets_and_groups_from_network_interfaces", "_subnets_in_network_config",
              "_security_groups_in_network_config"}
    functions = [node for node in ast.parse(path.read_text()).body
                 if isinstance(node, ast.FunctionDef) and node.name in wanted]
    assert {f.name for f in functions} == wanted, "Ray moved its NetworkInterfaces handling"
    namespace = {"copy": copy, "itertools": itertools, **{n: getattr(typing, n) for n in ("Any", "Dict", "List")}}
    exec(compile(ast.Module(body=functions, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102 - Ray's code
    return namespace["_configure_from_network_interfaces"]


def instance_profile_role(arn: str) -> str:
    """The stack role behind an instance profile ARN of the stack's outputs."""
    (profile,) = [name for name, r in stack()["Resources"].items()
                  if r["Type"] == "AWS::IAM::InstanceProfile" and cfn_getatt(name, "Arn") == arn]
    (role,) = stack()["Resources"][profile]["Properties"]["Roles"]
    return role["Ref"]


# --- infra/gcp/setup.sh against a recording gcloud -----------------------------------------------------

GCP_SETTINGS = {"PROJECT": "example-project", "BUCKET": "example-bucket", "SSH_CIDR": "203.0.113.7/32"}
RECORDING_GCLOUD = r"""#!/usr/bin/env bash
printf '%s\x1f' "$@" >> "$GCLOUD_LOG"; printf '\n' >> "$GCLOUD_LOG"
case "$*" in
  *--data-file=-*) cat > "$GCLOUD_LOG.stdin" ;;
  "sql instances describe"*) echo 10.20.0.3 ;;
  "secrets versions access"*) printf 'from-secret-manager' ;;
esac
"""


def run_gcp_setup(folder: Path, **settings: str) -> tuple[subprocess.CompletedProcess, list[list[str]], str]:
    """setup.sh with `gcloud` recording its calls; (the run, the calls, what it piped to gcloud)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(RECORDING_GCLOUD)
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    log = folder / "gcloud.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(folder), "GCLOUD_LOG": str(log),
           **GCP_SETTINGS, **settings}
    done = subprocess.run(["bash", str(GCP_SETUP)], env=env, capture_output=True, text=True, timeout=120, check=False)
    calls = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()] if log.exists() else []
    piped = Path(f"{log}.stdin").read_text() if Path(f"{log}.stdin").exists() else ""
    return done, calls, piped


@functools.cache
def gcp_setup() -> tuple[list[list[str]], dict[str, str], str]:
    folder = Path(tempfile.mkdtemp(prefix="gcp-setup-"))
    done, calls, piped = run_gcp_setup(folder)
    assert done.returncode == 0, done.stderr
    values = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return calls, values, piped


def option(call: list[str], name: str) -> str | None:
    for argument in call:
        if argument.startswith(f"{name}="):
            return argument.split("=", 1)[1]
    return None


# --- the configs as deployed: placeholders filled ---------------------------------------------------

K8S_VALUES = {"RepositoryUri": "registry.example.com/deepemocluster", "BucketUri": "s3://example-bucket",
              "PodRoleArn": f"arn:aws:iam::{ACCOUNT}:role/deepemocluster-pods",
              "PodServiceAccount": "deepemocluster-pods@example-project.iam.gserviceaccount.com"}


def cloud_values(name: str) -> dict[str, str]:
    values = aws_values() if name == "aws" else gcp_setup()[1]
    return {**values, "GitCommit": COMMIT}


def rendered(path: Path, values: dict[str, str]) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(render.render(path.read_text(), values)) if doc is not None]


def cluster_config(name: str) -> dict:
    (config,) = rendered(CLUSTER_CONFIGS[name], cloud_values(name))
    return config


def prepared(name: str) -> dict:
    """A cluster config as `ray up` sees it: rendered, Ray's defaults merged in (prepare_config), validated."""
    config = prepare_config(cluster_config(name))
    validate_config(config)
    return config


def manifests(path: Path) -> list[dict]:
    return rendered(path, {**K8S_VALUES, "GitCommit": COMMIT})


# --- YAML and Ray's cluster-config validation ------------------------------------------------------


def test_every_yaml_under_infra_parses():
    files = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
    assert len(files) >= 9, files
    for path in files:
        documents = load_manifests(path)
        assert documents and all(isinstance(d, dict) for d in documents), f"{path}: not a YAML mapping"


def test_render_fills_every_placeholder_or_refuses():
    template = "image: \"{{RepositoryUri}}:{{GitCommit}}\"\nbucket: s3://{{Bucket}}/runs\n"
    values = {"RepositoryUri": "r.example.com/deepemocluster", "GitCommit": COMMIT, "Bucket": "b"}
    assert yaml.safe_load(render.render(template, values)) == {
        "image": f"r.example.com/deepemocluster:{COMMIT}", "bucket": "s3://b/runs"}
    with pytest.raises(render.RenderError, match="no value for Bucket"):
        render.render(template, {k: v for k, v in values.items() if k != "Bucket"})
    for reused in ("2.60.0-py311-gpu", "latest", COMMIT[:12]):  # tags that name more than one build
        with pytest.raises(render.RenderError, match="GitCommit"):
            render.render(template, {**values, "GitCommit": reused})
    with pytest.raises(yaml.YAMLError):
        render.render(template, {**values, "Bucket": "b\n  - broken: ["})
    # the command line: values files (AWS's tab-separated outputs, setup.sh's KEY=VALUE), then arguments
    folder = Path(tempfile.mkdtemp(prefix="render-"))
    (folder / "template.yaml").write_text(template)
    (folder / "values.txt").write_text("RepositoryUri\tr.example.com/deepemocluster\nBucket=from-file\n")
    done = subprocess.run([sys.executable, str(INFRA / "render.py"), str(folder / "template.yaml"),
                           "--values", str(folder / "values.txt"), f"GitCommit={COMMIT}", "Bucket=from-arg",
                           "-o", str(folder / "out" / "config.yaml")], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert load_yaml(folder / "out" / "config.yaml")["bucket"] == "s3://from-arg/runs"
    done = subprocess.run([sys.executable, str(INFRA / "render.py"), str(folder / "template.yaml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0 and "no value for" in done.stderr


def test_every_placeholder_has_a_source():
    """Each `ray up` config's placeholders are its cloud's outputs (plus the commit); every
    Kubernetes manifest's, the values infra/README.md lists for outputs/k8s.env."""
    assert render.placeholders(CLUSTER_CONFIGS["aws"].read_text()) - {"GitCommit"} <= set(stack()["Outputs"])
    assert render.placeholders(CLUSTER_CONFIGS["gcp"].read_text()) - {"GitCommit"} <= set(gcp_setup()[1])
    k8s = set().union(*(render.placeholders(p.read_text()) for p in (INFRA / "kuberay").glob("*.yaml")))
    assert k8s - {"GitCommit"} == set(K8S_VALUES)
    readme = README.read_text()
    assert all(f"{name}=" in readme for name in K8S_VALUES), "infra/README.md: the k8s.env values"


@pytest.mark.parametrize("name", sorted(CLUSTER_CONFIGS))
def test_cluster_config_passes_rays_validation(name):
    config = prepared(name)  # raises on a schema violation or a failed cross-check
    assert config["provider"]["type"] == name
    # Keys left out of the file take Ray's defaults, which pip-install a Ray nightly on every node:
    # the image has everything, so no node installs anything at start-up.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip install" in command for command in config[key]), (name, key, config[key])
    assert config["head_node_type"] in config["available_node_types"]


def gpu_worker(config: dict) -> dict:
    return config["available_node_types"]["gpu_worker"]


# breakage -> (how, the error Ray gives)
BROKEN = {
    "misspelt top-level key": (lambda c: c.update(max_worker=c.pop("max_workers")), "'max_worker' was unexpected"),
    "fractional GPU count": (lambda c: gpu_worker(c)["resources"].update(GPU=0.5), "0.5 is not of type 'integer'"),
    "unknown node-type key": (lambda c: gpu_worker(c).update(min_worker=0), "'min_worker' was unexpected"),
    "head type not defined": (lambda c: c.update(head_node_type="gpu"), "must be one of `available_node_types`"),
    "min workers above the global max": (lambda c: gpu_worker(c).update(min_workers=99), "smaller than the sum"),
}


@pytest.mark.parametrize("name", sorted(CLUSTER_CONFIGS))
@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_broken_cluster_config_fails_rays_validation(name, breakage):
    """The validation above can fail: broken copies of each config are refused, for the reason broken."""
    config = cluster_config(name)
    breaking, message = BROKEN[breakage]
    breaking(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_config(prepare_config(config))


GPU_TYPES = {"gpu_worker", "gpu_spot_worker"}


@pytest.mark.parametrize("name", sorted(CLUSTER_CONFIGS))
def test_gpu_worker_types_autoscale_from_zero(name):
    config = prepared(name)
    types = config["available_node_types"]
    assert {t for t, spec in types.items() if spec["resources"].get("GPU", 0) >= 1} == GPU_TYPES
    for gpu_type in GPU_TYPES:
        gpu = types[gpu_type]
        assert gpu["min_workers"] == 0 and 0 < gpu["max_workers"] <= config["max_workers"]
        assert gpu["docker"]["worker_run_options"] == ["--gpus all"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0  # a CPU head, no tasks
    for spec in types.values():  # every worker type can go back to 0
        assert spec.get("min_workers", 0) == 0


def training_demand(workers: int) -> list[dict]:
    """What a training job asks the autoscaler for: one bundle per Ray Train worker."""
    return [{"CPU": 4, "GPU": 1} for _ in range(workers)]


def nodes_ray_adds(node_types: dict, head_type: str, demand: list[dict]) -> dict[str, int]:
    """The node types Ray's (v1) autoscaler launches for `demand` on an empty cluster: its own code."""
    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    added, unfulfilled = get_nodes_for(node_types, {head_type: 1}, head_type, 8, demand, scorer)
    assert not unfulfilled, unfulfilled
    return {k: v for k, v in added.items() if v}


@pytest.mark.parametrize("name", sorted(CLUSTER_CONFIGS))
def test_spot_gpu_workers_fill_in_after_on_demand_ones(name):
    config = prepared(name)
    spot = config["available_node_types"]["gpu_spot_worker"]["node_config"]
    on_demand = config["available_node_types"]["gpu_worker"]["node_config"]
    if name == "aws":
        assert spot["InstanceMarketOptions"] == {"MarketType": "spot"} and "InstanceMarketOptions" not in on_demand
        assert spot["InstanceType"] == on_demand["InstanceType"]
    else:
        assert spot["scheduling"]["provisioningModel"] == "SPOT" and spot["scheduling"]["automaticRestart"] is False
        assert "provisioningModel" not in on_demand["scheduling"] and spot["machineType"] == on_demand["machineType"]
    types, head = config["available_node_types"], config["head_node_type"]
    assert nodes_ray_adds(types, head, training_demand(2)) == {"gpu_worker": 2}
    assert nodes_ray_adds(types, head, training_demand(6)) == {"gpu_worker": 4, "gpu_spot_worker": 2}
    spot_only = copy.deepcopy(types)
    spot_only["gpu_worker"]["max_workers"] = 0  # what infra/README.md tells a spot-only user to do
    assert nodes_ray_adds(spot_only, head, training_demand(2)) == {"gpu_spot_worker": 2}


@pytest.mark.parametrize("name", sorted(CLUSTER_CONFIGS))
def test_cluster_config_runs_mlflow_and_token_auth(name):
    config = prepared(name)
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    # The server script is the image's copy of infra/mlflow/serve.sh, on the head's own IP and the
    # port every node's MLFLOW_TRACKING_URI names.
    assert f"{IMAGE_HOME}/infra/mlflow/serve.sh" in head_start and SERVE_SCRIPT.is_file()
    assert "MLFLOW_PORT=5000" in head_start and "MLFLOW_HOST=$(python" in head_start
    assert "export MLFLOW_TRACKING_URI=http://$(python" in head_start and "):5000;" in head_start
    assert "export MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000;" in worker_start
    bucket = {"aws": "s3://", "gcp": "gs://"}[name]
    assert f"MLFLOW_ARTIFACTS_DESTINATION={bucket}example-bucket/mlflow" in head_start
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


# --- identity: registry login, roles --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CLUSTER_CONFIGS))
def test_nodes_log_docker_into_the_registry_before_the_pull(name):
    """Ray runs initialization_commands on the host, then pulls the image: the login must be there."""
    config = prepared(name)
    registry = config["docker"]["image"].split("/")[0]
    login = {"aws": f"aws ecr get-login-password --region {config['provider']['region']} | "
                    f"docker login --username AWS --password-stdin {registry}",
             "gcp": f"gcloud auth configure-docker {registry} --quiet"}[name]
    assert login in config["initialization_commands"], config["initialization_commands"]
    assert registry == cloud_values(name)["Registry"]


def test_aws_roles_allow_what_the_cluster_does_and_no_more():
    config = prepared("aws")
    types = config["available_node_types"]
    head_role = instance_profile_role(types["head"]["node_config"]["IamInstanceProfile"]["Arn"])
    worker_roles = {instance_profile_role(spec["node_config"]["IamInstanceProfile"]["Arn"])
                    for node_type, spec in types.items() if node_type != "head"}
    assert worker_roles == {"WorkerRole"} and head_role == "HeadRole"
    head, worker = role_statements("HeadRole"), role_statements("WorkerRole")
    worker_role_arn = cfn_getatt("WorkerRole", "Arn")
    # Launching workers: Ray's node provider calls RunInstances with the worker instance profile.
    assert allowed(head, "ec2:RunInstances", "*") and allowed(head, "ec2:CreateTags", "*")
    assert allowed(head, "iam:PassRole", worker_role_arn, {"iam:PassedToService": "ec2.amazonaws.com"})
    assert not allowed(head, "iam:PassRole", cfn_getatt("HeadRole", "Arn"), {"iam:PassedToService": "ec2.amazonaws.com"})
    instance = f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0123456789abcdef0"
    ours = {"ec2:ResourceTag/ray-cluster-name": config["cluster_name"]}
    for action in ("ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"):
        assert allowed(head, action, instance, ours)
        assert not allowed(head, action, instance, {"ec2:ResourceTag/ray-cluster-name": "someone-elses"})
    # Every node: the image from the stack's repository, the bucket and nothing else.
    repository = cfn_getatt("Repository", "Arn")
    for statements in (head, worker):
        assert allowed(statements, "ecr:GetAuthorizationToken", "*")
        for action in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"):
            assert allowed(statements, action, repository)
        assert allowed(statements, "s3:ListBucket", "arn:aws:s3:::example-bucket")
        for action in ("s3:GetObject", "s3:PutObject"):
            assert allowed(statements, action, "arn:aws:s3:::example-bucket/runs/run-1/checkpoint_000001/model.pt")
            assert not allowed(statements, action, "arn:aws:s3:::another-bucket/x")
        assert not allowed(statements, "ecr:PutImage", repository)
    # Only the head: the MLflow database's password.
    assert allowed(head, "secretsmanager:GetSecretValue", cfn_ref("DbSecret"))
    assert not allowed(worker, "secretsmanager:GetSecretValue", cfn_ref("DbSecret"))
    for action, resource in (("iam:PassRole", worker_role_arn), ("ec2:RunInstances", "*"),
                             ("ec2:TerminateInstances", instance)):
        assert not allowed(worker, action, resource, {"iam:PassedToService": "ec2.amazonaws.com", **ours})
    assert stack_parameter("ClusterName") == config["cluster_name"]
    assert stack()["Resources"]["Repository"]["Properties"]["ImageTagMutability"] == "IMMUTABLE"


def test_gcp_service_accounts_allow_what_the_cluster_does_and_no_more():
    calls, values, _ = gcp_setup()
    config = prepared("gcp")
    types = config["available_node_types"]
    head, worker = values["HeadServiceAccount"], values["WorkerServiceAccount"]
    assert [a["email"] for a in types["head"]["node_config"]["serviceAccounts"]] == [head]
    for node_type, spec in types.items():
        if node_type != "head":
            assert [a["email"] for a in spec["node_config"]["serviceAccounts"]] == [worker], node_type
    bindings = {(call[call.index("add-iam-policy-binding") + 1],  # the project, account, repository, bucket or secret
                 option(call, "--member").removeprefix("serviceAccount:"), option(call, "--role"))
                for call in calls if "add-iam-policy-binding" in call}
    project, bucket, secret = GCP_SETTINGS["PROJECT"], f"gs://{GCP_SETTINGS['BUCKET']}", "deepemocluster-mlflow-db"
    expected = {
        (project, head, "roles/compute.instanceAdmin.v1"),  # create and delete the workers
        (worker, head, "roles/iam.serviceAccountUser"),  # launch them as the worker account (actAs)
        ("deepemocluster", head, "roles/artifactregistry.reader"),
        ("deepemocluster", worker, "roles/artifactregistry.reader"),
        (bucket, head, "roles/storage.objectAdmin"),
        (bucket, worker, "roles/storage.objectAdmin"),
        (secret, head, "roles/secretmanager.secretAccessor"),
    }
    assert bindings == expected
    (repository,) = [c for c in calls if c[:3] == ["artifacts", "repositories", "create"]]
    assert "--immutable-tags" in repository and values["RepositoryUri"].startswith(f"{values['Registry']}/{project}/")


# --- network: SSH from one range, no public IP on workers, MLflow from the cluster only ---------------


def mlflow_binds_the_heads_private_address(config: dict) -> bool:
    """The MLflow server on the head's internal IP, which only cluster nodes reach (the network
    rules), never 0.0.0.0; the dashboard's 0.0.0.0 is behind the same rules."""
    head_start = " ".join(config["head_start_ray_commands"])
    return ("MLFLOW_HOST=$(python -c 'import ray.util; print(ray.util.get_node_ip_address())')" in head_start
            and "MLFLOW_HOST=0.0.0.0" not in head_start)


def test_aws_network_admits_ssh_from_the_users_range_only():
    config = prepared("aws")
    assert mlflow_binds_the_heads_private_address(config)
    resources = stack()["Resources"]
    cluster_sg = cfn_ref("ClusterSecurityGroup")
    ingress = [cfn(rule) for rule in resources["ClusterSecurityGroup"]["Properties"]["SecurityGroupIngress"]]
    ingress += [cfn(r["Properties"]) for r in resources.values()
                if r["Type"] == "AWS::EC2::SecurityGroupIngress" and cfn(r["Properties"]["GroupId"]) == cluster_sg]
    from_outside = [rule for rule in ingress if "CidrIp" in rule]
    assert from_outside == [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "CidrIp": STACK_PARAMETERS["SshCidr"]}]
    assert all(rule.get("SourceSecurityGroupId") == cluster_sg for rule in ingress if "CidrIp" not in rule)
    (rule,) = stack()["Rules"]["SshNotFromEverywhere"]["Assertions"]  # CloudFormation refuses 0.0.0.0/0
    assert rule["Assert"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "SshCidr"}, "0.0.0.0/0"]}]}
    db = resources["Db"]["Properties"]
    assert db["PubliclyAccessible"] is False and db["StorageEncrypted"] is True
    (db_rule,) = cfn(resources["DbSecurityGroup"]["Properties"]["SecurityGroupIngress"])
    assert db_rule["SourceSecurityGroupId"] == cluster_sg and db_rule["FromPort"] == db_rule["ToPort"] == 5432
    # Every node in the stack's group; workers without a public IP (Ray's own handling of the interfaces).
    bootstrapped = rays_network_interface_handling()(config)
    for node_type, spec in bootstrapped["available_node_types"].items():
        assert spec["node_config"]["SecurityGroupIds"] == [cluster_sg], node_type
        assert spec["node_config"]["SubnetIds"] == [cfn_ref("ClusterSubnet")], node_type
        interfaces = config["available_node_types"][node_type]["node_config"].get("NetworkInterfaces")
        if node_type == "head":
            assert interfaces is None  # the subnet's public IP: `ray up` reaches it over SSH
        else:
            assert [i["AssociatePublicIpAddress"] for i in interfaces] == [False], node_type
    # ... which then reach ECR and S3 through endpoints in the cluster's VPC.
    endpoints = {cfn(r["Properties"]["ServiceName"]) for r in resources.values() if r["Type"] == "AWS::EC2::VPCEndpoint"}
    assert endpoints == {f"com.amazonaws.{REGION}.{s}" for s in ("s3", "ecr.api", "ecr.dkr")}


def test_gcp_network_admits_ssh_from_the_users_range_only():
    calls, values, _ = gcp_setup()
    rules = [c for c in calls if c[:3] == ["compute", "firewall-rules", "create"]]
    summary = sorted((option(c, "--rules"), option(c, "--source-ranges"), option(c, "--source-tags"),
                      option(c, "--target-tags"), option(c, "--network")) for c in rules)
    network, node, head = values["NodeTag"], values["NodeTag"], values["HeadTag"]
    assert summary == [("all", None, node, node, network), ("tcp:22", GCP_SETTINGS["SSH_CIDR"], None, head, network)]
    (subnet,) = [c for c in calls if c[:4] == ["compute", "networks", "subnets", "create"]]
    assert "--enable-private-ip-google-access" in subnet  # workers pull and read buckets without external IPs
    (sql,) = [c for c in calls if c[:3] == ["sql", "instances", "create"]]
    assert "--no-assign-ip" in sql and option(sql, "--ssl-mode") == "ENCRYPTED_ONLY"
    config = prepared("gcp")
    assert mlflow_binds_the_heads_private_address(config)
    for node_type, spec in config["available_node_types"].items():
        (interface,) = spec["node_config"]["networkInterfaces"]
        assert interface["subnetwork"] == values["Subnetwork"]
        assert node in spec["node_config"]["tags"]["items"]
        has_external_ip = bool(interface.get("accessConfigs"))
        assert has_external_ip == (node_type == "head") == (head in spec["node_config"]["tags"]["items"]), node_type
    done, calls, _ = run_gcp_setup(Path(tempfile.mkdtemp(prefix="gcp-setup-")), SSH_CIDR="0.0.0.0/0")
    assert done.returncode != 0 and calls == []


# --- images and versions ---------------------------------------------------------------------------


def project_images() -> dict[str, list[str]]:
    """Every image reference in the configs and manifests as written in git, by file."""
    found = {}
    for path in CLUSTER_CONFIGS.values():
        docker = load_yaml(path)["docker"]
        found[str(path)] = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    for path in (RAYCLUSTER, RAYJOB, MLFLOW_MANIFEST):
        found[str(path)] = [image for doc in load_manifests(path) for image in walk(doc, "image")]
    return found


def test_images_are_tagged_by_commit():
    """The tag is the commit the image was built from, in a repository whose tags are immutable (the
    AWS and GCP tests above): a run's image names one build. The Ray pin is the base image's."""
    images = [image for tags in project_images().values() for image in tags]
    ours = [image for image in images if image == PROJECT_IMAGE]
    others = [image for image in images if image != PROJECT_IMAGE]
    assert len(ours) >= 8, images
    assert others == ["postgres:17.6"], others  # third-party images pinned to a release, never `latest`
    for doc in load_manifests(RAYCLUSTER):
        assert doc["spec"]["rayVersion"] == RAY_VERSION
    text = DOCKERFILE.read_text()
    assert f"ENV {tracking.COMMIT_ENV}=$GIT_COMMIT" in text and f"{tracking.IMAGE_ENV}=${{IMAGE" in text
    assert "LABEL org.opencontainers.image.revision=$GIT_COMMIT" in text
    (check,) = re.findall(r"^RUN (echo \"\$GIT_COMMIT\".*?)$", text.replace("\\\n", ""), flags=re.MULTILINE)
    for commit, ok in ((COMMIT, True), ("", False), ("latest", False), (RAY_VERSION, False)):
        done = subprocess.run(["sh", "-c", check], env={"GIT_COMMIT": commit, "PATH": os.environ["PATH"]},
                              capture_output=True, timeout=30, check=False)
        assert (done.returncode == 0) == ok, (commit, done.stderr)
    readme = README.read_text()
    assert "export GIT_COMMIT=$(git rev-parse HEAD)" in readme
    assert "--build-arg GIT_COMMIT" in readme and ":$GIT_COMMIT" in readme


def test_dockerfile_builds_on_the_pinned_ray_image():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert base == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu"
    versions = pins()
    assert f'"torch=={versions["torch"]}"' in text  # the same torch, a CUDA build (PyPI's Linux wheel)
    # faiss from the gpu extra alone (the cpu extra's faiss-cpu installs the same module), editable:
    # the code reads configs/ beside it
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert 'pip install --no-cache-dir -e ".[gpu]"' in text and any(r.startswith("faiss-gpu") for r in extras["gpu"])
    assert not [line for line in text.splitlines() if "faiss-cpu" in line and not line.startswith("#")]
    assert f"ray.__version__ == '{RAY_VERSION}'" in text
    # Every COPY source exists and gets through the build-context allow-list; data never does.
    ignore = [line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the ignore file is an allow-list: it starts by excluding everything"
    allowed_paths = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = [s for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, flags=re.MULTILINE)
               for s in line.split()[:-1]]
    assert sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert source.split("/")[0] in allowed_paths, f"COPY {source}: excluded by Dockerfile.dockerignore"
    assert not {"data", "outputs", "runs", "mlruns", ".venv"} & allowed_paths
    for line in (DOCKERFILE.parent / "requirements-cloud.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert len(Requirement(line).specifier) == 1 and "==" in line, f"unpinned: {line}"


def test_image_paths_used_by_configs_are_copied_into_the_image():
    """A path under the image's project folder in any config is a file that the Dockerfile copies."""
    copied = {s.split("/")[0] for s in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)", DOCKERFILE.read_text(), re.MULTILINE)}
    texts = "\n".join(p.read_text() for p in INFRA.rglob("*.yaml"))
    paths = set(re.findall(rf"{IMAGE_HOME}/([\w./-]+\.\w+)", texts))
    assert {"infra/mlflow/serve.sh", "infra/logs/ship_logs.py"} <= paths
    for path in paths:
        assert (REPO_ROOT / path).is_file() and path.split("/")[0] in copied, path


# --- jobs named by configs and the README ----------------------------------------------------------

JOB_SCRIPT = re.compile(r"^jobs/[\w-]+\.py$")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh)\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def shell_lines(text: str) -> list[str]:
    """Logical lines: backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def readme_env() -> dict[str, str]:
    """The README's `export NAME=value` settings, to expand $NAME in its commands."""
    env = {}
    for block in code_blocks(README.read_text()):
        for line in shell_lines(block):
            if match := re.match(r"\s*export\s+(\w+)=(\S+)\s*(#.*)?$", line):
                env[match.group(1)] = match.group(2)
    return env


def job_commands(text: str, env: dict[str, str]) -> list[list[str]]:
    """Each `python jobs/X.py args...` in a shell text, as [script, args...] (args up to && ; |)."""
    commands = []
    for line in shell_lines(text):
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), line)
        if "jobs/" not in line:
            continue
        tokens = shlex.split(line, comments=True)
        for i, token in enumerate(tokens):
            if JOB_SCRIPT.match(token) and i > 0 and tokens[i - 1] in ("python", "python3"):
                args = []
                for arg in tokens[i + 1:]:
                    if arg in SHELL_OPERATORS:
                        break
                    args.append(arg)
                commands.append([token, *args])
    return commands


def config_and_overrides(argv: list[str]) -> tuple[Path, list[str]]:
    script, *args = argv
    assert args[:1] == ["--config"], f"{script}: expected --config FILE first, got {args}"
    config, overrides = REPO_ROOT / args[1], args[2:]
    assert config.is_file(), f"{script}: config {args[1]} does not exist"
    assert all("=" in o and not o.startswith("-") for o in overrides), overrides
    return config, overrides


def check_job_command(argv: list[str]) -> object:
    """The script exists; for prep, train and evaluate its arguments load with the job's own code."""
    script = argv[0]
    assert (REPO_ROOT / script).is_file(), f"{script} does not exist"
    if script == "jobs/train.py":
        return load_train_config(*config_and_overrides(argv))
    if script == "jobs/prep.py":
        return load_config(PrepConfig, *config_and_overrides(argv))
    if script == "jobs/evaluate.py":
        module = load_module(REPO_ROOT / script)
        return module.parse_args(argv[1:])
    return None


def cluster_commands() -> list[list[str]]:
    """The jobs meant to run on a cluster: the RayJob's entrypoint and every command of the README."""
    (rayjob,) = manifests(RAYJOB)
    commands = job_commands(rayjob["spec"]["entrypoint"], {})
    env = readme_env()
    for block in code_blocks(README.read_text()):
        commands += job_commands(block, env)
    return commands


def test_every_job_named_in_infra_exists():
    texts = [p.read_text() for p in (*INFRA.rglob("*.yaml"), README, DOCKERFILE)]
    named = set(re.findall(r"\bjobs/[a-z_][a-z0-9_]*\.py\b", "\n".join(texts)))  # jobs/X.py: a placeholder
    assert {"jobs/prep.py", "jobs/train.py", "jobs/evaluate.py"} <= named
    missing = sorted(n for n in named if not (REPO_ROOT / n).is_file())
    assert not missing, f"infra/ names jobs that do not exist: {missing}"


def test_job_commands_load_with_the_projects_config_code():
    commands = cluster_commands()
    scripts = [c[0] for c in commands]
    assert scripts.count("jobs/train.py") >= 3 and "jobs/prep.py" in scripts and "jobs/evaluate.py" in scripts
    for argv in commands:
        check_job_command(argv)  # raises ConfigError / SystemExit naming the bad key or argument


def test_cluster_jobs_use_shared_storage():
    """On several nodes checkpoints and data must be in a bucket, not on one node's disk."""
    for argv in cluster_commands():
        loaded = check_job_command(argv)
        if argv[0] == "jobs/train.py":
            assert loaded.storage_path.startswith(("s3://", "gs://")), argv
            assert loaded.data.dataset.startswith(("s3://", "gs://")), argv
            assert loaded.scaling.use_gpu and loaded.scaling.num_workers >= 2, argv
        if argv[0] == "jobs/prep.py":
            assert loaded.output.startswith(("s3://", "gs://")), argv
            assert all(s.path.startswith(("s3://", "gs://")) for s in loaded.sources), argv


def test_training_on_a_cluster_resumes_after_a_lost_worker():
    """Spot nodes are reclaimed: every cluster training command restarts from its last checkpoint."""
    trainings = [check_job_command(argv) for argv in cluster_commands() if argv[0] == "jobs/train.py"]
    assert trainings and all(config.scaling.max_failures > 0 for config in trainings)


def ray_job_submissions() -> list[list[str]]:
    submissions = []
    for block in code_blocks(README.read_text()):
        for line in shell_lines(block):
            if line.lstrip().startswith("ray job submit"):
                submissions.append(shlex.split(line, comments=True))
    return submissions


def test_readme_submissions_pass_rays_runtime_env_parser_and_name_their_commit():
    submissions = ray_job_submissions()
    assert len(submissions) >= 4
    for tokens in submissions:
        options = tokens[3:tokens.index("--")]
        runtime_env = options[options.index("--runtime-env") + 1] if "--runtime-env" in options else None
        runtime_env_json = options[options.index("--runtime-env-json") + 1] if "--runtime-env-json" in options else None
        parse_runtime_env_args(runtime_env=str(REPO_ROOT / runtime_env) if runtime_env else None,
                               runtime_env_json=runtime_env_json)  # Ray refuses both at once
        assert runtime_env == "infra/runtime_env.yaml", tokens
        entrypoint = tokens[tokens.index("--") + 1:]
        assert entrypoint[:2] == ["env", f"{tracking.COMMIT_ENV}=$GIT_COMMIT"], entrypoint
    # runtime_env.yaml is always given, so --runtime-env-json can never be added: no advice to do so.
    assert "--runtime-env-json" not in README.read_text()


def test_a_broken_command_is_caught():
    """The command checks above can fail: a misspelt key and a missing job are errors."""
    with pytest.raises(ConfigError, match="scaling.use_gpus"):
        check_job_command(["jobs/train.py", "--config", "configs/train/ravdess_full.yaml", "scaling.use_gpus=true"])
    with pytest.raises(AssertionError, match="does not exist"):
        check_job_command(["jobs/no_such_job.py"])


# --- KubeRay -----------------------------------------------------------------------------------------


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def ray_groups(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]


def env_of(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@functools.cache
def kuberay_schemas() -> dict:
    return json.loads(gzip.decompress(KUBERAY_SCHEMAS.read_bytes()))


def strict(schema):
    """kubectl's default field validation: fields a schema does not declare are errors."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def kuberay_errors(doc: dict) -> list[str]:
    schema = strict(copy.deepcopy(kuberay_schemas()[doc["kind"]]))
    return [f"{list(e.absolute_path)}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifests_pass_kuberays_crd_schema(path):
    (doc,) = manifests(path)
    assert "kuberay v1.7.0" in kuberay_schemas()["source"]
    assert kuberay_errors(doc) == []

    def cluster_spec(d: dict) -> dict:
        return d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"]

    for breaking, message in (  # the check can fail, for the reason broken
        (lambda d: cluster_spec(d)["headGroupSpec"]["template"]["spec"].update(serviceAcountName="x"),
         "'serviceAcountName' was unexpected"),
        (lambda d: cluster_spec(d)["workerGroupSpecs"][0].update(minReplicas="0"), "'0' is not of type 'integer'"),
        (lambda d: d["spec"].update(shutdownAfterJobFinish=True), "'shutdownAfterJobFinish' was unexpected"),
    ):
        broken = copy.deepcopy(doc)
        breaking(broken)
        assert any(message in error for error in kuberay_errors(broken)), (message, kuberay_errors(broken))


RAYSERVICE = INFRA / "kuberay" / "rayservice.yaml"
SERVE_CONFIG = INFRA / "serve" / "serve_config.yaml"


def serve_configs() -> dict[str, dict]:
    """The Serve configs: `serve deploy`'s for ray up clusters and the RayService's serveConfigV2."""
    (service,) = manifests(RAYSERVICE)
    return {"serve_config.yaml": load_yaml(SERVE_CONFIG), "rayservice.yaml": yaml.safe_load(service["spec"]["serveConfigV2"])}


def test_serve_configs_pass_serves_schema_and_build_the_endpoint():
    from ray.serve.schema import ServeDeploySchema

    from cluster_train.serve import endpoint

    for where, config in serve_configs().items():
        ServeDeploySchema.parse_obj(config)  # what `serve deploy` and KubeRay submit it to
        (application,) = config["applications"]
        assert application["import_path"] == "cluster_train.serve.endpoint:app_builder", where
        assert application["args"]["model"] == "models:/deepemocluster@champion", where
        built = endpoint.app_builder(application["args"])  # every arg an EndpointConfig field with a valid value
        autoscaling = built._bound_deployment._deployment_config.autoscaling_config
        assert 1 <= autoscaling.min_replicas < autoscaling.max_replicas == application["args"]["max_replicas"], where
    assert serve_configs()["serve_config.yaml"]["http_options"]["host"] == "127.0.0.1"  # an SSH tunnel reaches it
    with pytest.raises(TypeError, match="max_batch"):  # the check can fail: a mistyped arg
        endpoint.app_builder({**serve_configs()["serve_config.yaml"]["applications"][0]["args"], "max_batch": 4})
    with pytest.raises(Exception, match="applications"):
        ServeDeploySchema.parse_obj({"applications": "emotion"})


def test_rayservice_cluster_passes_kuberays_raycluster_schema():
    (service,) = manifests(RAYSERVICE)
    (cluster,) = manifests(RAYCLUSTER)
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    # the bundled CRD schemas have no RayService: its cluster is checked as the RayCluster spec it is
    assert "RayService" not in kuberay_schemas()
    assert set(service["spec"]) == {"serveConfigV2", "rayClusterConfig"}
    spec = service["spec"]["rayClusterConfig"]
    as_cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "serve"}, "spec": spec}
    assert kuberay_errors(as_cluster) == []
    broken = copy.deepcopy(as_cluster)
    broken["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert any("'maxReplica' was unexpected" in e for e in kuberay_errors(broken))
    assert spec["rayVersion"] == cluster["spec"]["rayVersion"] and spec["authOptions"] == {"mode": "token"}
    images = {c["image"] for group in ray_groups(spec) for c in containers(group["template"])}
    assert images == {containers(cluster["spec"]["headGroupSpec"]["template"])[0]["image"]}
    for group in ray_groups(spec):
        ray = containers(group["template"])[0]
        assert env_of(ray)["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert group["template"]["spec"]["serviceAccountName"] == "deepemocluster"
    (workers,) = spec["workerGroupSpecs"]
    assert workers["minReplicas"] >= 1 and workers["maxReplicas"] > workers["minReplicas"]
    replica_cpus = serve_configs()["rayservice.yaml"]["applications"][0]["args"]["num_cpus"]
    assert int(containers(workers["template"])[0]["resources"]["requests"]["cpu"]) >= replica_cpus


def test_raycluster_autoscales_gpu_workers_from_zero():
    (cluster,) = manifests(RAYCLUSTER)
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert not any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in containers(head["template"]))
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers(g["template"]))]
    assert [g["groupName"] for g in gpu_groups] == ["gpu", "gpu-spot"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 == group["replicas"] and group["maxReplicas"] > 0, group["groupName"]
    for group in gpu_groups:
        worker = containers(group["template"])[0]  # KubeRay's Ray container is the first
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == "1"


def test_kuberay_spot_group_lands_on_spot_nodes_after_the_on_demand_group():
    (cluster,) = manifests(RAYCLUSTER)
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    terms = groups["gpu-spot"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    labels = {(e["key"], tuple(e["values"])) for term in terms for e in term["matchExpressions"]}
    assert ("eks.amazonaws.com/capacityType", ("SPOT",)) in labels and ("cloud.google.com/gke-spot", ("true",)) in labels
    assert "affinity" not in groups["gpu"]["template"]["spec"]
    cluster["metadata"]["namespace"] = "default"
    config = _derive_autoscaling_config_from_ray_cr(cluster)  # what Ray's autoscaler makes of the CR
    types, head = config["available_node_types"], config["head_node_type"]
    assert nodes_ray_adds(types, head, training_demand(2)) == {"gpu": 2}
    assert nodes_ray_adds(types, head, training_demand(6)) == {"gpu": 4, "gpu-spot": 2}


def pod_templates() -> dict[str, dict]:
    """Every pod template that runs the project image, by where it is."""
    templates = {}
    (cluster,) = manifests(RAYCLUSTER)
    (job,) = manifests(RAYJOB)
    for name, spec in (("raycluster", cluster["spec"]), ("rayjob", job["spec"]["rayClusterSpec"])):
        for group in ray_groups(spec):
            templates[f"{name}:{group.get('groupName', 'head')}"] = group["template"]
    for doc in manifests(MLFLOW_MANIFEST):
        if doc["kind"] in ("Deployment", "StatefulSet"):
            templates[f"mlflow.yaml:{doc['metadata']['name']}"] = doc["spec"]["template"]
    return templates


def test_every_pod_reaches_the_bucket_through_the_service_account():
    """IRSA (EKS) and Workload Identity (GKE) give cloud credentials to the pods of a ServiceAccount."""
    annotations = {}
    for cloud, path in SERVICE_ACCOUNTS.items():
        (account,) = manifests(path)
        assert account["kind"] == "ServiceAccount"
        annotations[cloud] = (account["metadata"]["name"], account["metadata"]["annotations"])
    assert annotations["eks"] == ("deepemocluster", {"eks.amazonaws.com/role-arn": K8S_VALUES["PodRoleArn"]})
    assert annotations["gke"] == ("deepemocluster", {"iam.gke.io/gcp-service-account": K8S_VALUES["PodServiceAccount"]})
    templates = pod_templates()
    assert len(templates) == 10
    for where, template in templates.items():
        if where == "mlflow.yaml:mlflow-db":  # Postgres needs no cloud access, nor the Kubernetes API
            assert "serviceAccountName" not in template["spec"] and template["spec"]["automountServiceAccountToken"] is False
        else:
            assert template["spec"].get("serviceAccountName") == "deepemocluster", where


def test_every_ray_pod_ships_its_logs_and_has_room_for_the_object_store():
    """Logs outlive pods the autoscaler removes; the head has /dev/shm and disk to spill objects to."""
    for where, template in pod_templates().items():
        if where.startswith("mlflow.yaml"):
            continue
        ray, shipper = containers(template)
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in ray["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where
        tmp = volumes[mounts["/tmp/ray"]]["emptyDir"]
        assert "medium" not in tmp and tmp["sizeLimit"], where  # on disk: spilled objects, logs
        assert "ephemeral-storage" in ray["resources"]["requests"], where
        assert shipper["command"][:3] == ["python", f"{IMAGE_HOME}/infra/logs/ship_logs.py", "/tmp/ray"], where
        assert shipper["command"][3] == f"{K8S_VALUES['BucketUri']}/logs/$(RAY_CLUSTER)/$(POD_NAME)"
        assert {m["mountPath"]: m["name"] for m in shipper["volumeMounts"]} == {"/tmp/ray": mounts["/tmp/ray"]}
        assert env_of(shipper)["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}


@pytest.mark.parametrize("name", sorted(CLUSTER_CONFIGS))
def test_every_node_of_a_ray_up_cluster_ships_its_logs(name):
    config = prepared(name)
    bucket = {"aws": "s3", "gcp": "gs"}[name]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (command,) = [c for c in config[key] if "ship_logs.py" in c]
        assert f"python {IMAGE_HOME}/infra/logs/ship_logs.py /tmp/ray {bucket}://example-bucket/logs/" in command
        assert command.index("nohup") < command.index("ship_logs.py") and "&" in command


def test_rayjob_runs_on_a_cluster_of_its_own_and_cleans_up():
    (job,) = manifests(RAYJOB)
    (cluster,) = manifests(RAYCLUSTER)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    # A selected cluster is never deleted by the RayJob; one of its own goes when the job ends.
    assert "clusterSelector" not in spec and spec["rayClusterSpec"] == cluster["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert 0 < spec["activeDeadlineSeconds"] <= 7 * 86400
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith(f"cd {IMAGE_HOME} &&")  # the image's copy of the project
    (command,) = job_commands(entrypoint, {})
    assert command[0] == "jobs/train.py"
    config = check_job_command(command)
    assert config.scaling.use_gpu and config.storage_path.startswith("s3://") and config.scaling.max_failures > 0


def mlflow_manifest() -> tuple[dict, dict, dict]:
    """infra/kuberay/mlflow.yaml's Service `mlflow`, its server container's environment and the docs by kind/name."""
    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests(MLFLOW_MANIFEST)}
    (container,) = containers(docs["Deployment", "mlflow"]["spec"]["template"])
    assert container["command"] == ["bash", f"{IMAGE_HOME}/infra/mlflow/serve.sh"]
    return docs["Service", "mlflow"], env_of(container), docs


def mlflow_service_uri() -> str:
    service, env, _ = mlflow_manifest()
    (port,) = service["spec"]["ports"]
    assert str(port["port"]) == env["MLFLOW_PORT"] and port["targetPort"] == "http"
    return f"http://{service['metadata']['name']}:{port['port']}"


def mlflow_allowed_hosts() -> str:
    return mlflow_manifest()[1]["MLFLOW_SERVER_ALLOWED_HOSTS"]


def test_every_ray_container_points_at_the_mlflow_service():
    uri = mlflow_service_uri()
    assert uri == "http://mlflow:5000"
    for where, template in pod_templates().items():
        if not where.startswith("mlflow.yaml"):
            assert env_of(containers(template)[0])["MLFLOW_TRACKING_URI"] == uri, where


def test_mlflow_service_name_passes_the_servers_host_check():
    """MLflow's own Host-header check (its default allows localhost and private IPs only)."""
    allowed_hosts = mlflow_allowed_hosts().split(",")
    host = urlsplit(mlflow_service_uri()).netloc
    for ok in (host, "mlflow", "mlflow.default.svc.cluster.local:5000", "127.0.0.1:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed_hosts, ok), ok
    assert not is_allowed_host_header(allowed_hosts, "attacker.example.com:5000")


def test_kubernetes_mlflow_keeps_its_runs_in_postgres_and_admits_ray_pods_only():
    _, env, docs = mlflow_manifest()
    assert env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://mlflow@mlflow-db:5432/mlflow"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == f"{K8S_VALUES['BucketUri']}/mlflow"
    secret_file = env["MLFLOW_DB_PASSWORD_SECRET"].removeprefix("file:")
    server = docs["Deployment", "mlflow"]["spec"]["template"]["spec"]
    db = docs["StatefulSet", "mlflow-db"]
    for pod, path in ((server, secret_file), (db["spec"]["template"]["spec"],
                                              env_of(containers(db["spec"]["template"])[0])["POSTGRES_PASSWORD_FILE"])):
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for c in pod["containers"] for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
        assert volumes[mount["name"]]["secret"] == {"secretName": "mlflow-db"} and mount["readOnly"] is True
    assert db["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert docs["Service", "mlflow-db"]["spec"]["selector"] == db["spec"]["selector"]["matchLabels"]
    assert not [d for d in docs if d[0] == "Secret"]  # made with kubectl from a generated password
    policies = {name: d["spec"] for (kind, name), d in docs.items() if kind == "NetworkPolicy"}
    assert policies["mlflow"]["ingress"] == [{
        "from": [{"podSelector": {"matchExpressions": [{"key": "ray.io/cluster", "operator": "Exists"}]}}],
        "ports": [{"port": 5000, "protocol": "TCP"}]}]
    assert policies["mlflow-db"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app": "mlflow"}}}],
                                                 "ports": [{"port": 5432, "protocol": "TCP"}]}]


# --- MLflow on `ray up` clusters: a database that outlives the head, its password from a secret store ---


@pytest.mark.parametrize("name", sorted(CLUSTER_CONFIGS))
def test_ray_up_mlflow_keeps_its_runs_in_postgres_or_on_the_heads_disk(name):
    config = prepared(name)
    values = cloud_values(name)
    head_start = " ".join(config["head_start_ray_commands"])
    (server_dir,) = re.findall(r"MLFLOW_SERVER_DIR=(\S+)", head_start)
    mounts = [option.split()[1].split(":") for option in config["docker"]["head_run_options"]]
    assert [host for host, container in mounts if container == server_dir] == ["/var/lib/deepemocluster/mlflow"]
    assert "sudo install -d -o 1000 -g 100 /var/lib/deepemocluster/mlflow" in config["initialization_commands"]
    host = values["DbEndpoint"] if name == "aws" else values["DbHost"]
    assert f"MLFLOW_BACKEND_STORE_URI='postgresql://mlflow@{host}:5432/mlflow?sslmode=require'" in head_start
    secret = {"aws": f"aws-secretsmanager:{values.get('DbSecretArn')}",
              "gcp": f"gcp-secretmanager:{values.get('DbPasswordSecret')}"}[name]
    assert f"MLFLOW_DB_PASSWORD_SECRET={secret}" in head_start


def test_aws_database_password_is_generated_into_secrets_manager():
    resources = stack()["Resources"]
    generated = resources["DbSecret"]["Properties"]["GenerateSecretString"]
    assert generated["GenerateStringKey"] == "password" and json.loads(generated["SecretStringTemplate"]) == {
        "username": resources["Db"]["Properties"]["MasterUsername"]}
    assert resources["Db"]["Properties"]["MasterUserPassword"] == {
        "Fn::Sub": "{{resolve:secretsmanager:${DbSecret}:SecretString:password}}"}


def test_gcp_database_password_goes_from_openssl_to_secret_manager_only():
    calls, values, piped = gcp_setup()
    assert re.fullmatch(r"[0-9a-f]{48}", piped)  # `openssl rand -hex 24`, piped, never an argument
    assert not any(piped in argument for call in calls for argument in call)
    (create,) = [c for c in calls if c[:2] == ["secrets", "create"]]
    assert create[2] == values["DbPasswordSecret"].rsplit("/", 1)[1] and "--data-file=-" in create
    (user,) = [c for c in calls if c[:3] == ["sql", "users", "create"]]
    assert option(user, "--password") == "from-secret-manager"  # read back from Secret Manager


PASSWORD_IN_URI = re.compile(r"\b[a-z0-9+]+://[^\s/@:'\"]+:[^\s/@'\"]+@")


def test_no_password_in_infra():
    """Database passwords live in secret stores; a URI with a password, a password value or a
    Kubernetes Secret with data is never in git."""
    texts = {p: p.read_text() for p in INFRA.rglob("*") if p.is_file() and p.suffix in (".yaml", ".sh", ".md", ".py", ".txt")}
    assert len(texts) >= 15
    for path, text in texts.items():
        assert not PASSWORD_IN_URI.search(text), (path, PASSWORD_IN_URI.search(text).group(0))
        assert not re.search(r"PGPASSWORD=[^$\s\"]", text), path
        assert not re.search(r"POSTGRES_PASSWORD\b(?!_FILE)", text), path
        if path.suffix == ".yaml":
            assert not any(doc.get("kind") == "Secret" for doc in load_manifests(path)), path
    assert PASSWORD_IN_URI.search("postgresql://mlflow:hunter2@db:5432/mlflow")  # the check can fail


def serve(folder: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str], dict[str, str]]:
    """infra/mlflow/serve.sh with an `mlflow` that records its arguments and environment."""
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / "mlflow"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$STUB_OUT.argv"\nenv -0 > "$STUB_OUT.env"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    base = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(folder),
            "MLFLOW_BIN": str(stub), "MLFLOW_SERVER_DIR": str(folder / "server"), "STUB_OUT": str(folder / "out")}
    done = subprocess.run(["bash", str(SERVE_SCRIPT)], env={**base, **env}, capture_output=True, text=True, timeout=60, check=False)
    argv_file, env_file = folder / "out.argv", folder / "out.env"
    argv = argv_file.read_text().splitlines() if argv_file.exists() else []
    child_env = dict(e.split("=", 1) for e in env_file.read_text().split("\0") if e) if env_file.exists() else {}
    return done, argv, child_env


def test_serve_sh_reads_the_database_password_from_a_secret_never_the_command_line(tmp_path):
    done, argv, env = serve(tmp_path / "sqlite")
    assert done.returncode == 0, done.stderr
    assert argv[argv.index("--workers") + 1] == "1"  # one writer on sqlite: no "database is locked" between workers
    assert env["MLFLOW_BACKEND_STORE_URI"] == f"sqlite:///{tmp_path / 'sqlite' / 'server'}/mlflow.db"

    password = "s3cr3t-from-the-store"
    (tmp_path / "password").write_text(password + "\n")  # a mounted Kubernetes Secret
    (tmp_path / "rds.json").write_text(json.dumps({"username": "mlflow", "password": "from-json"}))
    postgres = "postgresql://mlflow@db.internal:5432/mlflow?sslmode=require"
    for secret, expected in (("password", password), ("rds.json", "from-json")):
        done, argv, env = serve(tmp_path / f"run-{secret}", MLFLOW_BACKEND_STORE_URI=postgres,
                                MLFLOW_DB_PASSWORD_SECRET=f"file:{tmp_path / secret}")
        assert done.returncode == 0, done.stderr
        assert env["PGPASSWORD"] == expected and env["MLFLOW_BACKEND_STORE_URI"] == postgres  # libpq reads PGPASSWORD
        assert not any(expected in argument for argument in argv) and expected not in done.stderr
        assert argv[argv.index("--workers") + 1] == "2"

    done, argv, _ = serve(tmp_path / "in-uri", MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:hunter2@db:5432/mlflow")
    assert done.returncode == 2 and "holds a password" in done.stderr and argv == []
    done, argv, _ = serve(tmp_path / "unknown", MLFLOW_BACKEND_STORE_URI=postgres, MLFLOW_DB_PASSWORD_SECRET="vault:x")
    assert done.returncode != 0 and argv == []


def test_db_password_reads_the_secret_formats_of_both_clouds():
    db_password = load_module(INFRA / "mlflow" / "db_password.py")
    assert db_password.password_from_secret('{"username": "mlflow", "password": "p@ss"}') == "p@ss"  # stack.yaml's
    assert db_password.password_from_secret("plain-password\n") == "plain-password"  # setup.sh's
    assert set(db_password.READERS) == {"aws-secretsmanager", "gcp-secretmanager", "file"}


# --- what `ray job submit` uploads -------------------------------------------------------------------


def test_runtime_env_keeps_data_out_of_the_upload(tmp_path):
    env = load_yaml(INFRA / "runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    package = tmp_path / "working_dir.zip"
    _zip_files(str(REPO_ROOT), env["excludes"], str(package), include_gitignore=True)  # what Ray uploads
    names = zipfile.ZipFile(package).namelist()
    tops = {name.split("/")[0] for name in names}
    assert not tops & {"data", "outputs", "runs", "mlruns", ".git", ".venv", "mlflow-server", "docs", "tests"}, tops
    assert not any(name.endswith(".db") for name in names)
    for needed in ("jobs/train.py", "jobs/prep.py", "cluster_train/train/loop.py", "data_prep/pipeline.py",
                   "configs/train/ravdess_full.yaml", "pyproject.toml", "configs/logging/ray_data_quiet.yaml"):
        assert needed in names, needed  # the quiet logging config travels with the job
    # The driver points Ray at it by its absolute path (console.ray_env); a relative path here is not
    # found by Ray Data's processes, and a key set here too makes the driver's ray.init refuse to merge.
    assert not {"RAY_DATA_LOGGING_CONFIG", "PYTHONWARNINGS"} & set(env["env_vars"]), env["env_vars"]
    assert package.stat().st_size < 20 * 2**20  # Ray's working_dir limit is a few hundred MB
    # The image's commit is not the uploaded checkout's: blank it, the submit command sets the real one.
    assert env["env_vars"][tracking.COMMIT_ENV] == ""


# --- the log shipper ------------------------------------------------------------------------------------


def test_log_shipper_copies_new_and_changed_logs_and_a_last_pass_on_sigterm(tmp_path):
    ship_logs = load_module(SHIP_LOGS)
    session = tmp_path / "ray" / "session_2026-01-01_00-00-00_000000_1"
    (session / "logs" / "events").mkdir(parents=True)
    (tmp_path / "ray" / "session_latest").symlink_to(session)  # Ray's link: not shipped twice
    (session / "logs" / "raylet.out").write_text("started\n")
    (session / "logs" / "events" / "event_GCS.log").write_text("{}\n")
    bucket = tmp_path / "bucket"
    destination = ship_logs.open_filesystem(str(bucket))
    shipped: dict = {}
    assert ship_logs.ship_once(tmp_path / "ray", destination, shipped) == 2
    assert ship_logs.ship_once(tmp_path / "ray", destination, shipped) == 0  # nothing changed
    with open(session / "logs" / "raylet.out", "a") as log:
        log.write("worker died\n")
    assert ship_logs.ship_once(tmp_path / "ray", destination, shipped) == 1
    assert (bucket / session.name / "raylet.out").read_text() == "started\nworker died\n"
    assert [p.name for p in bucket.iterdir()] == [session.name]

    # The loop, stopped the way Kubernetes stops a pod: what was written after the last pass arrives.
    process = subprocess.Popen([sys.executable, str(SHIP_LOGS), str(tmp_path / "ray"), str(tmp_path / "bucket2"),
                                "--every", "3600"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "bucket2" / session.name / "raylet.out").exists():
            assert time.monotonic() < deadline and process.poll() is None, "no first pass"
            time.sleep(0.1)
        (session / "logs" / "python-core-worker-1.log").write_text("the last words\n")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert (tmp_path / "bucket2" / session.name / "python-core-worker-1.log").read_text() == "the last words\n"


# --- a live MLflow server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """infra/mlflow/serve.sh with serve.sh's defaults (127.0.0.1) and the KubeRay manifest's Host list."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(root, env={"MLFLOW_SERVER_ALLOWED_HOSTS": mlflow_allowed_hosts()}, timeout_s=300) as uri:
        yield uri, root


def test_mlflow_server_round_trip(server, tmp_path):
    uri, root = server
    tracker = RunTracker(TrackingConfig(tracking_uri=uri, experiment="infra-round-trip", run_name="smoke"))
    run_id = tracker.start({"lr": 0.001, "model_kind": "deepemocluster"}, tags={"git_commit": "abc123"})
    assert run_id is not None
    for epoch, loss in enumerate([0.9, 0.7, 0.6]):
        tracker.log_metrics({"train/loss": loss, "dev/ccc_arousal": 0.1 * epoch}, step=epoch)
    tracker.log_text("epochs: 3\n", "config.yaml")
    model = torch.nn.Linear(4, 3)
    model_uri = tracker.log_model(model, "best_model", extra={"norm_stats": {"mean": [0.5]}})
    assert tracker.enabled, "the tracker disabled itself: an MLflow call through the server failed"
    tracker.end()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke"
    assert run.data.params == {"lr": "0.001", "model_kind": "deepemocluster"}
    assert run.data.tags["git_commit"] == "abc123"
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.7), (2, 0.6)]
    # Artifacts went through the server (mlflow-artifacts:/ proxy) into its artifact folder.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml"}
    local = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    assert local.read_text() == "epochs: 3\n"
    assert list((root / "artifacts").rglob("config.yaml")), "artifact not in the server's folder"
    with tracking.mlflow_globals(uri):
        local = Path(mlflow.artifacts.download_artifacts(model_uri))
    loaded = mlflow.pytorch.load_model(str(local))
    extra = {p.stem: json.loads(p.read_text()) for p in (local / "extra_files").glob("*.json")}
    assert extra == {"norm_stats": {"mean": [0.5]}}
    assert torch.equal(loaded.weight, model.weight) and torch.equal(loaded.bias, model.bias)


def test_tracker_rides_out_a_locked_sqlite_store(server, monkeypatch):
    """A sqlite server answers a request that waited out the lock with HTTP 503 (MLflow maps
    "database is locked" to TEMPORARILY_UNAVAILABLE). A proxy in front of the real server answers
    the first metric write that way; MLflow's own client retries carry the run through."""
    uri, _ = server
    locked = MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)
    refusals = {"left": 1}

    class LockedThenServer(BaseHTTPRequestHandler):
        def forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.endswith("/runs/log-batch") and refusals["left"] > 0:
                refusals["left"] -= 1
                status, payload = locked.get_http_status_code(), locked.serialize_as_json().encode()
            else:
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
                request = urllib.request.Request(uri + self.path, data=body or None, method=self.command, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        status, payload = answer.status, answer.read()
                except urllib.error.HTTPError as error:
                    status, payload = error.code, error.read()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_DELETE = forward

        def log_message(self, *args):
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), LockedThenServer)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
            monkeypatch.delenv(name, raising=False)  # the tracker's own settings
        tracker = RunTracker(TrackingConfig(tracking_uri=f"http://127.0.0.1:{proxy.server_port}",
                                            experiment="infra-locked-store", run_name="locked"))
        run_id = tracker.start({}, {})
        tracker.log_metrics({"train/loss": 0.5}, step=0)
        assert refusals["left"] == 0 and tracker.enabled, "one 503 turned tracking off"
        tracker.end()
    finally:
        proxy.shutdown()
    assert [m.value for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")] == [0.5]


def test_mlflow_server_listens_on_loopback_only(server):
    uri, _ = server
    port = urlsplit(uri).port
    listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}
    assert listening == {"127.0.0.1"}


def test_mlflow_server_answers_the_kubernetes_service_name_only(server):
    """The allow-list of infra/kuberay/mlflow.yaml, enforced by the real server (not /health, which
    MLflow exempts from the check)."""
    uri, _ = server

    def status(host: str) -> int:
        request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status
        except urllib.error.HTTPError as error:
            return error.code

    assert status("mlflow:5000") == 200
    assert status("mlflow.default.svc.cluster.local:5000") == 200
    assert status("attacker.example.com:5000") in (400, 403)
