"""Autoscaling with Ray's own autoscaler: a head with no task CPUs and the worker node types of
infra/aws/cluster.yaml (and infra/gcp/cluster.yaml, the same types), all at 0, started on this
machine by the fake multi-node provider of Ray's autoscaler tests (`ray.cluster_utils.
AutoscalingCluster`'s provider, `fake_multinode`: a launched "node" is a local raylet with the node
type's resources). Prep and a tiny training join the cluster as drivers (`RAY_ADDRESS`, as under
`ray job submit`) with the dataset and checkpoints in a bucket (moto's S3 server on 127.0.0.1); the
test reads Ray's own node table (GCS, `ray.nodes()`) and the autoscaler's log to check that worker
nodes start from 0 for each job and go away after the idle timeout.

Not `AutoscalingCluster.start()`/`shutdown()`: both run `ray stop --force`, which ends every Ray
process on the machine. This cluster is `ray start --head --block --autoscaling-config=...` with
`RAY_TMPDIR` set to a temp dir of its own, on free ports, and is ended by killing its own processes
only: those that inherited that `RAY_TMPDIR` (every process it starts: the head's, the autoscaler's
fake nodes, their workers) and the process tree of the `ray start` it ran. Another Ray on this
machine (/tmp/ray, port 6379, dashboard 8265) is not touched.

GPU: the GPU types declare `GPU: 1` and no GPU code runs here (no CUDA). Training runs on the CPU
type with `scaling.use_gpu=false`; the GPU type is checked with a task that asks what a
`use_gpu=true` training worker asks (1 CPU, 1 GPU). Left untested: training with `use_gpu=true` on a
launched GPU node (CUDA, NCCL, faiss-gpu), real instance start-up (image pull, driver wait, setup
commands: the fake provider runs none), node types' real CPU counts (scaled to 2 CPUs for this
2-core machine), spot reclaims, and a multi-machine network (every "node" is a set of processes
on this host, sharing its disk and IP address).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import train_sample_manifest
from mlflow_server import free_port
from s3_server import _client, bucket_keys, s3_server

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
BUCKET = "deepemo"
pytestmark = pytest.mark.slow  # a cluster of its own whose autoscaler starts and ends worker raylets

IDLE_TIMEOUT_MINUTES = 0.2  # 12 s; infra's is 10 minutes
WORKER_CPUS = 2  # infra's types have 8 (GPU) and 16 (CPU): scaled to this 2-core machine
WORKER_OBJECT_STORE = 150 * 1024**2
HEAD_TYPE = "ray.head.default"  # the fake provider's fixed name for the head's type (infra: `head`)

# Watches the cluster from a driver of its own: a line of JSON for every change of the node table.
WATCHER = r"""
import json, os, sys, time
import ray
address, out, stop = sys.argv[1:4]
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
last = None
while not os.path.exists(stop):
    nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n.get("Resources") or {},
              "labels": n.get("Labels") or {}} for n in ray.nodes()]
    state = sorted((n["id"], n["alive"]) for n in nodes)
    if state != last:
        with open(out, "a") as f:
            f.write(json.dumps({"t": time.time(), "nodes": nodes}) + "\n")
        last = state
    time.sleep(0.25)
"""

# What a `scaling.use_gpu=true, cpus_per_worker=1` training worker asks for: it must bring up the GPU type.
GPU_PROBE = r"""
import json, os, sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR")

