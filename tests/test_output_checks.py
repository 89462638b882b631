"""What is checked before a run starts, exit statuses, the output's lease and ``--dry-run`` (issues 27, 28).

Refusals run the real command line in a real process (``python -c`` around ``diffcut.cli.main``, which
also asserts that Ray was never imported), against real local folders (a file where a folder is
expected, a symlinked alias, a read-only tmpfs) and the moto S3 server on 127.0.0.1 (one with
authentication for wrong credentials). The lease runs on local disk and on S3 with racing threads.
One end-to-end pair of runs fills a small tmpfs mid-run, then resumes while a third run is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_faults import TINY_FLAGS

from diffcut.cli import main as cli_main
from diffcut.job import preflight, schema, units
from diffcut.job.lease import LEASE_NAME, Lease, LeaseHeld, holder_record
from diffcut.job.settings import LabelSettings

REPO = Path(__file__).resolve().parents[1]
RUNNER = (
    "import sys; from diffcut.cli import main; code = main(sys.argv[1:]); "
    "assert 'ray' not in sys.modules, 'Ray was imported'; sys.exit(code)"
)


def cli(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``diffcut label ARGS`` in a new process; it fails if Ray was imported."""
    return subprocess.run(
        [sys.executable, "-c", RUNNER, "label", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else dict(os.environ),
    )


def label(capsys, *args) -> subprocess.CompletedProcess:
    """``diffcut label ARGS`` in this process (the same code as :func:`cli`, without a process start)."""
    code = cli_main(["label", *map(str, args)])
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, printed.out, printed.err)


