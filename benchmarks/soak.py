"""Soak run of the labeling job: thousands of small images, throughput and memory per process.

Runs ``python jobs/label.py`` (an embedded Ray on 127.0.0.1, the tiny model on CPU) over
``--images`` generated JPEGs of 64 to 160 px and samples, every ``--interval`` seconds:

* the RSS (and USS: memory only that process holds) of the driver and of every process it
  started -- Ray's GCS, raylet, agents, and the workers, named by their process titles
  (``ray::MapWorker(MapBatches(FeatureStage))``...; a task worker is named by the titles it had);
* the rows written so far (the unit records; ``--unit-files`` and ``--write-rows`` keep units small).

Prints the per-process table of peak RSS/USS, the driver's and the long-lived actors' RSS at 10 %,
50 % and 100 % of the rows, and the least-squares slope of RSS against rows written (MB per 1,000
images, between 10 % and 100 %): a streaming pipeline stays flat. Ends with one JSON object.

Example (what benchmarks/RESULTS.md records)::

    python benchmarks/soak.py --images 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MB = 2**20


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEGs, sides 64 to 160 px, a few flat regions each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        width, height = (int(v) for v in rng.integers(64, 161, 2))
        pixels = np.empty((height, width, 3), np.uint8)
        pixels[...] = rng.integers(0, 256, 3, dtype=np.uint8)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
            x1, y1 = x0 + int(rng.integers(8, width)), y0 + int(rng.integers(8, height))
            pixels[y0:y1, x0:x1] = rng.integers(0, 256, 3, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{index:05d}.jpg", quality=90)


def process_role(title: str) -> str:
    """A short name for a process from its title or executable."""
    base = title.split()[0].rsplit("/", 1)[-1] if title else "?"
    if base.startswith("ray::"):
        return base.removesuffix(".submit").removesuffix(".__init__")
    for name in ("gcs_server", "raylet"):
        if base == name:
            return name
    for marker, name in (
        ("dashboard/agent.py", "dashboard agent"),
        ("dashboard.py", "dashboard"),
        ("log_monitor.py", "log monitor"),
        ("monitor.py", "autoscaler monitor"),
        ("runtime_env/agent", "runtime env agent"),
        ("jobs/label.py", "driver (jobs/label.py)"),
    ):
        if marker in title:
            return name
    return base


def rows_written(output: Path) -> int:
    """Rows of the units recorded under ``output`` so far (their records)."""
    from diffcut.job import units

    return sum(record.rows for record in units.read_records(str(output)))


def sample_tree(driver, table: dict, now: float) -> float:
    """Record RSS/USS of the driver and its descendants in ``table``; returns the driver's RSS (MB)."""
    import psutil

    driver_rss = float("nan")
    try:
        processes = [driver, *driver.children(recursive=True)]
    except psutil.NoSuchProcess:
        return driver_rss
    for process in processes:
        try:
            with process.oneshot():
                title = " ".join(process.cmdline()) or process.name()
                rss = process.memory_info().rss / MB
            uss = process.memory_full_info().uss / MB
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        entry = table.setdefault(process.pid, {"roles": [], "samples": []})
        role = process_role(title)
        if role not in entry["roles"] and role != "ray::IDLE":
            entry["roles"].append(role)
        entry["samples"].append((now, rss, uss))
        if process.pid == driver.pid:
            driver_rss = rss
    return driver_rss


def at_progress(
    progress: list[tuple[float, int]], samples: list[tuple[float, float, float]], total: int, fraction: float
) -> float | None:
    """RSS of a process at the sample nearest in time to when ``fraction`` of the rows were written
    (None when the process was not sampled within 2 s of that moment)."""
    reached = [t for t, rows in progress if rows >= fraction * total]
    if not reached or not samples:
        return None
    when, rss, _ = min(samples, key=lambda sample: abs(sample[0] - reached[0]))
    return rss if abs(when - reached[0]) <= 2.0 else None


