"""Whole nodes lost under the label job (issue 13, item 1), on a real multi-node Ray cluster.

One cluster for the module, all on 127.0.0.1 (``ray.cluster_utils.Cluster``: one GCS and one
raylet per node, each raylet with its own object store and worker processes):

* the head, with no CPUs, which the driver attaches to (the driver's node must survive: a driver
  is the owner of every object of its job, and Ray does not survive the owner's loss);
* ``gpu1``, 1 CPU + 1 (fake) GPU: the only place the feature actors fit, since the job requests
  ``--extractor-gpus 1`` (the tiny model runs on CPU, the GPU is a scheduling resource here);
* ``cpu1`` and ``cpu2``, 2 CPUs each: decode and write tasks, segmentation actors.

Mid-run the test kills a whole node -- its raylet and every process the raylet started (dashboard
and runtime-env agents, actors, task workers), by pid, with SIGKILL -- twice in one run: first the
node that hosts the feature actor, once that actor is busy; a replacement GPU node then joins, as
an autoscaler would add one; then a node whose segmentation actor is busy. Node death is noticed
by the GCS health checks, shortened here through the Ray system config. The job must complete with
every input exactly once (docs/reliability.md says which part of that Ray Data does and which part
the job does).

The job runs as ``python jobs/label.py --address ...`` in a process of its own, as under
``ray job submit``; this test process starts the nodes but never joins the cluster as a driver.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from test_faults import TINY_FLAGS, assert_each_input_exactly_once, write_images

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
# Every node on loopback with a small object store: four raylets share this machine's memory.
NODE_ARGS = dict(node_ip_address="127.0.0.1", object_store_memory=100 * MIB)
GPU_NODE = dict(num_cpus=1, num_gpus=1)
CPU_NODE = dict(num_cpus=2)
# A raylet that stops answering is marked dead after about period * threshold (1.5 s) instead of
# Ray's default 3 s * 5 (plus a 5 s initial delay); the GCS checks each raylet over gRPC.
HEALTH_CHECKS = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_timeout_ms": 500,
    "health_check_initial_delay_ms": 0,
}
FEATURE_ACTOR = "ray::MapWorker(MapBatches(FeatureStage))"
SEGMENT_ACTOR = "ray::MapWorker(MapBatches(SegmentStage))"
JOB_TIMEOUT_S = 300


class LoopbackCluster:
    """Named nodes of a ``ray.cluster_utils.Cluster`` whose processes this test can kill."""

    def __init__(self, workdir: Path):
        import ray._private.utils
        from ray.cluster_utils import Cluster

        # Cluster() also writes the head's address into Ray's default temp dir (/tmp/ray), which it
        # does not create: on a fresh machine that no Ray has run on, the head's start failed there.
        os.makedirs(os.path.dirname(ray._private.utils.get_ray_address_file(None)), exist_ok=True)
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args=dict(
                num_cpus=0,
                include_dashboard=False,
                temp_dir=str(workdir / "ray"),
                _system_config=HEALTH_CHECKS,
                **NODE_ARGS,
            ),
        )
        self.nodes: dict = {}

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, name: str, wait: bool = True, **resources) -> None:
        self.nodes[name] = self.cluster.add_node(wait=wait, **NODE_ARGS, **resources)

    def processes(self, name: str) -> list[psutil.Process]:
        """The raylet of node ``name`` and every process it started (workers, agents)."""
        raylet = psutil.Process(self.nodes[name].all_processes["raylet"][0].process.pid)
        return [raylet, *raylet.children(recursive=True)]

    def busy_actor(self, name: str, title: str) -> bool:
        """Whether a worker of node ``name`` titled ``title`` is running a task right now."""
        for process in self.processes(name):
            try:
                cmdline = process.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if cmdline and cmdline[0].startswith(title) and cmdline[0].endswith(".submit"):
                return True
        return False

    def kill_node(self, name: str) -> list[str]:
        """SIGKILL the node's raylet and all its processes at once; returns their titles."""
        processes = self.processes(name)
        titles = []
        for process in processes:
            try:
                titles.append(process.cmdline()[0].rsplit("/", 1)[-1])
                process.send_signal(signal.SIGKILL)
            except (psutil.NoSuchProcess, IndexError):
                pass
        _, alive = psutil.wait_procs(processes, timeout=30)
        assert not alive, f"processes of {name} survived SIGKILL: {alive}"
        self.cluster.worker_nodes.discard(self.nodes.pop(name))
        return titles

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster():
    # A short path: Ray's unix sockets live under the temp dir (at most 107 bytes).
    workdir = Path(tempfile.mkdtemp(prefix="dcnl-", dir="/tmp"))
    cluster = LoopbackCluster(workdir)
    try:
        cluster.add_node("gpu1", wait=False, **GPU_NODE)
        cluster.add_node("cpu1", wait=False, **CPU_NODE)
        cluster.add_node("cpu2", wait=False, **CPU_NODE)
        cluster.cluster.wait_for_nodes(timeout=120)
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def wait_until(predicate, job: subprocess.Popen, log_path: Path, deadline: float, what: str):
    while True:
        found = predicate()
        if found:
            return found
        if job.poll() is not None or time.time() > deadline:
            raise AssertionError(
                f"{what}: not seen before the job ended or timed out\n{log_path.read_text(errors='replace')[-3000:]}"
            )
        time.sleep(0.1)


def test_lost_feature_node_and_lost_segmentation_node_lose_no_image(cluster, tmp_path):
    sources = write_images(tmp_path / "images", 32)
    output = tmp_path / "labels"
    command = [
        sys.executable,
        "jobs/label.py",
        "--address",
        cluster.address,
        "--input",
        str(tmp_path / "images"),
        "--output",
        str(output),
        "--json",
        *TINY_FLAGS,
        # The feature actor needs the GPU node; segmentation actors, decode and write tasks take
        # half a CPU each, so that the remaining CPU node alone can run all of them.
        "--extractor-gpus",
        "1",
        "--extractor-cpus",
        "1",
        "--ncut-pool-min",
        "1",
        "--ncut-pool-max",
        "2",
    ]
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "job.log"
    with open(log_path, "wb") as log:
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    kills = []
    try:
        deadline = time.time() + JOB_TIMEOUT_S
        wait_until(
            lambda: cluster.busy_actor("gpu1", FEATURE_ACTOR),
            job,
            log_path,
            deadline,
            "a busy feature actor on the GPU node",
        )
        kills.append({"node": "gpu1", "processes": cluster.kill_node("gpu1")})
        # The feature actor cannot restart anywhere until a node with a GPU joins.
        cluster.add_node("gpu2", **GPU_NODE)
        victim = wait_until(
            lambda: next((n for n in ("cpu1", "cpu2") if cluster.busy_actor(n, SEGMENT_ACTOR)), None),
            job,
            log_path,
            deadline,
            "a busy segmentation actor",
        )
        kills.append({"node": victim, "processes": cluster.kill_node(victim)})
        job.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=30)
    text = log_path.read_text(errors="replace")
    assert job.returncode == 0, text[-4000:]
    assert any(FEATURE_ACTOR.split("::")[1] in title for title in kills[0]["processes"]), kills
    assert any(SEGMENT_ACTOR.split("::")[1] in title for title in kills[1]["processes"]), kills
    summary = json.loads((output / "_summary.json").read_text())
    assert (summary["processed"], summary["ok"], summary["error"]) == (len(sources), len(sources), 0)
    assert "warning" not in summary
    assert_each_input_exactly_once(str(output), sources)
    print(json.dumps({"kills": kills, "seconds": summary["seconds"]}))