def assert_refused(result, *words: str) -> str:
    """Exit status 2 and exactly one line on stderr, no traceback, naming ``words``."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("diffcut label: "), result.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def write_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        pixels = np.empty((48 + 8 * (index % 5), 64, 3), np.uint8)
        pixels[...] = rng.integers(0, 256, 3, dtype=np.uint8)
        pixels[20:, :30] = rng.integers(0, 256, 3, dtype=np.uint8)
        path = folder / f"img_{index:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def write_done_unit(output: Path, sources: list[str], unit: str = "images-20260101T000000-0badc0de-000000") -> Path:
    """A unit as the job records it (label file, then record, default settings), error rows for ``sources``."""
    params = schema.params_json(LabelSettings().params())
    rows = [schema.error_row(s, s, "earlier run", params=params) for s in sources]
    uri = units.label_file(str(output), unit)
    units.put_durably(uri, units.table_bytes(schema.rows_to_table(rows)))
    record = units.UnitRecord(unit, len(rows), 0, len(rows), 0, params, "earlier", sources=sources)
    units.write_record(str(output), record)
    return Path(uri)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs") / "images"
    write_images(folder, 3)
    return folder


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root only): yields ``mount(options) -> folder``; unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(options: str) -> Path:
        folder = tmp_path / f"mnt{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    try:
        yield mount
    finally:
        for folder in mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


# ------------------------------------------------------------------------------ local outputs
def test_local_output_problems_are_one_line_and_exit_2(images, tmp_path, capsys):
    alias = tmp_path / "alias"
    alias.symlink_to(images)
    assert_refused(cli("--input", images, "--output", f"{images}/"), "same place")
    assert_refused(label(capsys, "--input", images, "--output", alias), "same place")

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert_refused(label(capsys, "--input", images, "--output", a_file), str(a_file), "is a file")
    assert_refused(label(capsys, "--input", images, "--output", a_file / "labels"), "cannot create", "is a file")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.table({"class": ["cat"]}), foreign / "labels-train.parquet")  # the user's own table
    (foreign / "labels-x.parquet").mkdir()
    write_done_unit(foreign, ["kept"])  # the job's own labels are not in the way
    (foreign / "_parts").write_text("a file where the job keeps a folder")
    assert_refused(
        label(capsys, "--input", images, "--output", foreign),
        "_parts",
        "labels-train.parquet",
        "labels-x.parquet",
        "did not write",
    )

    squatted = tmp_path / "squatted"
    squatted.mkdir()
    (squatted / LEASE_NAME).write_text("my notes")
    assert_refused(label(capsys, "--input", images, "--output", squatted), LEASE_NAME, "is not a lease this job wrote")


def test_a_read_only_output_is_one_line_and_exit_2(images, tmpfs, capsys):
    read_only = tmpfs("size=1m,ro")
    assert_refused(
        label(capsys, "--input", images, "--output", read_only),
        str(read_only),
        "takes no writes",
        "Read-only file system",
    )
    assert_refused(
        label(capsys, "--input", images, "--output", read_only / "labels"), "cannot create", "Read-only file system"
    )
    assert not list(read_only.iterdir())


def test_an_output_inside_the_input_through_an_alias_is_never_listed(images, tmp_path):
    """The output lies inside the input, but is named through a symlinked alias of the input."""
    alias = tmp_path / "alias"
    alias.symlink_to(images)
    exclude = preflight.listing_exclude(str(images), str(alias / "labels"))
    assert exclude == str(images / "labels")
    write_done_unit(images / "labels", ["x"])
    try:
        from diffcut.job import inputs

        listing = inputs.list_inputs(str(images), exclude=exclude)
        assert len(listing.files) == 3 and listing.format == "images"
    finally:
        shutil.rmtree(images / "labels")


# ------------------------------------------------------------------------------ S3 outputs
def test_s3_output_problems_are_one_line_and_exit_2(images, s3_bucket, tmp_path, capsys):
    import boto3

    client = boto3.client("s3")
    missing = f"missing-{uuid.uuid4().hex[:10]}"
    assert_refused(
        label(capsys, "--input", images, "--output", f"s3://{missing}/labels"),
        missing,
        "does not exist",
        "--create-bucket",
    )
    # A dry run with --create-bucket reports, and creates nothing; preparing the output creates it.
    dry = label(
        capsys, "--input", images, "--output", f"s3://{missing}/labels", "--create-bucket", "--dry-run", "--json"
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert json.loads(dry.stdout)["output_exists"] is False
    assert missing not in [b["Name"] for b in client.list_buckets()["Buckets"]]
    preflight.prepare_output(f"s3://{missing}/labels", create_bucket=True)
    client.head_bucket(Bucket=missing)

    fresh = label(capsys, "--input", images, "--output", f"s3://{s3_bucket}/fresh", "--dry-run", "--json")
    assert fresh.returncode == 0 and json.loads(fresh.stdout)["samples"]["to_do"] == 3, fresh.stderr

    client.put_object(Bucket=s3_bucket, Key="labels", Body=b"an object")
    assert_refused(label(capsys, "--input", images, "--output", f"s3://{s3_bucket}/labels"), "is an object")

    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"class": ["cat"]}), buffer)
    client.put_object(Bucket=s3_bucket, Key="out/labels-mine.parquet", Body=buffer.getvalue().to_pybytes())
    assert_refused(label(capsys, "--input", images, "--output", f"s3://{s3_bucket}/out"), "labels-mine.parquet")

    # A stray newline in a credential: refused at once with a local input too (it used to hang in retries).
    secret = os.environ["AWS_SECRET_ACCESS_KEY"] + "\n"
    started = time.monotonic()
    line = assert_refused(
        cli(
            "--input",
            images,
            "--output",
            f"s3://{s3_bucket}/fresh",
            env={**os.environ, "AWS_SECRET_ACCESS_KEY": secret},
        ),
        f"--output s3://{s3_bucket}/fresh",
        "AWS_SECRET_ACCESS_KEY",
        "control character",
    )
    assert time.monotonic() - started < 30 and secret.strip() not in line


@pytest.fixture
def s3_with_authentication(tmp_path):
    """A moto S3 server in its own process that checks credentials (every request: no IAM user exists)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as connection:
                if connection.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait(timeout=30)


def test_wrong_s3_credentials_on_the_output_are_one_line_and_exit_2(images, s3_with_authentication):
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": s3_with_authentication,
        "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0",
        "AWS_SECRET_ACCESS_KEY": "wrong-secret-value-0123456789",
    }
    env.pop("AWS_SESSION_TOKEN", None)
    line = assert_refused(
        cli("--input", images, "--output", "s3://labels-bucket/run", env=env), "access denied", "credentials"
    )
    assert "wrong-secret-value" not in line


# ------------------------------------------------------------------------------ the lease
@pytest.fixture(params=["local", "s3"])
def lease_output(request, tmp_path) -> str:
    if request.param == "local":
        (tmp_path / "out").mkdir()
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out"


def test_runs_racing_for_a_lease_get_one_winner_and_the_others_name_it(lease_output):
    leases = [Lease(lease_output, f"run-{index}") for index in range(6)]
    outcomes: dict[int, str | None] = {}
    start = threading.Barrier(len(leases))

    def take(index: int) -> None:
        start.wait()
        try:
            leases[index].acquire()
            outcomes[index] = None
        except LeaseHeld as held:
            outcomes[index] = str(held)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [i for i, message in outcomes.items() if message is None]
    assert len(outcomes) == len(leases) and len(winners) == 1, outcomes
    for message in (m for m in outcomes.values() if m is not None):
        assert f"run run-{winners[0]}, pid {os.getpid()} on host {socket.gethostname()}, since " in message
    leases[winners[0]].release()
    with Lease(lease_output, "next"):  # released: taken at once
        pass