def slope_per_1000(
    progress: list[tuple[float, int]], samples: list[tuple[float, float, float]], total: int
) -> float | None:
    """Least-squares slope of RSS (MB) against rows written, per 1,000 rows, over the samples taken
    once 10 % of the rows were written and the process had run 5 s (its start-up left out)."""
    times = np.array([t for t, _ in progress])
    rows = np.array([r for _, r in progress], dtype=float)
    if not times.size or not samples:
        return None
    warm = samples[0][0] + 5.0
    points = [(float(np.interp(t, times, rows)), rss) for t, rss, _ in samples if t >= warm]
    points = [(r, rss) for r, rss in points if r >= 0.1 * total]
    if len(points) < 3 or np.ptp([r for r, _ in points]) < 0.2 * total:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0] * 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--unit-files", type=int, default=50)
    parser.add_argument("--write-rows", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--workdir", default=None, help="where the images and labels go (default: a temp dir)")
    args = parser.parse_args()

    import psutil

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="diffcut-soak-"))
    images, output = workdir / "images", workdir / "labels"
    started = time.time()
    if not images.exists():
        make_images(images, args.images)
    shutil.rmtree(output, ignore_errors=True)
    print(f"{args.images} images in {images} ({time.time() - started:.1f} s to make)", file=sys.stderr)

    command = [
        sys.executable,
        "jobs/label.py",
        "--input",
        str(images),
        "--output",
        str(output),
        "--json",
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--resolution",
        str(args.resolution),
        "--batch-size",
        str(args.batch_size),
        "--unit-files",
        str(args.unit_files),
        "--write-rows",
        str(args.write_rows),
        "--decode-cpus",
        "0.5",
        "--extractor-cpus",
        "0.5",
        "--ncut-cpus",
        "0.5",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log_path = workdir / "job.log"
    table: dict[int, dict] = {}
    progress: list[tuple[float, int]] = []
    with open(log_path, "w") as log, open(workdir / "summary.json", "w") as out:
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=log, start_new_session=True)
        driver = psutil.Process(job.pid)
        launched = time.time()
        last_count = 0.0
        try:
            while job.poll() is None:
                now = time.time()
                if now - launched > args.timeout:
                    raise TimeoutError(f"the job ran longer than {args.timeout} s; see {log_path}")
                sample_tree(driver, table, now)
                if now - last_count >= 1.0:
                    progress.append((now, rows_written(output)))
                    last_count = now
                time.sleep(args.interval)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        code = job.wait()
    progress.append((time.time(), rows_written(output)))
    if code != 0:
        print(log_path.read_text()[-4000:], file=sys.stderr)
        return code
    text = (workdir / "summary.json").read_text()
    summary = json.loads(text[text.index("{") :])
    total = summary["processed"]

    rows = []
    for pid, entry in table.items():
        samples = entry["samples"]
        rss, uss = [s[1] for s in samples], [s[2] for s in samples]
        rows.append(
            {
                "pid": pid,
                "process": " / ".join(entry["roles"]) or "ray::IDLE",
                "samples": len(samples),
                "peak_rss_mb": round(max(rss), 1),
                "peak_uss_mb": round(max(uss), 1),
                "rss_at_10_50_100_mb": [
                    None if v is None else round(v, 1)
                    for v in (at_progress(progress, samples, total, f) for f in (0.1, 0.5, 1.0))
                ],
                "rss_slope_mb_per_1000_images": (
                    None if (s := slope_per_1000(progress, samples, total)) is None else round(s, 2)
                ),
            }
        )
    rows.sort(key=lambda r: (r["pid"] != job.pid, -r["peak_rss_mb"]))
    print(f"{'pid':>7}  {'process':58} {'peak RSS':>9} {'peak USS':>9}  {'RSS at 10/50/100 %':>22} {'slope':>8}")
    for r in rows:
        at = "/".join("-" if v is None else f"{v:.0f}" for v in r["rss_at_10_50_100_mb"])
        slope = "-" if r["rss_slope_mb_per_1000_images"] is None else f"{r['rss_slope_mb_per_1000_images']:+.1f}"
        print(
            f"{r['pid']:>7}  {r['process'][:58]:58} {r['peak_rss_mb']:>7.0f}MB {r['peak_uss_mb']:>7.0f}MB"
            f"  {at:>22} {slope:>8}"
        )
    print(
        "(RSS in MB at the moments 10/50/100 % of the rows were written; slope: MB of RSS per 1,000 images,\n"
        " least squares from 10 % of the rows on, a process's first 5 s left out; '-': not enough samples)"
    )

    by_time = defaultdict(float)
    for entry in table.values():
        for t, rss, _ in entry["samples"]:
            by_time[round(t, 3)] += rss
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "images": args.images,
        "ok": summary["ok"],
        "error": summary["error"],
        "output_rows": summary["output_rows"],
        "job_images_per_second": summary["images_per_second"],
        "job_seconds": summary["seconds"],
        "wall_seconds": summary["wall_seconds"],
        "processes_seen": len(table),
        "memory_samples": sum(len(e["samples"]) for e in table.values()),
        "peak_total_rss_mb": round(max(by_time.values()), 1) if by_time else None,
        "processes": rows,
    }
    print(json.dumps(result))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
