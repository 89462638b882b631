"""Preemption (issue 13, item 3): SIGTERM to the driver, SIGKILL after a grace period, as
Kubernetes does, then the same command again.

The driver is ``python jobs/label.py`` with its embedded Ray, in a process session of its own
(the pod). The test sends a real SIGTERM to the driver alone (Kubernetes signals the container's
main process) once shards are being written, waits up to the grace period, then SIGKILLs every
process of the session that is left. The run must end by itself within the grace period, with
exit status 143, a ``_summary.json`` that says it was interrupted, and only valid shards besides
half-written ones that readers skip; the same command then completes with every input exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from diffcut import schema
from test_faults import TINY_FLAGS, _job_env, assert_each_input_exactly_once, write_images

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds


def session_processes(session_id: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session_id:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def test_sigterm_ends_the_run_cleanly_and_the_same_command_resumes(tmp_path):
    sources = write_images(tmp_path / "images", 40)
    output = tmp_path / "labels"
    command = [sys.executable, "jobs/label.py", "--input", str(tmp_path / "images"), "--output", str(output),
               "--json", *TINY_FLAGS]
    log_path = tmp_path / "first_run.log"
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(command, cwd=REPO, env=_job_env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    leftovers = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None and len(schema.list_shards(str(output))[0]) < 2:
            time.sleep(0.1)
        assert driver.poll() is None, log_path.read_text(errors="replace")[-3000:]
        assert time.time() < deadline, "no shard was written in time"
        signalled = time.time()
        driver.send_signal(signal.SIGTERM)
        try:
            driver.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        stopped_s = time.time() - signalled
        # The grace period is over: SIGKILL whatever is left of the pod.
        leftovers = session_processes(driver.pid)
        for process in leftovers:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
    text = log_path.read_text(errors="replace")
    assert driver.returncode == 128 + signal.SIGTERM, f"exit status {driver.returncode}\n{text[-3000:]}"
    assert stopped_s < GRACE_S

    summary = json.loads((output / schema.SUMMARY_NAME).read_text())
    assert (summary["interrupted"], summary["interrupted_by"]) == (True, "SIGTERM")
    assert "interrupted by SIGTERM" in summary["warning"]
    complete, incomplete = schema.list_shards(str(output))
    for uri in complete:  # every complete shard reads in full, with the output schema
        assert schema.read_shard(uri).schema.names == list(schema.COLUMNS)
    done = len(schema.read_labels(str(output), columns=["source"]))
    assert 0 < done < len(sources), "the signal did not interrupt the run"
    assert summary["processed"] == done and summary["output_rows"] == done

    again = subprocess.run(command, cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=300)
    (tmp_path / "second_run.log").write_text(again.stdout + again.stderr)
    assert again.returncode == 0, f"{tmp_path / 'second_run.log'}: {again.stderr[-3000:]}"
    resumed = json.loads(again.stdout[again.stdout.index("{"):])
    assert (resumed["already_done"], resumed["processed"]) == (done, len(sources) - done)
    assert resumed["removed_incomplete_shards"] == len(incomplete)
    assert resumed["interrupted"] is False and "warning" not in resumed
    assert_each_input_exactly_once(str(output), sources)
    print(json.dumps({"stopped_after_sigterm_s": round(stopped_s, 1), "killed_after_grace": len(leftovers),
                      "done_before": done, "incomplete_shards": len(incomplete)}))
