"""Where the K-means actor runs (`clustering.use_gpu`) and how long its placement may take.

The decision is `service.actor_options`, from the config alone; Ray's own autoscaler code
(`ResourceDemandScheduler.get_nodes_to_launch`, what the v1 autoscaler calls every update) then shows
what the actor's resource request does to infra/aws/cluster.yaml's cluster while no GPU node runs.
The wiring runs against a stand-in actor class; the bounded placement on a real local Ray (no GPU).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import time
import uuid
from pathlib import Path

import pytest
import ray
import yaml
from ray._common.utils import resources_from_ray_options
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler
from ray.autoscaler.tags import NODE_KIND_HEAD, NODE_KIND_WORKER, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

from cluster_train.clustering import service as service_module
from cluster_train.clustering.kmeans import ClusteringConfig
from cluster_train.clustering.service import actor_options, get_or_create_service
from cluster_train.train.config import load_train_config
from data_prep.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
AWS_CLUSTER = REPO / "infra" / "aws" / "cluster.yaml"
NO_GPU, ONE_GPU = {"num_cpus": 0, "num_gpus": 0}, {"num_cpus": 0, "num_gpus": 1}


# --- the decision ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("use_gpu", "training_uses_gpu", "expected"),
    [
        ("auto", False, NO_GPU),  # the CPU demo and tests: as before
        ("auto", True, NO_GPU),  # never one of the training's GPUs (issue 32): no GPU of its own
        (True, False, ONE_GPU),  # asked for explicitly: a GPU of its own
        (True, True, ONE_GPU),
        (False, False, NO_GPU),
        (False, True, NO_GPU),
    ],
)
def test_actor_options_per_setting(use_gpu, training_uses_gpu, expected):
    assert actor_options(ClusteringConfig(use_gpu=use_gpu), training_uses_gpu) == expected


def test_default_is_auto_and_the_cpu_demo_stays_on_cpu():
    config = load_train_config(REPO / "configs" / "train" / "ravdess_sample.yaml")
    assert config.clustering.use_gpu == "auto" and config.scaling.use_gpu is False
    assert actor_options(config.clustering, config.scaling.use_gpu) == NO_GPU


def test_default_asks_for_no_gpu_when_training_uses_gpus():
    """8 one-GPU nodes, scaling.num_workers=8: an actor holding one of them, placed before the
    trainer, left a worker waiting forever."""
    config = load_train_config(REPO / "configs" / "train" / "ravdess_sample.yaml",
                               ["scaling.use_gpu=true", "scaling.num_workers=8"])
    assert actor_options(config.clustering, config.scaling.use_gpu) == NO_GPU


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["clustering.use_gpu=true"], ONE_GPU),
        (["clustering.use_gpu=false", "scaling.use_gpu=true"], NO_GPU),
        (["clustering.use_gpu=auto", "scaling.use_gpu=true"], NO_GPU),
        (["clustering.use_gpu=auto", "scaling.use_gpu=false"], NO_GPU),
    ],
)
def test_yaml_values_reach_the_decision(overrides, expected):
    """`true`/`false`/`auto` as a config file or the command line writes them."""
    config = load_train_config(REPO / "configs" / "train" / "ravdess_full.yaml", overrides)
    assert actor_options(config.clustering, config.scaling.use_gpu) == expected


@pytest.mark.parametrize("value", ["maybe", "gpu", "Auto", "'true'"])
def test_wrong_value_is_a_config_error_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"config key 'clustering\.use_gpu'"):
        load_train_config(REPO / "configs" / "train" / "ravdess_full.yaml", [f"clustering.use_gpu={value}"])
    with pytest.raises(ConfigError, match=r"config key 'clustering\.use_gpu'"):
        ClusteringConfig(use_gpu=value)


# --- the wiring: get_or_create_service and launch.py ---------------------------------------------------


class _Call:
    def __init__(self, value):
        self.value = value

    def remote(self, *args, **kwargs):
        return self.value


class _FakeActorClass:
    """Stands in for `KMeansService`: records `.options(...)` and the constructor's arguments."""

    def __init__(self):
        self.options_given: dict | None = None
        self.args: tuple | None = None

    def options(self, **options):
        self.options_given = options
        return self

    def remote(self, config, world_size, seed):
        self.args = (config, world_size, seed)
        described = {"config": dataclasses.asdict(config), "world_size": world_size, "seed": seed}
        handle = type("Handle", (), {})()
        handle.describe = _Call(described)
        return handle