def test_a_dead_holders_lease_is_taken_over_a_live_ones_is_not(lease_output):
    writer = Lease(lease_output, "writer").store
    # The holder ran on this machine and its process is gone (no pid is above Linux's largest): stale at once.
    dead = dict(holder_record("crashed", 120.0), pid=2**22 + 7)
    assert writer.create(dead) is not None
    with Lease(lease_output, "after-crash") as lease:
        assert lease.store.read()[0]["run_id"] == "after-crash"
    # Another machine's run, renewed moments ago: held. Once its period passes without renewal: taken.
    elsewhere = dict(holder_record("remote", 1.0), host="node-7", host_key="node-7/boot/pid:[1]", pid=4242)
    assert writer.create(elsewhere) is not None
    with pytest.raises(LeaseHeld, match="run remote, pid 4242 on host node-7"):
        Lease(lease_output, "too-early").acquire()
    time.sleep(2.2)  # S3 times have a resolution of one second
    with Lease(lease_output, "later") as lease:
        assert lease.store.read()[0]["run_id"] == "later"


def test_the_heartbeat_renews_the_lease_and_notices_a_takeover(lease_output):
    lost = threading.Event()
    lease = Lease(lease_output, "beating", ttl=0.6, on_lost=lambda message: lost.set())
    lease.acquire()
    try:
        first, token, _ = lease.store.read()
        deadline = time.monotonic() + 10
        while lease.store.read()[0]["renewed"] == first["renewed"] and time.monotonic() < deadline:
            time.sleep(0.05)
        record, token, _ = lease.store.read()
        assert record["run_id"] == "beating" and record["renewed"] > first["renewed"]
        # Another run takes it over (as after this run stalled past its period): this run learns it.
        while lease.store.replace(token, holder_record("usurper", 120.0)) is None:
            token = lease.store.read()[1]
        assert lost.wait(10) and "took the lease" in lease.lost
    finally:
        lease.release()
    assert lease.store.read()[0]["run_id"] == "usurper"  # not deleted: no longer this run's


def test_a_local_lease_without_hard_links_is_still_exclusive(tmp_path, monkeypatch):
    """Filesystems without hard links (vfat, some network filesystems): an exclusive create instead."""

    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with Lease(str(tmp_path), "first"):
        with pytest.raises(LeaseHeld, match="run first"):
            Lease(str(tmp_path), "second").acquire()
        assert [p.name for p in tmp_path.iterdir()] == [LEASE_NAME]
    assert not list(tmp_path.iterdir())


def test_readers_do_not_mistake_the_lease_for_labels(tmp_path):
    output = tmp_path / "out"
    write_done_unit(output, ["a", "b"])
    with Lease(str(output), "reading"):
        assert (output / LEASE_NAME).exists()
        assert sorted(schema.read_labels(str(output), columns=["source"]).column("source").to_pylist()) == ["a", "b"]
        import pyarrow.dataset as ds

        assert ds.dataset(str(output), format="parquet").to_table().num_rows == 2  # "_" files are not data
        assert preflight.foreign_files(*_local_fs(output)) == []


def _local_fs(path: Path):
    from diffcut.job.storage import open_filesystem

    return open_filesystem(str(path))


