"""infra/ checked as far as it can be without a cloud: every YAML parses; the `ray up` configs pass
Ray's own validation; images and versions match the pins in pyproject.toml; every job a config or
infra/README.md runs exists and its config and overrides load; the KubeRay manifests carry what
autoscaling needs. Then a live MLflow server (infra/mlflow/serve.sh on 127.0.0.1) round trip.

Cloud APIs, the docker build and GPUs cannot exist here: nothing below mocks them, the checks stop
where they begin.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import psutil
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.server.security_utils import is_allowed_host_header
from packaging.requirements import Requirement
from ray._private.runtime_env.packaging import _zip_files
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from cluster_train.config import load_train_config
from cluster_train.tracking import RunTracker, TrackingConfig, load_logged_model
from data_prep.config import ConfigError, PrepConfig, load_config
from mlflow_server import SERVE_SCRIPT, mlflow_server

REPO_ROOT = Path(__file__).resolve().parent.parent
INFRA = REPO_ROOT / "infra"
CLUSTER_CONFIGS = {"aws": INFRA / "aws" / "cluster.yaml", "gcp": INFRA / "gcp" / "cluster.yaml"}
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
MLFLOW_MANIFEST = INFRA / "kuberay" / "mlflow.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
README = INFRA / "README.md"
IMAGE_HOME = "/home/ray/deepemocluster"  # the Dockerfile's WORKDIR: the project inside the image


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


def prepared(name: str) -> dict:
    """A cluster config as `ray up` sees it: Ray's defaults merged in (prepare_config), validated."""
    config = prepare_config(copy.deepcopy(load_yaml(CLUSTER_CONFIGS[name])))
    validate_config(config)
    return config


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


# --- YAML and Ray's cluster-config validation ------------------------------------------------------