@pytest.fixture
def fake_actor(monkeypatch):
    actor = _FakeActorClass()
    monkeypatch.setattr(service_module, "KMeansService", actor)
    monkeypatch.setattr(service_module.ray, "get", lambda value, timeout=None: value)

    def no_cluster_resources():
        raise AssertionError("the K-means actor's GPU must not depend on ray.cluster_resources()")

    monkeypatch.setattr(service_module.ray, "cluster_resources", no_cluster_resources)
    return actor


@pytest.mark.parametrize(
    ("use_gpu", "training_uses_gpu", "gpus", "faiss_gpu"),
    [("auto", False, 0, False), ("auto", True, 0, False), (True, False, 1, True), (False, True, 0, False)],
)
def test_service_is_created_with_the_decision(fake_actor, use_gpu, training_uses_gpu, gpus, faiss_gpu):
    """The actor asks Ray for the decided GPU, and its faiss is told the same decision (Ray 2.60 leaves
    CUDA_VISIBLE_DEVICES alone for an actor with no GPU: "auto" in there would take a training GPU)."""
    config = ClusteringConfig(use_gpu=use_gpu)
    get_or_create_service("kmeans-test", config, 2, seed=7, training_uses_gpu=training_uses_gpu)
    assert fake_actor.options_given["num_gpus"] == gpus and fake_actor.options_given["num_cpus"] == 0
    actor_config, world_size, seed = fake_actor.args
    assert actor_config.use_gpu is faiss_gpu and (world_size, seed) == (2, 7)
    assert config.use_gpu == use_gpu  # the caller's config is left as it was