def test_a_live_lease_stops_resume_overwrite_and_dry_run_from_touching_the_output(images, tmp_path, capsys):
    output = tmp_path / "labels"
    done = write_done_unit(output, [str(images / "img_000.png")])
    half = done.with_name("images-20260101T000000-0badc0de-000001.parquet")
    half.write_bytes(done.read_bytes())  # a unit not recorded yet: the live run's, or a killed run's
    holder = Lease(str(output), "live-run")
    holder.acquire()
    try:
        for extra in ([], ["--overwrite"], ["--dry-run"]):
            assert cli_main(["label", "--input", str(images), "--output", str(output), *extra]) == 2
            err = capsys.readouterr().err
            assert "another run is writing" in err and "run live-run" in err and "Traceback" not in err
        assert done.exists() and half.exists()
    finally:
        holder.release()
    # Without a holder the dry run reports what a run would do, and still deletes nothing.
    assert cli_main(["label", "--input", str(images), "--output", str(output), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["units"] == {"kind": "chunks of image files", "total": 2, "done": 1, "to_do": 1}
    assert report["samples"] == {"total": 3, "done": 1, "to_do": 2}
    assert report["units_to_redo"] == 1 and half.exists() and not (output / LEASE_NAME).exists()


# ------------------------------------------------------------------------------ --dry-run, exit statuses
def test_dry_run_reports_units_and_samples_without_ray(tmp_path):
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    for name, rows in (("part-0", 3), ("part-1", 2)):
        table = pa.table({"image": [b"x"] * rows, "key": [f"{name}-{i}" for i in range(rows)]})
        pq.write_table(table, parquet / f"{name}.parquet", row_group_size=2)
    output = tmp_path / "labels"
    write_done_unit(output, [f"{parquet}/part-0.parquet#row={row}" for row in (0, 1, 2)], unit="part-0.parquet")
    before = sorted(p.relative_to(output) for p in output.rglob("*"))
    result = cli("--input", parquet, "--output", output, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "units (Parquet files): 2 in total, 1 done, 1 to do" in result.stdout
    assert "samples: 5 in total, 3 done, 2 to do" in result.stdout
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before


def test_exit_statuses_of_the_job_script(images, tmp_path, monkeypatch, capsys):
    """2 for bad flags (argparse's and the job's), one line; 3 with the traceback for an unexpected failure."""
    result = subprocess.run(
        [sys.executable, "jobs/label.py", "--input", str(images), "--output", str(tmp_path / "out"), "--tau", "-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_refused(result, "--tau and --alpha must be positive")
    with pytest.raises(SystemExit) as refused:
        cli_main(["label", "--input", str(images), "--output", str(tmp_path), "--no-such-flag"])
    assert refused.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err

    from diffcut.job import inputs

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the listing")

    monkeypatch.setattr(inputs, "list_inputs", broken)
    assert cli_main(["label", "--input", str(images), "--output", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug in the listing" in err
    assert not (tmp_path / "out" / LEASE_NAME).exists()


# ------------------------------------------------------------------------------ end to end (Ray)
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_full_disk_stops_cleanly_and_the_same_command_resumes_exactly_once(tmp_path, tmpfs):
    """The output's tmpfs fills mid-run: one line, exit 2, the summary on stdout. With room again the
    same command labels the rest; a third run started meanwhile is refused, naming it."""
    sources = write_images(tmp_path / "images", 16)
    disk = tmpfs("size=2m")
    output = disk / "labels"
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    # Never room for all 8 units' label files and records (8 x (12 + 4) KB) and the lease: the run fails; how many
    # units it records first depends on how staged rows (8 x 12 KB) and finishes interleave.
    ballast.write_bytes(b"\0" * (free - 130 * 1024))
    command = [
        sys.executable,
        "jobs/label.py",
        "--input",
        str(tmp_path / "images"),
        "--output",
        str(output),
        *TINY_FLAGS,
        "--unit-files",
        "2",
        "--write-rows",
        "2",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    full = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 2, full.stderr[-4000:]
    assert "Traceback" not in full.stderr, full.stderr[-4000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"diffcut label: writing to --output {output} failed: no space left on device"), last
    assert "stopped after" in full.stdout and "run the same command to resume" in last
    assert not (output / LEASE_NAME).exists()

    ballast.unlink()
    log = open(tmp_path / "resume.log", "w")
    resume = subprocess.Popen(
        command + ["--json"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (output / LEASE_NAME).exists() and time.monotonic() < deadline and resume.poll() is None:
            time.sleep(0.05)
        holder = json.loads((output / LEASE_NAME).read_text())
        assert_refused(
            cli("--input", tmp_path / "images", "--output", output, *TINY_FLAGS),
            "another run is writing",
            f"run {holder['run_id']}, pid {resume.pid} on host",
        )
        out, _ = resume.communicate(timeout=300)
    finally:
        if resume.poll() is None:
            os.killpg(resume.pid, signal.SIGKILL)
        log.close()
    assert resume.returncode == 0, (tmp_path / "resume.log").read_text()[-4000:]
    summary = json.loads(out[out.index("{") :])
    assert summary["processed"] + summary["already_done"] == len(sources)
    counted = {}
    for uri in units.label_files(str(output)):
        for source in schema.read_shard(uri, ["source"]).column("source").to_pylist():
            counted[source] = counted.get(source, 0) + 1
    assert counted == {source: 1 for source in sources}
    assert not (output / LEASE_NAME).exists() and json.loads((output / "_summary.json").read_text())["output_ok"] == 16
