"""Plan, resume and summary at dataset scale: the driver's seconds and memory before labeling starts.

A simulation: no image is read, no Ray is started. It builds (not timed) an input and an output in
which a fraction (``--done-fraction``, default 0.5) of the input units is done, then, in a fresh
Python process (the driver), runs what :func:`diffcut.job.pipeline._label` does before and after the
stages, in its order, on a run that stops right after planning:

1. ``inputs.list_inputs(input, format)`` -- the listing;
2. ``resume.output_state(output, params)`` -- the unit records read, the parameters checked, the
   output cleaned (staged parts, unrecorded label files);
3. ``inputs.plan_inputs(listing, done=...)`` -- the units still to do;
4. ``writer.UnitProgress(plan.expected, plan.partial)`` -- the driver's bookkeeping of units in flight;
5. ``resume.run_summary(...)`` with zero run counts, and ``resume._write_summary`` (``_summary.json``).

It reports each step's seconds (``time.perf_counter``), their total, and the driver's peak RSS
(``resource.getrusage(...).ru_maxrss``) with its growth over the driver's baseline: its RSS after its
imports and a warm-up run of the same steps on a two-unit fixture (so lazy imports and filesystem
objects, which the job's driver has from its preflight checks, are not counted). The fixture is built in a
process of its own and measured in another, so building does not count either. ``--repeats N`` measures N
times, each in a fresh driver, and reports the median run; ``--workdir`` keeps the fixture, and a later
run with the same sizes and the same ``--workdir`` reuses it.

Inputs and outputs:

* ``--format webdataset`` (default): ``--shards`` empty ``.tar`` files in one folder (only their names are
  listed), and one done record per done shard (spread evenly over the listing), written with the job's
  own :func:`diffcut.job.units.write_record`: ``rows = --samples-per-shard`` (1 % of them errors, one
  message), ``params`` the default :class:`~diffcut.job.settings.LabelSettings` as the job records them,
  ``bytes`` a nominal 25,000 per row. The summary's duplicate-key check
  (:func:`diffcut.job.resume._duplicate_keys`) reads label files up to
  :data:`diffcut.job.resume.DUPLICATE_CHECK_ROWS` done rows and is skipped above: at or below that bound the
  fixture also writes each done unit's label file (every column but ``image_id``, ``source``, ``status``,
  ``error`` and ``params`` null; keys unique across shards, as img2dataset's), so that the timed summary
  reads real files; the JSON says which (``duplicate_check``).
  The target sizes (10^5 shards of 10^3-10^4 samples) are far above it.
* ``--format images --files N``: N empty ``.jpg`` files, 1,000 per folder, and a record per done chunk
  of ``--unit-files`` (1,000) consecutive listed files (:func:`diffcut.job.units.chunk_name` of an
  earlier run, its ``sources`` listed, ``input`` None), as the job records chunks of loose files. The
  JSON adds ``rss_growth_bytes_per_file``.

``--tracemalloc`` also traces the driver's Python allocations (slower, and tracing adds to the RSS:
its seconds and RSS are not the figures): the JSON adds the Python memory held after each step and
its peak within it, and the Arrow memory held after it; the lines that hold the most at the end are
printed (stderr) before it.

Examples (what benchmarks/RESULTS.md records)::

    python benchmarks/plan_scale.py --shards 100000 --samples-per-shard 10000
    python benchmarks/plan_scale.py --format images --files 1000000

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: The run id of the earlier run whose records the fixture holds.
EARLIER_RUN = "20261205T000000-0a1b2c3d"
#: Label file bytes per row written into a record when no label file is written (a nominal figure).
NOMINAL_ROW_BYTES = 25_000
ERROR_MESSAGE = "cannot decode the image: not a JPEG file"
FILES_PER_FOLDER = 1000


# =========================================================================== fixture (not timed)
def _done(index: int, fraction: float) -> bool:
    """Whether unit ``index`` is done: ``fraction`` of the units, spread evenly (as an interrupted run's
    finished units are spread over the listing)."""
    return int((index + 1) * fraction) > int(index * fraction)


def _touch_all(paths: list[str]) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for path in paths:
        os.close(os.open(path, flags, 0o644))


def _record(unit: str, rows: int, params: str, **extra):
    from diffcut.job import units

    errors = rows // 100
    return units.UnitRecord(
        unit=unit,
        rows=rows,
        ok=rows - errors,
        error=errors,
        bytes=rows * NOMINAL_ROW_BYTES,
        params=params,
        run_id=EARLIER_RUN,
        errors={ERROR_MESSAGE: errors} if errors else {},
        **extra,
    )


def _mean_record_bytes(output: str) -> float:
    from diffcut.job import units

    folder = os.path.join(output, units.RECORDS_DIR)
    sizes = [entry.stat().st_size for entry in os.scandir(folder)] if os.path.isdir(folder) else []
    return round(sum(sizes) / max(1, len(sizes)), 1)


def _label_table(shard: str, rows: int, params: str):
    """A done shard's label rows as the job writes them, the columns the summary reads filled in."""
    import pyarrow as pa

    from diffcut.job import schema, webdataset

    stem = shard.rsplit("/", 1)[-1].split(".", 1)[0]
    keys = [f"{stem}{index:07d}" for index in range(rows)]  # unique across shards, as img2dataset's keys
    status = [schema.STATUS_ERROR if index < rows // 100 else schema.STATUS_OK for index in range(rows)]
    columns = {name: pa.nulls(rows, schema.LABELS_SCHEMA.field(name).type) for name in schema.COLUMNS}
    columns.update(
        image_id=pa.array(keys),
        source=pa.array([webdataset.shard_source(shard, key) for key in keys]),
        status=pa.array(status),
        error=pa.array([ERROR_MESSAGE if s == schema.STATUS_ERROR else None for s in status], pa.string()),
        params=pa.array([params] * rows),
    )
    return pa.Table.from_pydict(columns, schema=schema.LABELS_SCHEMA)


def build_webdataset(workdir: Path, shards: int, samples: int, fraction: float) -> dict:
    from diffcut.job import inputs, resume, schema, units
    from diffcut.job.settings import LabelSettings

    folder, output = workdir / "shards", str(workdir / "output")
    folder.mkdir(parents=True)
    os.makedirs(output)  # the job's preflight creates the output before planning
    root = inputs.canonical_input(str(folder))
    names = [f"{index:06d}.tar" for index in range(shards)]
    _touch_all([f"{root}/{name}" for name in names])
    params = schema.params_json(LabelSettings().params())
    done = [name for index, name in enumerate(names) if _done(index, fraction)]
    label_files = len(done) * samples <= resume.DUPLICATE_CHECK_ROWS

    def write(name: str) -> None:
        shard = f"{root}/{name}"
        unit = units.unit_name(units.relative_name(shard, root))
        record = _record(unit, samples, params, input=shard)
        if label_files:
            data = units.table_bytes(_label_table(shard, samples, params))
            units.put_durably(units.label_file(output, unit), data)
            record.bytes = len(data)
        units.write_record(output, record)

    with ThreadPoolExecutor(max_workers=16) as pool:  # write_record fsyncs: threads overlap the waits
        list(pool.map(write, done))
    return {
        "input": root,
        "output": output,
        "done_units": len(done),
        "label_files_written": label_files,
        "mean_record_bytes": _mean_record_bytes(output),
    }


def build_images(workdir: Path, files: int, fraction: float, unit_files: int) -> dict:
    from diffcut.job import inputs, schema, units
    from diffcut.job.settings import LabelSettings

    folder, output = workdir / "images", str(workdir / "output")
    folder.mkdir(parents=True)
    os.makedirs(output)  # the job's preflight creates the output before planning
    root = inputs.canonical_input(str(folder))
    paths = []
    for start in range(0, files, FILES_PER_FOLDER):
        sub = f"{root}/{start // FILES_PER_FOLDER:04d}"
        os.mkdir(sub)
        paths.extend(f"{sub}/{index:08d}.jpg" for index in range(start, min(files, start + FILES_PER_FOLDER)))
    _touch_all(paths)
    paths.sort()  # the listing's order: its chunks are the job's chunks
    params = schema.params_json(LabelSettings().params())
    chunks = [paths[start : start + unit_files] for start in range(0, files, unit_files)]
    done = [(index, chunk) for index, chunk in enumerate(chunks) if _done(index, fraction)]

    def write(item) -> None:
        index, chunk = item
        unit = units.chunk_name(EARLIER_RUN, index)
        units.write_record(output, _record(unit, len(chunk), params, sources=list(chunk)))

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(write, done))
    return {
        "input": root,
        "output": output,
        "done_units": len(done),
        "done_files": sum(len(chunk) for _, chunk in done),
        "mean_record_bytes": _mean_record_bytes(output),
        "mean_path_chars": round(sum(map(len, paths)) / max(1, len(paths)), 1),
    }


