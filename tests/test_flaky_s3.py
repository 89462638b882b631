"""A flaky object store and a preempted driver (issue 13, items 2, 3 and 5), one S3-in/S3-out job.

The store is the moto server on 127.0.0.1 behind :class:`s3_fault_proxy.FaultProxy`, which resets
connections before and after the store acted, delays requests and answers ``503 SlowDown``
(seeded, bounded). The job -- ``python jobs/label.py`` with its embedded Ray, in a process
session of its own (the pod) -- reaches the store only through the proxy (``AWS_ENDPOINT_URL``);
the test checks the output directly against moto.

1. Preemption, as Kubernetes does it: once shards are being written, a real SIGTERM to the driver
   alone, up to a grace period to end, then SIGKILL to every process of the session left. The run
   must stop by itself within the grace period with exit status 143 and a ``_summary.json`` that
   says it was interrupted; every shard visible is a complete one.
2. The same command again, through the same flaky store: it completes with every input exactly
   once and no partial shard; the files that are not inputs (an extension-less non-image, a
   ``.txt``) are named in the summary, and an extension-less JPEG (a content-addressed name) is
   labeled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from s3_fault_proxy import FAULTS, FaultProxy
from test_autoscaling import session_processes
from test_faults import TINY_FLAGS, _job_env, assert_each_input_exactly_once, write_images

from diffcut.job import schema, units

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

REPO = Path(__file__).resolve().parents[1]
GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds
MAX_FAULTS = 60


@pytest.fixture
def flaky_store(s3_server):
    host, port = s3_server.rsplit("/", 1)[1].split(":")
    proxy = FaultProxy((host, int(port)), seed=13, max_faults=MAX_FAULTS, max_consecutive=2).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def preempt(command: list[str], env: dict, log_path: Path, output: str) -> tuple[int, float, int]:
    """Run ``command``, SIGTERM it once 2 units are recorded, SIGKILL its session after GRACE_S;
    (exit status, seconds from SIGTERM to exit, processes left to SIGKILL)."""
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None and len(units.recorded_units(output)) < 2:
            time.sleep(0.2)
        assert driver.poll() is None, log_path.read_text(errors="replace")[-3000:]
        assert time.time() < deadline, "no unit was recorded in time"
        signalled = time.time()
        driver.send_signal(signal.SIGTERM)
        try:
            driver.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        stopped_s = time.time() - signalled
        leftovers = session_processes(driver.pid)  # the grace period is over: SIGKILL what is left
        for process in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(leftovers, timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
    return driver.returncode, stopped_s, len(leftovers)


def test_preempted_run_on_a_flaky_store_resumes_with_every_image_exactly_once(flaky_store, s3_bucket, tmp_path):
    import boto3

    client = boto3.client("s3")  # straight to moto
    sources = []
    # Enough images that the run is still going when its second unit is recorded (with 30 the now faster
    # segmentation sometimes finished them all before the SIGTERM arrived).
    for path in write_images(tmp_path / "images", 60):
        key = f"raw/{Path(path).name}"
        client.put_object(Bucket=s3_bucket, Key=key, Body=Path(path).read_bytes())
        sources.append(f"s3://{s3_bucket}/{key}")
    jpeg = Path(write_images(tmp_path / "more", 1)[0]).read_bytes()
    client.put_object(Bucket=s3_bucket, Key="raw/cas/3f9a0c7d2b", Body=jpeg)  # a content-addressed image
    sources.append(f"s3://{s3_bucket}/raw/cas/3f9a0c7d2b")
    not_inputs = {
        f"s3://{s3_bucket}/raw/cas/77e1b04a": b'{"not": "an image"}',
        f"s3://{s3_bucket}/raw/README.txt": b"about these images",
    }
    for uri, body in not_inputs.items():
        client.put_object(Bucket=s3_bucket, Key=uri.split("/", 3)[3], Body=body)

    output = f"s3://{s3_bucket}/labels"
    command = [
        sys.executable,
        "jobs/label.py",
        "--input",
        f"s3://{s3_bucket}/raw",
        "--output",
        output,
        "--json",
        *TINY_FLAGS,
    ]
    env = dict(_job_env(), AWS_ENDPOINT_URL=flaky_store.url)
    status, stopped_s, killed = preempt(command, env, tmp_path / "first_run.log", output)
    first_log = (tmp_path / "first_run.log").read_text(errors="replace")
    assert status == 128 + signal.SIGTERM, f"exit status {status}\n{first_log[-3000:]}"
    assert stopped_s < GRACE_S
    faults_first = dict(flaky_store.counts)

    summary = json.loads(client.get_object(Bucket=s3_bucket, Key="labels/_summary.json")["Body"].read())
    assert (summary["interrupted"], summary["interrupted_by"]) == (True, "SIGTERM")
    assert "interrupted by SIGTERM" in summary["warning"]
    for uri in units.label_files(output):  # every recorded unit's file reads in full, with the output schema
        assert schema.read_shard(uri).schema.names == list(schema.COLUMNS)
    done = len(schema.read_labels(output, columns=["source"]))
    assert 0 < done < len(sources), "the signal did not interrupt the run"
    assert summary["processed"] == done

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    (tmp_path / "second_run.log").write_text(again.stdout + again.stderr)
    assert again.returncode == 0, f"{tmp_path / 'second_run.log'}: {again.stderr[-3000:]}"
    resumed = json.loads(again.stdout[again.stdout.index("{") :])
    assert (resumed["already_done"], resumed["processed"]) == (done, len(sources) - done)
    assert resumed["interrupted"] is False and "warning" not in resumed
    assert resumed["skipped_non_input_files"] == len(not_inputs)
    assert {entry["path"] for entry in resumed["skipped_files"]} == set(not_inputs)
    assert_each_input_exactly_once(output, sources)

    counts = flaky_store.counts
    assert all(counts[fault] > 0 for fault in FAULTS), counts  # every kind of fault happened
    assert sum(counts[f] for f in FAULTS if f != "delay") <= MAX_FAULTS
    print(
        json.dumps(
            {
                "stopped_after_sigterm_s": round(stopped_s, 1),
                "killed_after_grace": killed,
                "done_before": done,
                "faults_first_run": faults_first,
                "faults_total": dict(counts),
            }
        )
    )