def test_launch_passes_the_trainings_use_gpu():
    """cluster_train/train/launch.py hands `scaling.use_gpu` to the service (read from its source: the
    call runs only inside a Ray training run)."""
    tree = ast.parse((REPO / "cluster_train" / "train" / "launch.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "get_or_create_service"]
    assert len(calls) == 1
    keywords = {k.arg: ast.unparse(k.value) for k in calls[0].keywords}
    assert keywords.get("training_uses_gpu") == "config.scaling.use_gpu", keywords


# --- what Ray's autoscaler does with it ----------------------------------------------------------------


class _Provider:
    """The two NodeProvider calls the scheduler makes: each node's tags and IP."""

    def __init__(self, nodes: dict[str, tuple[str, str]]):  # node id -> (kind, node type)
        self.nodes = nodes

    def node_tags(self, node_id: str) -> dict[str, str]:
        kind, node_type = self.nodes[node_id]
        return {TAG_RAY_NODE_KIND: kind, TAG_RAY_USER_NODE_TYPE: node_type}

    def internal_ip(self, node_id: str) -> str:
        return f"10.0.0.{list(self.nodes).index(node_id) + 1}"


def aws_cluster() -> dict:
    return yaml.safe_load(AWS_CLUSTER.read_text())


def demand_of(options: dict) -> dict:
    """The resource shape Ray reports for a pending actor with these options (zeros dropped)."""
    return {k: v for k, v in resources_from_ray_options(options).items() if v > 0}


def nodes_launched(demands: list[dict]) -> tuple[dict[str, int], list[dict]]:
    """What Ray's autoscaler launches for `demands` on infra/aws/cluster.yaml's cluster as it is while
    no GPU node runs: the (CPU 0) head and one idle cpu_worker (16 CPUs), both up."""
    config = aws_cluster()
    types = config["available_node_types"]
    nodes = {"head": (NODE_KIND_HEAD, config["head_node_type"]), "cpu-1": (NODE_KIND_WORKER, "cpu_worker")}
    provider = _Provider(nodes)
    unused = {provider.internal_ip(n): dict(types[t]["resources"]) for n, (_, t) in nodes.items()}
    scheduler = ResourceDemandScheduler(provider, types, config["max_workers"], config["head_node_type"],
                                        config["upscaling_speed"])
    return scheduler.get_nodes_to_launch(
        list(nodes), {}, demands, unused, [], unused, [], NodeAvailabilitySummary(node_availabilities={}))


def test_cluster_has_no_gpu_node_until_asked():
    """The premise: every GPU node type starts at 0 and nothing is launched with no demand."""
    types = aws_cluster()["available_node_types"]
    gpu_types = {t for t, spec in types.items() if spec["resources"].get("GPU", 0) > 0}
    assert gpu_types and all(types[t]["min_workers"] == 0 for t in gpu_types)
    assert nodes_launched([]) == ({}, [])


def test_use_gpu_true_makes_the_autoscaler_launch_a_gpu_node():
    demand = demand_of(actor_options(ClusteringConfig(use_gpu=True), training_uses_gpu=False))
    assert demand == {"GPU": 1}
    assert nodes_launched([demand]) == ({"gpu_worker": 1}, [])


def test_use_gpu_false_needs_no_new_node():
    demand = demand_of(actor_options(ClusteringConfig(use_gpu=False), training_uses_gpu=True))
    assert demand == {}
    assert nodes_launched([demand]) == ({}, [])


def test_auto_adds_no_node_to_the_training():
    """GPU training (2 workers, 4 CPUs + 1 GPU each): the default actor adds no GPU node (it did add a
    third g5.2xlarge, one GPU each); CPU training: the workers and the actor fit on the running CPU node."""
    auto = ClusteringConfig(use_gpu="auto")
    gpu_training = [{"CPU": 4, "GPU": 1}] * 2
    assert nodes_launched(gpu_training) == ({"gpu_worker": 2}, [])
    assert nodes_launched(gpu_training + [demand_of(actor_options(auto, True))]) == ({"gpu_worker": 2}, [])
    cpu_training = [{"CPU": 4}] * 2
    assert nodes_launched(cpu_training + [demand_of(actor_options(auto, False))]) == ({}, [])


# --- bounded placement, on a real local Ray without a GPU ------------------------------------------------


@pytest.fixture(scope="module")
def ray_without_gpu():
    with pytest.MonkeyPatch.context() as environment:
        if "RAY_ENABLE_UV_RUN_RUNTIME_ENV" not in os.environ:
            environment.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
        try:
            yield
        finally:
            ray.shutdown()


def test_an_actor_the_cluster_cannot_place_fails_within_the_timeout(ray_without_gpu):
    """clustering.use_gpu=true on a cluster without a GPU: an error naming what the actor asked for and
    what the cluster has, after placement_timeout_s, and the pending actor is gone."""
    name = f"kmeans-{uuid.uuid4().hex[:8]}"
    config = ClusteringConfig(use_gpu=True, placement_timeout_s=3.0)
    started = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"(?s)clustering\.placement_timeout_s.*'GPU': 1.*cluster has.*'CPU': 1\.0"):
        get_or_create_service(name, config, 2, training_uses_gpu=True)
    assert 3.0 <= time.perf_counter() - started < 30
    with pytest.raises(ValueError):
        ray.get_actor(name)


def test_the_default_actor_is_placed_at_once(ray_without_gpu):
    name = f"kmeans-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    service = get_or_create_service(name, ClusteringConfig(placement_timeout_s=60.0), 2, training_uses_gpu=True)
    try:
        assert time.perf_counter() - started < 30
        assert ray.get(service.describe.remote())["config"]["use_gpu"] is False
    finally:
        ray.kill(service)


@pytest.mark.parametrize("value", [0, -1])
def test_placement_timeout_must_be_positive(value):
    with pytest.raises(ConfigError, match=r"config key 'clustering\.placement_timeout_s'"):
        ClusteringConfig(placement_timeout_s=value)