# =========================================================================== the driver (timed, fresh process)
def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _steps(config: dict, params: dict, seconds: dict, rss: dict, held: dict, arrow: dict, trace: bool):
    """The job's steps in its order on ``config``'s input and output: (listing, done, plan, progress, summary);
    the RSS after each step, and with ``trace`` the Python memory (tracemalloc: held after the step, peak
    during it) and the Arrow memory held after it."""
    import pyarrow as pa

    from diffcut.job import inputs, resume, writer
    from diffcut.job.pipeline import new_run_id

    output, run_id, started = config["output"], new_run_id(), time.time()
    step_started = time.perf_counter()

    def step(name: str) -> None:
        nonlocal step_started
        seconds[name] = time.perf_counter() - step_started
        rss[name] = _rss_bytes()
        if trace:
            import tracemalloc

            held[name] = tracemalloc.get_traced_memory()
            arrow[name] = pa.total_allocated_bytes()
            tracemalloc.reset_peak()
        step_started = time.perf_counter()

    listing = inputs.list_inputs(config["input"], config["format"])
    step("list_inputs")
    done, redone = resume.output_state(output, params)
    step("output_state")
    plan = inputs.plan_inputs(listing, done=done, unit_files=config["unit_files"], run_id=run_id)
    step("plan_inputs")
    progress = writer.UnitProgress(plan.expected, plan.partial)
    step("unit_progress")
    summary = resume.run_summary(
        output,
        run_id,
        listing=listing,
        plan=plan,
        done=done,
        counts=progress.counts,
        unfinished=len(progress.flight),
        params=params,
        limit=None,
        interrupted_by=None,
        failure=None,
        pipeline_seconds=0.0,
        started=started,
        removed=0,
        redone=redone,
        max_error_rate=1.0,
    )
    step("run_summary")
    resume._write_summary(output, summary)
    step("write_summary")
    return listing, done, plan, progress, summary