def test_every_yaml_under_infra_parses():
    files = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
    assert len(files) >= 6, files
    for path in files:
        documents = load_manifests(path)
        assert documents and all(isinstance(d, dict) for d in documents), f"{path}: not a YAML mapping"


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
    config = copy.deepcopy(load_yaml(CLUSTER_CONFIGS[name]))
    breaking, message = BROKEN[breakage]
    breaking(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", sorted(CLUSTER_CONFIGS))
def test_gpu_worker_type_autoscales_from_zero(name):
    config = prepared(name)
    types = config["available_node_types"]
    gpu_types = [t for t, spec in types.items() if spec["resources"].get("GPU", 0) >= 1]
    assert gpu_types == ["gpu_worker"], gpu_types
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and 0 < gpu["max_workers"] <= config["max_workers"]
    assert gpu["docker"]["worker_run_options"] == ["--gpus all"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0  # a CPU head, no tasks
    for spec in types.values():  # every worker type can go back to 0
        assert spec.get("min_workers", 0) == 0


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
    assert f"MLFLOW_ARTIFACTS_DESTINATION={bucket}" in head_start
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


# --- images and versions ---------------------------------------------------------------------------


def all_images() -> dict[str, list[str]]:
    found = {}
    for name, path in CLUSTER_CONFIGS.items():
        docker = load_yaml(path)["docker"]
        found[str(path)] = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    for path in (RAYCLUSTER, RAYJOB, MLFLOW_MANIFEST):
        found[str(path)] = [image for doc in load_manifests(path) for image in walk(doc, "image")]
    return found


def test_image_tags_match_the_pinned_ray():
    images = all_images()
    assert sum(len(v) for v in images.values()) >= 6, images
    for path, tags in images.items():
        for image in tags:
            tag = image.rsplit(":", 1)[1]
            assert tag == f"{RAY_VERSION}-{PY_TAG}-gpu", f"{path}: image {image} is not Ray {RAY_VERSION}"
    for doc in load_manifests(RAYCLUSTER):
        assert doc["spec"]["rayVersion"] == RAY_VERSION


def test_dockerfile_builds_on_the_pinned_ray_image():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert base == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu"
    versions = pins()
    assert f'"torch=={versions["torch"]}"' in text  # the same torch, a CUDA build (PyPI's Linux wheel)
    # faiss-gpu replaces the base dependency faiss-cpu, at the same version
    assert f'"faiss-gpu=={versions["faiss-cpu"]}"' in text and "pip uninstall -y faiss-cpu" in text
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert '".[gpu]"' in text and any(r.startswith("faiss-gpu") for r in extras["gpu"])
    assert f"ray.__version__ == '{RAY_VERSION}'" in text
    # Every COPY source exists and gets through the build-context allow-list; data never does.
    ignore = [line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the ignore file is an allow-list: it starts by excluding everything"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = [s for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, flags=re.MULTILINE)
               for s in line.split()[:-1]]
    assert sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert source.split("/")[0] in allowed, f"COPY {source}: excluded by Dockerfile.dockerignore"
    assert not {"data", "outputs", "runs", "mlruns", ".venv"} & allowed
    for line in (DOCKERFILE.parent / "requirements-cloud.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert len(Requirement(line).specifier) == 1 and "==" in line, f"unpinned: {line}"


def test_image_paths_used_by_configs_are_copied_into_the_image():
    """A path under the image's project folder in any config is a file that the Dockerfile copies."""
    copied = {s.split("/")[0] for s in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)", DOCKERFILE.read_text(), re.MULTILINE)}
    texts = "\n".join(p.read_text() for p in INFRA.rglob("*.yaml"))
    paths = set(re.findall(rf"{IMAGE_HOME}/([\w./-]+\.\w+)", texts))
    assert "infra/mlflow/serve.sh" in paths
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
        spec = importlib.util.spec_from_file_location("evaluate_job", REPO_ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.parse_args(argv[1:])
    return None


def cluster_commands() -> list[list[str]]:
    """The jobs meant to run on a cluster: the RayJob's entrypoint and every command of the README."""
    (rayjob,) = load_manifests(RAYJOB)
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


def test_a_broken_command_is_caught():
    """The command checks above can fail: a misspelt key and a missing job are errors."""
    with pytest.raises(ConfigError, match="scaling.use_gpus"):
        check_job_command(["jobs/train.py", "--config", "configs/train/ravdess_full.yaml", "scaling.use_gpus=true"])
    with pytest.raises(AssertionError, match="does not exist"):
        check_job_command(["jobs/no_such_job.py"])


# --- KubeRay -----------------------------------------------------------------------------------------


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_raycluster_autoscales_gpu_workers_from_zero():
    (cluster,) = load_manifests(RAYCLUSTER)
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert not any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in containers(head["template"]))
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers(g["template"]))]
    assert [g["groupName"] for g in gpu_groups] == ["gpu"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 == group["replicas"] and group["maxReplicas"] > 0, group["groupName"]
    (gpu,) = gpu_groups
    (worker,) = containers(gpu["template"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == "1"


def mlflow_manifest() -> tuple[dict, dict]:
    """infra/kuberay/mlflow.yaml's Service and its server container's environment."""
    docs = {d["kind"]: d for d in load_manifests(MLFLOW_MANIFEST)}
    (container,) = containers(docs["Deployment"]["spec"]["template"])
    assert container["command"] == ["bash", f"{IMAGE_HOME}/infra/mlflow/serve.sh"]
    return docs["Service"], {e["name"]: e["value"] for e in container["env"]}


def mlflow_service_uri() -> str:
    service, env = mlflow_manifest()
    (port,) = service["spec"]["ports"]
    assert str(port["port"]) == env["MLFLOW_PORT"] and port["targetPort"] == "http"
    return f"http://{service['metadata']['name']}:{port['port']}"


def mlflow_allowed_hosts() -> str:
    return mlflow_manifest()[1]["MLFLOW_SERVER_ALLOWED_HOSTS"]


def test_every_ray_container_points_at_the_mlflow_service():
    uri = mlflow_service_uri()
    assert uri == "http://mlflow:5000"
    (cluster,) = load_manifests(RAYCLUSTER)
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in containers(group["template"]):
            env = {e["name"]: e["value"] for e in container["env"]}
            assert env["MLFLOW_TRACKING_URI"] == uri, container["name"]


def test_mlflow_service_name_passes_the_servers_host_check():
    """MLflow's own Host-header check (its default allows localhost and private IPs only)."""
    allowed = mlflow_allowed_hosts().split(",")
    host = urlsplit(mlflow_service_uri()).netloc
    for ok in (host, "mlflow", "mlflow.default.svc.cluster.local:5000", "127.0.0.1:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, ok), ok
    assert not is_allowed_host_header(allowed, "attacker.example.com:5000")


def test_rayjob_runs_a_training_job_on_the_raycluster():
    (job,) = load_manifests(RAYJOB)
    (cluster,) = load_manifests(RAYCLUSTER)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    entrypoint = job["spec"]["entrypoint"]
    assert entrypoint.startswith(f"cd {IMAGE_HOME} &&")  # the image's copy of the project
    (command,) = job_commands(entrypoint, {})
    assert command[0] == "jobs/train.py"
    config = check_job_command(command)
    assert config.scaling.use_gpu and config.storage_path.startswith("s3://")


# --- what `ray job submit` uploads -------------------------------------------------------------------


def test_runtime_env_keeps_data_out_of_the_upload(tmp_path):
    env = load_yaml(INFRA / "runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    package = tmp_path / "working_dir.zip"
    _zip_files(str(REPO_ROOT), env["excludes"], str(package), include_gitignore=True)  # what Ray uploads
    names = zipfile.ZipFile(package).namelist()
    tops = {name.split("/")[0] for name in names}
    assert not tops & {"data", "outputs", "runs", "mlruns", ".git", ".venv", "mlflow-server"}, tops
    assert not any(name.endswith(".db") for name in names)
    for needed in ("jobs/train.py", "jobs/prep.py", "cluster_train/trainer.py", "data_prep/pipeline.py",
                   "configs/train/ravdess_full.yaml", "pyproject.toml", env["env_vars"]["RAY_DATA_LOGGING_CONFIG"]):
        assert needed in names, needed  # the quiet logging config travels with the job
    assert package.stat().st_size < 20 * 2**20  # Ray's working_dir limit is a few hundred MB


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
    loaded, extra = load_logged_model(model_uri, tracking_uri=uri)
    assert extra == {"norm_stats": {"mean": [0.5]}}
    assert torch.equal(loaded.weight, model.weight) and torch.equal(loaded.bias, model.bias)


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