@ray.remote(num_cpus=1, num_gpus=1)
def probe():
    return {"node": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

print("PROBE " + json.dumps(ray.get(probe.remote(), timeout=100)))
"""


def infra_node_types() -> tuple[dict, dict]:
    """The head's resources and the worker node types of infra's `ray up` configs, as the fake provider
    takes them: the same names, resources (GPU and `spot` declared) and min_workers 0, scaled down to
    this machine (CPUs, 1 node a type, a small object store), without node_config (machines)."""
    configs = {cloud: yaml.safe_load((REPO / "infra" / cloud / "cluster.yaml").read_text()) for cloud in ("aws", "gcp")}
    shapes = {cloud: {name: (t["resources"], t.get("min_workers", 0)) for name, t in c["available_node_types"].items()}
              for cloud, c in configs.items()}
    assert shapes["aws"] == shapes["gcp"], shapes  # one test stands for both clouds
    aws = configs["aws"]
    head = aws["available_node_types"][aws["head_node_type"]]["resources"]
    workers = {}
    for name, node_type in aws["available_node_types"].items():
        if name == aws["head_node_type"]:
            continue
        assert node_type["min_workers"] == 0, name  # every worker type scales from 0
        resources = {**node_type["resources"], "CPU": WORKER_CPUS, "object_store_memory": WORKER_OBJECT_STORE}
        workers[name] = {"resources": resources, "node_config": {}, "min_workers": 0, "max_workers": 1}
    return head, workers


def autoscaling_config(head: dict, workers: dict, gcs_address: str) -> dict:
    """Ray's fake_multi_node/example.yaml (missing from the wheel) with these node types."""
    return {
        "cluster_name": "autoscaling-test",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},  # not :6379
        "available_node_types": {**workers, HEAD_TYPE: {"resources": head, "node_config": {}, "max_workers": 0}},
        "head_node_type": HEAD_TYPE,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def node_type(resources: dict) -> str:
    """A node's type from its resources (the types differ in them)."""
    if "spot" in resources:
        return "gpu_spot_worker"
    if resources.get("GPU"):
        return "gpu_worker"
    if resources.get("CPU"):
        return "cpu_worker"
    return "head"


def own_processes(temp_dir: str, root: int) -> set[int]:
    """This cluster's processes: those whose environment has its RAY_TMPDIR (inherited by everything it
    starts, whatever their title or session) and the process tree under `root` (its `ray start`)."""
    marker, children, mine = f"RAY_TMPDIR={temp_dir}".encode(), {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            state, parent = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError, IndexError):
            continue  # gone, or not ours to read
        if state == "Z" and int(entry) != root:
            continue  # dead, left for its parent (init) to reap
        parent = int(parent)
        children.setdefault(parent, []).append(int(entry))
        if marker in environ:
            mine.add(int(entry))
    todo = [root]
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo += children.get(pid, [])
    return {pid for pid in mine if Path(f"/proc/{pid}").exists()}


def kill_own_processes(temp_dir: str, root: int) -> None:
    """SIGKILL this cluster's processes, again until none is left (a raylet may start workers meanwhile)."""
    deadline = time.monotonic() + 30
    while (pids := own_processes(temp_dir, root)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        # zombies of ours: reaped by their parents (dead, so by init), or here for the root
        with contextlib.suppress(ChildProcessError):
            os.waitpid(root, os.WNOHANG)


@contextlib.contextmanager
def autoscaling_cluster(env: dict[str, str]) -> Iterator[dict]:
    """A head (no CPUs) whose autoscaler launches infra's worker types; everything under its own RAY_TMPDIR."""
    import ray._private.services

    temp_dir = tempfile.mkdtemp(prefix="ras", dir="/tmp")  # short: unix socket paths stay < 108 characters
    head, workers = infra_node_types()
    assert head == {"CPU": 0}  # infra's head runs no task
    port = free_port()
    address = f"{ray._private.services.get_node_ip_address()}:{port}"
    config_file = Path(temp_dir) / "autoscaling.yaml"
    config_file.write_text(json.dumps(autoscaling_config(head, workers, address)))
    env = {**{k: v for k, v in env.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": temp_dir,
           "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",  # as AutoscalingCluster.start sets them
           "RAY_AUTH_MODE": "token",  # Ray 2.60 local clusters require the token (~/.ray/auth_token)
           "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}
    log = Path(temp_dir) / "head.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp_dir}/ray",
             f"--autoscaling-config={config_file}", "--num-cpus=0", "--num-gpus=0",
             "--object-store-memory=100000000", "--include-dashboard=false", "--disable-usage-stats",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray head did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"address": address, "env": env, "temp_dir": temp_dir, "head_pid": process.pid}
    finally:
        kill_own_processes(temp_dir, process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        left = own_processes(temp_dir, process.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's cluster left running: {sorted(left)}"


def autoscaler_terminations(monitor_log: str) -> tuple[dict[str, str], dict[str, float]]:
    """From the autoscaler's log (monitor.log): node id -> why it was ended, and for idle ones how long
    it had been idle (the line's time minus the "Node last used" time logged right after it)."""
    ended, idle_for = {}, {}
    lines = monitor_log.splitlines()
    for i, line in enumerate(lines):
        found = re.search(r"^(\S+ \S+),\d+\s.*Terminating the node with id (\w+) and ip \S+ \(([\w ]+)\)", line)
        if not found:
            continue
        ended[found[2]] = found[3]
        used = next((re.search(r"Node last used: (.+)\.$", later) for later in lines[i + 1:i + 4]
                     if "Node last used: " in later), None)
        if used:
            idle_for[found[2]] = (datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S")
                                  - datetime.strptime(used[1], "%a %b %d %H:%M:%S %Y")).total_seconds()
    return ended, idle_for


class NodeTable:
    """The cluster's node table as the watcher wrote it: every node ever seen, when, alive or not."""

    def __init__(self, path: Path):
        self.path = path

    def snapshots(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.endswith("}")]

    def types(self) -> dict[str, str]:
        """Node id -> type, from the resources a node had when seen alive."""
        return {n["id"]: node_type(n["resources"]) for s in self.snapshots() for n in s["nodes"] if n["alive"]}

    def alive_workers(self, since: float | None = None) -> dict[str, str]:
        """Workers alive in the last snapshot, or in any snapshot taken after `since` (id -> type)."""
        snapshots = self.snapshots()
        chosen = [s for s in snapshots if s["t"] >= since] if since is not None else snapshots[-1:]
        if since is not None and snapshots and snapshots[0]["t"] < since:  # the state when `since` began
            chosen = [max((s for s in snapshots if s["t"] < since), key=lambda s: s["t"]), *chosen]
        types = self.types()
        return {n["id"]: types[n["id"]] for s in chosen for n in s["nodes"]
                if n["alive"] and types.get(n["id"]) not in (None, "head")}

    def wait(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"{what} within {timeout:.0f} s; node table: {self.snapshots()[-3:]}")
            time.sleep(0.5)
        return time.monotonic()


def run_driver(cluster: dict, *command: str, timeout: float) -> subprocess.CompletedProcess:
    """A driver that joins the cluster as a job's driver does (RAY_ADDRESS), in the cluster's environment."""
    result = subprocess.run(list(command), cwd=REPO, env={**cluster["env"], "RAY_ADDRESS": cluster["address"]},
                            capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen]:
    """A process shaped like another Ray's worker on this machine (its title, the default RAY_TMPDIR):
    ending the test's cluster must leave it running."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)", "ray::IDLE", "/tmp/ray"],
                               env={**os.environ, "RAY_TMPDIR": "/tmp"}, start_new_session=True)
    yield process
    process.kill()
    process.wait(timeout=10)


def manifest_in_bucket(aws: dict[str, str], folder: Path) -> str:
    """The sample manifest, its audio copied into the bucket: the head runs no tasks, so a job's
    inputs must be where the nodes it launches read them (local paths are refused)."""
    client = _client(aws)
    lines = train_sample_manifest(folder).read_text().splitlines()
    rows = [lines[0]]
    for line in lines[1:]:
        cells = line.split(",")
        key = f"audio/{Path(cells[1]).name}"
        client.upload_file(cells[1], BUCKET, key)
        rows.append(",".join([cells[0], f"s3://{BUCKET}/{key}", *cells[2:]]))
    client.put_object(Bucket=BUCKET, Key="manifest.csv", Body=("\n".join(rows) + "\n").encode())
    return f"s3://{BUCKET}/manifest.csv"


# 90 to 160 s on a 2-core machine (160 s while busy). The steps' own limits (840 s in all) end first,
# so the cluster is always ended here: pytest-timeout ends the process without running `finally`.
@pytest.mark.timeout(900)
def test_jobs_bring_worker_nodes_up_from_zero_and_idle_nodes_go_away(tmp_path, bystander):
    timeline: dict[str, float] = {}
    started = time.monotonic()
    with s3_server(tmp_path / "s3", BUCKET) as aws, autoscaling_cluster({**os.environ, **aws}) as cluster:
        timeline["head up"] = time.monotonic() - started
        table, stop = NodeTable(tmp_path / "nodes.jsonl"), tmp_path / "stop-watching"
        watcher = subprocess.Popen([sys.executable, "-c", WATCHER, cluster["address"], str(table.path), str(stop)],
                                   env=cluster["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            table.wait(lambda: table.snapshots(), 60, "the watcher saw no node table")
            [head] = [n for n in table.snapshots()[-1]["nodes"] if n["alive"]]
            assert node_type(head["resources"]) == "head" and not head["resources"].get("CPU")
            assert table.alive_workers() == {}  # every worker type starts at 0

            # prep from 0 workers: its Ray Data tasks ask for CPUs (2 at a time), no GPU; the autoscaler
            # brings up the CPU type, not a GPU type (which has CPUs too)
            mark = time.time()
            prep = run_driver(cluster, sys.executable, "jobs/prep.py", "--config", "configs/prep/ravdess_sample.yaml",
                              f"sources=[{{kind: csv, path: {manifest_in_bucket(aws, tmp_path)}}}]",
                              f"output=s3://{BUCKET}/prepared", "progress=false", "max_workers=2", timeout=180)
            assert "prep: wrote 24 utterances" in prep.stdout, prep.stdout[-3000:]
            prep_nodes = table.alive_workers(since=mark)
            timeline["prep done"] = time.monotonic() - started
            assert sorted(prep_nodes.values()) == ["cpu_worker"], prep_nodes
            assert {"prepared/dataset.json", "prepared/settings.json"} <= set(bucket_keys(aws, BUCKET, "prepared/"))

            # the GPU type: a training worker's request with use_gpu=true (1 CPU, 1 GPU) brings up the
            # on-demand GPU type, not spot (its extra `spot` resource), while the CPU node idles
            probe = run_driver(cluster, sys.executable, "-c", GPU_PROBE, cluster["address"], timeout=120)
            [answer] = [json.loads(line[6:]) for line in probe.stdout.splitlines() if line.startswith("PROBE ")]
            assert table.types().get(answer["node"]) == "gpu_worker", (answer, table.types())
            assert answer["gpu_ids"] == ["0"] and answer["cuda_visible_devices"] == "0"  # Ray's own GPU assignment
            timeline["gpu probe done"] = time.monotonic() - started

            # every idle worker goes away after the idle timeout
            table.wait(lambda: table.alive_workers() == {}, 60, "idle workers were not released")
            timeline["released after prep and probe"] = time.monotonic() - started

            # training from 0 workers again: one Ray Train worker, CPU only, on the CPU type. The driver's
            # own steps between its Ray Data tasks and the worker group can outlast the test's idle
            # timeout on a busy 2-core machine (16 s seen): the node is then ended and another launched
            mark = time.time()
            train = run_driver(
                cluster, sys.executable, "jobs/train.py", "--config", "configs/train/ravdess_sample.yaml",
                f"data.dataset=s3://{BUCKET}/prepared", f"storage_path=s3://{BUCKET}/runs", "name=autoscaled",
                "tracking.enabled=false", "epochs=1", "data.batch_size=4", "clustering.num_clusters=4",
                "model.channels=[8,16]", "model.strides=[2,2]", "model.feature_dim=16", "precise_bn.utterances=8",
                "scaling.num_workers=1", "scaling.use_gpu=false", "scaling.cpus_per_worker=0.5", timeout=240)
            train_nodes = table.alive_workers(since=mark)
            timeline["training done"] = time.monotonic() - started
            assert train_nodes and set(train_nodes.values()) == {"cpu_worker"}, train_nodes
            assert not set(train_nodes) & set(prep_nodes)  # a new node: the prep's had gone
            assert "runs/autoscaled/best_model/model.pt" in bucket_keys(aws, BUCKET, "runs/autoscaled/"), train.stdout[-2000:]

            table.wait(lambda: table.alive_workers() == {}, 60, "idle workers were not released after training")
            timeline["released after training"] = time.monotonic() - started
        finally:
            stop.touch()
            with contextlib.suppress(subprocess.TimeoutExpired):
                watcher.wait(timeout=10)
            if watcher.poll() is None:
                watcher.kill()

        # the autoscaler's own account of it (its log): each node launched by type, each ended as idle
        monitor_log = (Path(cluster["temp_dir"]) / "ray/session_latest/logs/monitor.log").read_text(errors="replace")
        print(f"timeline (s): {json.dumps({k: round(v, 1) for k, v in timeline.items()})}")
        workers = {node: kind for node, kind in table.types().items() if kind != "head"}
        assert sorted(workers.values()) == ["cpu_worker"] * (1 + len(train_nodes)) + ["gpu_worker"], workers
        launched = re.findall(r"Launching (\d+) nodes, type (\w+)\.", monitor_log)
        assert launched == [("1", "cpu_worker"), ("1", "gpu_worker")] + [("1", "cpu_worker")] * len(train_nodes), \
            monitor_log[-3000:]
        ended, idle_for = autoscaler_terminations(monitor_log)
        assert ended == dict.fromkeys(workers, "idle"), (ended, workers)
        idle_timeout = IDLE_TIMEOUT_MINUTES * 60  # each ended once idle that long (the log's times: whole seconds)
        assert set(idle_for) == set(workers), idle_for
        assert all(idle_timeout - 1 <= seconds <= idle_timeout + 15 for seconds in idle_for.values()), idle_for
    assert bystander.poll() is None, "ending the test's cluster ended a process that was not its own"