def measure(config: dict) -> dict:
    """The job's steps in its order, in this (fresh) process; seconds and memory. A warm-up run of the same
    steps on a two-unit fixture first: the modules they import, and what the job's driver has set up before
    planning (its preflight checks use the same filesystem objects), are in the baseline, not in the figures."""
    import resource

    from diffcut.job.settings import LabelSettings

    params = LabelSettings().params()
    _steps(config["warmup"], params, {}, {}, {}, {}, False)
    trace = config.get("tracemalloc", False)
    if trace:
        import tracemalloc

        tracemalloc.start(1)
    before = set(sys.modules)
    baseline = _rss_bytes()
    baseline_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds: dict[str, float] = {}
    rss: dict[str, int] = {}
    held: dict[str, tuple[int, int]] = {}
    arrow: dict[str, int] = {}
    first = time.perf_counter()
    listing, done, plan, progress, summary = _steps(config, params, seconds, rss, held, arrow, trace)
    total = time.perf_counter() - first
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "seconds": round(total, 3),
        **{f"{name}_s": round(value, 3) for name, value in seconds.items()},
        "peak_rss_mib": round(peak / 2**20, 1),
        "baseline_rss_mib": round(baseline / 2**20, 1),
        "rss_growth_mib": round((peak - baseline) / 2**20, 1),
        "rss_at_end_mib": round(_rss_bytes() / 2**20, 1),
        "rss_after_step_mib": {name: round(value / 2**20, 1) for name, value in rss.items()},
        "baseline_peak_mib": round(baseline_peak / 2**20, 1),
        "rss_growth_bytes": peak - baseline,
        "units_listed": plan.units_listed,
        "units_done_before": plan.units_done,
        "units_planned": len(plan.expected),
        "listed_files": len(listing.paths),
        "already_done": plan.already_done,
        "output_rows": summary["output_rows"],
        "duplicate_check": summary.get("duplicate_keys", {}).get("checked"),
        "modules_imported_while_timed": sorted(set(sys.modules) - before),
    }
    if trace:
        import tracemalloc

        result["tracemalloc_held_after_step_mib"] = {name: round(value[0] / 2**20, 1) for name, value in held.items()}
        result["tracemalloc_peak_in_step_mib"] = {name: round(value[1] / 2**20, 1) for name, value in held.items()}
        result["arrow_held_after_step_mib"] = {name: round(value / 2**20, 1) for name, value in arrow.items()}
        result["tracemalloc_peak_mib"] = round(max(value[1] for value in held.values()) / 2**20, 1)
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        files = max(1, len(listing.paths))
        for stat in snapshot.statistics("lineno")[:15]:
            frame = stat.traceback[0]
            where = os.path.relpath(frame.filename, REPO) if frame.filename.startswith(str(REPO)) else frame.filename
            print(
                f"tracemalloc held at the end: {stat.size / 2**20:8.1f} MiB {stat.size / files:7.1f} B/file "
                f"{stat.count:9d} blocks  {where}:{frame.lineno}",
                file=sys.stderr,
            )
    del listing, done, plan, progress, summary
    return result


# =========================================================================== main
def build(args: dict) -> tuple[dict, dict]:
    """(the fixture, the warm-up's two-unit fixture), built under ``args["workdir"]``."""
    workdir = Path(args["workdir"])
    if args["format"] == "webdataset":
        fixture = build_webdataset(workdir, args["shards"], args["samples_per_shard"], args["done_fraction"])
        return fixture, build_webdataset(workdir / "warmup", 2, 10, 0.5)
    fixture = build_images(workdir, args["files"], args["done_fraction"], args["unit_files"])
    return fixture, build_images(workdir / "warmup", 2 * args["unit_files"], 0.5, args["unit_files"])


