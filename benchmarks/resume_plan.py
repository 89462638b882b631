"""Planning a resumed run over a large output: time and driver memory (issue 13, item 4).

Builds once (kept under ``--dir``):

* ``images/``: ``--sources`` + ``--pending`` empty files named like a content-addressed photo
  store (``images/3f/9a/3f9a...c1.jpg``, 40 hex digits). Planning never opens an image file with
  an image extension, so empty files list exactly like real ones.
* ``labels/``: shards as the job writes them (``labels-<run>-<uuid>-<task>.parquet``,
  ``--shard-rows`` rows each, the output schema) holding one ok row for each of the first
  ``--sources`` files: realistic ``source`` and ``params`` strings, no masks or segments.

Then, in a fresh Python process (the driver), runs the planning steps of
:func:`diffcut.job.pipeline.label_dataset` in its order -- the done set from the output
(:func:`diffcut.job.resume.existing_output`: list the shards, check their footers, read the sources
and one row's parameters), the listing (:func:`diffcut.job.inputs.list_inputs`) and the filtering
(:func:`diffcut.job.inputs.plan_image_files`) -- and prints the seconds of each step and the driver's peak
RSS. Ends with one JSON object. ``--runs`` repeats the measure (the page cache is warm after the
first: the numbers of later runs are those of a re-run right after a preempted one).

Example (what benchmarks/RESULTS.md records)::

    python benchmarks/resume_plan.py --sources 1000000 --pending 1000 --dir /tmp/resume-bench
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def image_path(root: Path, index: int) -> Path:
    digest = hashlib.sha1(index.to_bytes(8, "little")).hexdigest()
    return root / digest[:2] / digest[2:4] / f"{digest}.jpg"


def build(folder: Path, sources: int, pending: int, shard_rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffcut.job import schema
    from diffcut.job.settings import LabelSettings

    marker = folder / f"built-{sources}-{pending}-{shard_rows}"
    if marker.exists():
        return
    images, labels = folder / "images", folder / "labels"
    started = time.time()
    paths = [image_path(images, i) for i in range(sources + pending)]
    for directory in sorted({p.parent for p in paths}):
        directory.mkdir(parents=True, exist_ok=True)
    for path in paths:
        path.touch()
    labels.mkdir(parents=True, exist_ok=True)
    params = schema.params_json(LabelSettings().params())  # the paper's settings, as the job records them
    done = sorted(str(p) for p in paths[:sources])  # the job's sources: the listed paths
    for task, start in enumerate(range(0, sources, shard_rows)):
        chunk = done[start : start + shard_rows]
        rows = len(chunk)
        columns = {name: pa.nulls(rows, schema.LABELS_SCHEMA.field(name).type) for name in schema.COLUMNS}
        columns.update(
            image_id=pa.array(chunk),
            source=pa.array(chunk),
            status=pa.array(["ok"] * rows),
            width=pa.array([640] * rows, pa.int32()),
            height=pa.array([480] * rows, pa.int32()),
            params=pa.array([params] * rows),
        )
        table = pa.Table.from_pydict(columns, schema=schema.LABELS_SCHEMA)
        pq.write_table(
            table, labels / f"{schema.SHARD_PREFIX}20261202T120000-0a1b2c3d-{task // 4096:04x}-{task:06d}.parquet"
        )
    marker.touch()
    print(
        f"built {sources + pending:,} input files and {sources:,} labeled rows in {time.time() - started:.0f} s",
        flush=True,
    )


MEASURE = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from diffcut.job import inputs
from diffcut.job.resume import existing_output
from diffcut.job.settings import LabelSettings
images, labels, params = sys.argv[2], sys.argv[3], LabelSettings().params()
times = {}
started = time.perf_counter()
done, incomplete = existing_output(labels, params)
times["done_set_s"] = time.perf_counter() - started
step = time.perf_counter()
listing = inputs.list_inputs(images, "auto", exclude=labels)
times["listing_s"] = time.perf_counter() - step
step = time.perf_counter()
plan = inputs.plan_image_files(listing.files, done=done)
times["filtering_s"] = time.perf_counter() - step
times["total_s"] = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({**{k: round(v, 2) for k, v in times.items()}, "driver_peak_rss_mib": round(peak / 2**20),
                  "done": len(done), "listed": plan.listed, "already_done": plan.already_done,
                  "planned": plan.planned}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=1_000_000, help="labeled sources already in the output")
    parser.add_argument("--pending", type=int, default=1000, help="input files not labeled yet")
    parser.add_argument("--shard-rows", type=int, default=256, help="rows per shard (the job's default)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/diffcut-resume-bench"), help="where to build (kept)")
    parser.add_argument("--runs", type=int, default=2, help="measures, each in a fresh driver process")
    args = parser.parse_args()
    build(args.dir, args.sources, args.pending, args.shard_rows)
    results = []
    for _ in range(args.runs):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                MEASURE,
                str(REPO),
                str(args.dir / "images"),
                str(args.dir / "labels"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(
        json.dumps(
            {
                "sources": args.sources,
                "pending": args.pending,
                "shard_rows": args.shard_rows,
                "cpus": os.cpu_count(),
                "runs": results,
            }
        )
    )


if __name__ == "__main__":
    main()
