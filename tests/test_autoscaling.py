"""The label job on an autoscaling Ray cluster that starts with no workers, on this one machine.

Ray's fake multi-node provider (``ray.autoscaler._private.fake_multi_node``, the machinery of
``ray.cluster_utils.AutoscalingCluster``) turns "launch a node of type X" into "start another
raylet on this machine with X's resources". The cluster mirrors infra/: a head that runs no
work, a "gpu" node type with one (fake) GPU and a "cpu" node type, both from zero. The job is
``python jobs/label.py --address ...`` with the tiny model on CPU but requesting one GPU per
extractor actor, so the extractor must land on a "gpu" node the autoscaler has to add.

Why not ``AutoscalingCluster`` itself: its ``start()`` and ``shutdown()`` run
``ray stop --force``, which kills every Ray process on the machine (other users' clusters
included); it reads ``fake_multi_node/example.yaml``, which the pip wheel does not ship; and
it binds the default ports (6379, 8265, 10001). This test starts the same thing -- ``ray start
--head --autoscaling-config`` with ``RAY_FAKE_CLUSTER=1`` -- on free loopback ports, in a
process session of its own, and stops exactly the processes of that session.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from diffcut.job import schema

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
HEAD_NODE_TYPE = "ray.head.default"
# Small object stores: three raylets share this machine's memory.
OBJECT_STORE_BYTES = 160 * MIB
WORKER_NODE_TYPES = {
    # One fake GPU: the extractor actor (1 CPU + 1 GPU) fills the node.
    "gpu": {
        "resources": {"CPU": 1, "GPU": 1, "object_store_memory": OBJECT_STORE_BYTES},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 1,
    },
    # The NCut actor and the decode / write tasks.
    "cpu": {
        "resources": {"CPU": 2, "object_store_memory": OBJECT_STORE_BYTES},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 1,
    },
}
IMAGE_SIZES = [(96, 64), (64, 96), (80, 80), (120, 72)]  # (width, height)
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 240
# The GPU node comes within about 10 s of the job's start when the extractor asks for a GPU.
GPU_NODE_DEADLINE_S = 90
SCALE_DOWN_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_processes(session_id: int) -> list[psutil.Process]:
    """Every process of the process session ``session_id`` (e.g. one started with start_new_session)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session_id:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


class LoopbackAutoscalingCluster:
    """A fake multi-node autoscaling Ray cluster on 127.0.0.1 whose processes this object owns."""

    def __init__(self, workdir: Path, worker_node_types: dict, idle_timeout_minutes: float):
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        # The cluster's own token (Ray 2.60 turns token auth on when ~/.ray/auth_token exists;
        # an explicit mode and token keep this cluster independent of that file).
        self.env = dict(
            os.environ,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_USAGE_STATS_ENABLED="0",
        )
        self.config = {
            "cluster_name": "diffcut-fake",
            "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
            "provider": {
                "type": "fake_multinode",
                # Worker raylets join this GCS (the provider's default is port 6379).
                "gcs_address": f"127.0.0.1:{self.port}",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": {
                HEAD_NODE_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                **worker_node_types,
            },
            "head_node_type": HEAD_NODE_TYPE,
            "auth": {},
            "docker": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_minutes,
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
        }

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        config_path = self.workdir / "autoscaling.json"
        config_path.write_text(json.dumps(self.config))
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.workdir / 'ray'}",
            f"--autoscaling-config={config_path}",
            "--num-cpus=0",
            "--num-gpus=0",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            # Every port on loopback and free, so that other Ray instances on the machine are untouched.
            "--include-dashboard=false",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
        ]
        env = dict(self.env, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        log_path = self.workdir / "ray-start.log"
        with open(log_path, "wb") as log:
            # Its own session: every Ray process of this cluster (GCS, raylets of the fake nodes,
            # autoscaler, workers) descends from it and is found by session id at shutdown.
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"Ray runtime started" not in log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)

    def session_processes(self) -> list[psutil.Process]:
        return [] if self.process is None else session_processes(self.process.pid)

    def shutdown(self) -> None:
        processes = self.session_processes()
        for process in processes:
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=8)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=15)
        if self.process is not None:
            self.process.wait(timeout=15)


# Watches the cluster from its own process (a Ray driver), so that this test process never joins
# a Ray cluster: Ray's per-process state (auth mode, global worker) stays untouched for other tests.
# Writes one JSON line per poll: the nodes; at the end also the actor table (placements).
OBSERVER = r"""
import json, os, sys, time
import ray
address, out_path, stop_path, limit_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
ray.init(address=address, log_to_driver=False, logging_level="ERROR")
def nodes():
    return [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
deadline = time.monotonic() + limit_s
with open(out_path, "a") as out:
    while not os.path.exists(stop_path) and time.monotonic() < deadline:
        out.write(json.dumps({"nodes": nodes()}) + "\n"); out.flush()
        time.sleep(0.5)
    actors = [{"class": a["ActorClassName"], "node": a["Address"]["NodeID"]}
              for a in ray._private.state.actors().values()]
    out.write(json.dumps({"nodes": nodes(), "actors": actors}) + "\n")
"""