def _child(mode: str, config: dict):
    """Run this script in ``mode`` in a fresh process; its last line of output, as JSON. The fixture is built
    in a process of its own too: a child's ``ru_maxrss`` starts at its parent's RSS (Linux keeps the high-water
    mark across fork and exec), so the parent stays small."""
    out = subprocess.run(
        [sys.executable, __file__, mode, json.dumps(config, default=str)], stdout=subprocess.PIPE, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=("webdataset", "images"), default="webdataset")
    parser.add_argument("--shards", type=int, default=100_000, help="WebDataset shards (units)")
    parser.add_argument("--samples-per-shard", type=int, default=10_000, help="rows of each done shard's record")
    parser.add_argument("--files", type=int, default=1_000_000, help="--format images: loose image files")
    parser.add_argument("--unit-files", type=int, default=1000, help="--format images: files per chunk (unit)")
    parser.add_argument("--done-fraction", type=float, default=0.5, help="fraction of the units already done")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where to build; kept, reused by a later run of the same sizes (default: a temporary folder, removed)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="measures on the same fixture, each in a fresh driver")
    parser.add_argument("--tracemalloc", action="store_true", help="trace the driver's allocations (slower)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the driver process: its config as JSON
    parser.add_argument("--build", help=argparse.SUPPRESS)  # the fixture's builder: these arguments as JSON
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    if args.build:
        print(json.dumps(build(json.loads(args.build))))
        return
    if not 0.0 <= args.done_fraction <= 1.0:
        parser.error("--done-fraction must be between 0 and 1")
    if args.format == "webdataset":
        size = {"shards": args.shards, "samples_per_shard": args.samples_per_shard}
    else:
        size = {"files": args.files, "unit_files": args.unit_files}
    wanted = {"format": args.format, **size, "done_fraction": args.done_fraction}
    marker = None if args.workdir is None else args.workdir / "fixture.json"
    if marker is not None and marker.exists() and json.loads(marker.read_text())["wanted"] == wanted:
        workdir, kept = args.workdir, json.loads(marker.read_text())  # built by an earlier invocation: reused
    elif args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty (nor a fixture of the same sizes)")
    else:
        workdir, kept = args.workdir or Path(tempfile.mkdtemp(prefix="plan-scale-", dir="/tmp")), None
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        if kept is not None:
            fixture, warmup, build_seconds = kept["fixture"], kept["warmup"], kept["build_seconds"]
        else:
            fixture, warmup = _child("--build", {**vars(args), "workdir": str(workdir), "measure": None})
        if kept is None:
            build_seconds = time.perf_counter() - started
            if marker is not None:
                state = {"wanted": wanted, "fixture": fixture, "warmup": warmup, "build_seconds": build_seconds}
                marker.write_text(json.dumps(state))
        how = "reused" if kept else "built"
        print(f"fixture {how} ({build_seconds:.1f} s) under {workdir}: {fixture}", flush=True)
        common = {"format": args.format, "unit_files": args.unit_files}
        config = {**fixture, **common, "warmup": {**warmup, **common}, "tracemalloc": args.tracemalloc}
        runs = []
        for _ in range(max(1, args.repeats)):
            load = round(os.getloadavg()[0], 2)
            runs.append({**_child("--measure", config), "load_average_1m": load})
            print(json.dumps(runs[-1]), flush=True)
        chosen = sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]  # the median run
        result = {
            "format": args.format,
            **size,
            "done_fraction": args.done_fraction,
            "seconds": chosen["seconds"],
            "peak_rss_mib": chosen["peak_rss_mib"],
            **{k: v for k, v in chosen.items() if k not in ("seconds", "peak_rss_mib", "rss_growth_bytes")},
            "done_units": fixture["done_units"],
            "mean_record_bytes": fixture.get("mean_record_bytes"),
            "fixture_seconds": round(build_seconds, 1),
            "fixture_reused": kept is not None,
            "runs_seconds": [run["seconds"] for run in runs],
            "runs_peak_rss_mib": [run["peak_rss_mib"] for run in runs],
            "tracemalloc": args.tracemalloc,
            "date": time.strftime("%Y-%m-%d"),
            "cpus": os.cpu_count(),
        }
        if args.format == "images":
            result["mean_path_chars"] = fixture["mean_path_chars"]
            result["rss_growth_bytes_per_file"] = round(chosen["rss_growth_bytes"] / max(1, args.files), 1)
        print(json.dumps(result))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