class Observer:
    """Reads what the observer process wrote."""

    def __init__(self, cluster: LoopbackAutoscalingCluster, workdir: Path, limit_s: float):
        self.path = workdir / "observed.jsonl"
        self.stop_path = workdir / "observer.stop"
        with open(workdir / "observer.log", "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", OBSERVER, cluster.address, str(self.path), str(self.stop_path), str(limit_s)],
                env=cluster.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def snapshots(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_for(self, predicate, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            snapshots = self.snapshots()
            if snapshots and predicate(snapshots[-1]):
                return snapshots[-1]
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{what}: not seen in {timeout_s} s; last: {snapshots[-1:]}")
            time.sleep(0.5)

    def finish(self, timeout_s: float = 60) -> dict:
        self.stop_path.touch()
        try:
            self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.snapshots()[-1]


def node_kind(node: dict) -> str:
    """Which node type a node is, from the resources it registered."""
    resources = node["resources"]
    if resources.get("GPU", 0) > 0:
        return "gpu"
    if resources.get("CPU", 0) > 0:
        return "cpu"
    return "head"


def alive_kinds(snapshot: dict) -> list[str]:
    return sorted(node_kind(n) for n in snapshot["nodes"] if n["alive"])


def write_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True)
    paths = []
    for i, (width, height) in enumerate(IMAGE_SIZES):
        # Two flat regions with noise: something for the cut to find.
        pixels = np.zeros((height, width, 3), np.float32)
        pixels[:, : width // 2] = rng.uniform(0, 255, 3)
        pixels[:, width // 2 :] = rng.uniform(0, 255, 3)
        pixels += rng.normal(0, 8, pixels.shape)
        path = folder / f"image_{i}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture()
def cluster():
    # A short path: Ray's unix sockets live under the temp dir (at most 107 bytes).
    workdir = Path(tempfile.mkdtemp(prefix="dcas-", dir="/tmp"))
    cluster = LoopbackAutoscalingCluster(workdir, WORKER_NODE_TYPES, idle_timeout_minutes=0.1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def test_label_job_scales_gpu_and_cpu_nodes_up_from_zero(cluster, tmp_path):
    images = write_images(tmp_path / "images")
    output = tmp_path / "labels"
    observer = Observer(cluster, cluster.workdir, limit_s=JOB_TIMEOUT_S + SCALE_DOWN_TIMEOUT_S + 60)
    try:
        # Zero workers: the head alone, and it offers no CPU or GPU to run anything.
        first = observer.wait_for(lambda s: bool(s["nodes"]), 60, "the head node")
        assert alive_kinds(first) == ["head"], first

        command = [
            sys.executable,
            str(ROOT / "jobs" / "label.py"),
            "--address",
            cluster.address,
            "--input",
            str(tmp_path / "images"),
            "--output",
            str(output),
            "--model",
            "tiny-random",
            "--device",
            "cpu",
            "--resolution",
            "128",
            # Request the (fake) GPU although the model runs on CPU: that is what sends the
            # extractor to the "gpu" node type, as on a real cluster.
            "--extractor-gpus",
            "1",
            "--extractor-cpus",
            "1",
            "--extractor-pool-min",
            "1",
            "--extractor-pool-max",
            "1",
            "--ncut-cpus",
            "1",
            "--ncut-pool-min",
            "1",
            "--ncut-pool-max",
            "1",
            "--batch-size",
            "2",
        ]
        env = dict(cluster.env, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RAY_DATA_DISABLE_PROGRESS_BARS="1")
        log_path = tmp_path / "job.log"
        with open(log_path, "wb") as log:
            job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            started = time.monotonic()
            while job.poll() is None:
                elapsed = time.monotonic() - started
                if elapsed > JOB_TIMEOUT_S:
                    pytest.fail(f"label job did not finish in {JOB_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
                if elapsed > GPU_NODE_DEADLINE_S and not any(
                    "gpu" in alive_kinds(snapshot) for snapshot in observer.snapshots()
                ):
                    pytest.fail(
                        f"no gpu node {GPU_NODE_DEADLINE_S} s into the job: the extractor actors do not "
                        f"request a GPU with --device cpu --extractor-gpus 1\n{log_path.read_text()[-3000:]}"
                    )
                time.sleep(1)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait(timeout=30)
        assert job.returncode == 0, log_path.read_text(errors="replace")[-4000:]

        # Idle workers go away again: the cluster scales back to the head alone.
        observer.wait_for(lambda s: alive_kinds(s) == ["head"], SCALE_DOWN_TIMEOUT_S, "scale-down to the head")
        final = observer.finish()
        assert "actors" in final, (cluster.workdir / "observer.log").read_text(errors="replace")[-3000:]
    finally:
        if observer.process.poll() is None:
            observer.process.kill()
            observer.process.wait(timeout=30)

    # The autoscaler added exactly one node of each type (nodes that came and went count too).
    kinds: dict[str, str] = {}
    for snapshot in observer.snapshots():
        for node in snapshot["nodes"]:
            if node["alive"]:
                kinds[node["id"]] = node_kind(node)
    assert sorted(kinds.values()) == ["cpu", "gpu", "head"], kinds

    # The extractor actor ran on the GPU node; the NCut actor on the CPU node.
    placements: dict[str, set[str]] = {}
    for actor in final["actors"]:
        placements.setdefault(actor["class"], set()).add(kinds.get(actor["node"], "?"))
    feature_actors = {k: v for k, v in placements.items() if "FeatureStage" in k}
    segment_actors = {k: v for k, v in placements.items() if "SegmentStage" in k}
    assert feature_actors and all(v == {"gpu"} for v in feature_actors.values()), placements
    assert segment_actors and all(v == {"cpu"} for v in segment_actors.values()), placements

    # Complete output: one ok row per image, masks at the images' sizes.
    rows = schema.read_labels(str(output)).to_pylist()
    assert sorted(Path(r["source"]).name for r in rows) == sorted(p.name for p in images)
    assert [r["status"] for r in rows] == ["ok"] * len(images), [r["error"] for r in rows]
    for row in rows:
        mask = schema.decode_mask(row["mask"])
        assert mask.shape == (row["height"], row["width"])
        assert row["num_segments"] == len(np.unique(mask))
    summary = json.loads((output / schema.SUMMARY_NAME).read_text())
    assert (summary["ok"], summary["error"]) == (len(images), 0)
