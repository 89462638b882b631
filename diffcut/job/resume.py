"""Resume: which inputs an output already holds, and the job's own files in it.

A re-run of the same command skips the sources of the rows in complete
shards; shards a killed run left half-written are deleted first; an output
made with other label settings (:class:`diffcut.job.settings.LabelSettings`) is refused
(docs/reliability.md). Also the run's summary (``_summary.json``), the
counts it reports, and how a run ends without one of its own (a failed output,
a signal while planning). Plain Python on the filesystem (no Ray).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict

import pyarrow as pa

from diffcut.job import inputs, schema, webdataset
from diffcut.job.settings import changed_settings
from diffcut.job.storage import OutputError

log = logging.getLogger(__name__)


def remove_job_files(output: str, names: list[str] | None = None) -> int:
    """Delete the job's shards (or the given ones) and summary under ``output``; other files stay."""
    fs, root = inputs.open_filesystem(output)
    fs.invalidate_cache()
    if not fs.exists(root):
        return 0
    if names is None:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        names = [n for n in names if schema.is_shard_name(n) or n == schema.SUMMARY_NAME]
    for name in names:
        fs.rm(root.rstrip("/") + "/" + name)
    return len(names)


def existing_output(output: str, params: dict, *, remove: bool = True) -> tuple[set[str], int]:
    """(sources already done, incomplete shards removed -- or found, without ``remove``); refuses a
    mismatching output. Removing is for the lease's holder only (:mod:`diffcut.job.lease`): another
    run's shards are incomplete while it writes them."""
    complete, incomplete = schema.list_shards(output)
    if incomplete and remove:
        remove_job_files(output, [uri.rsplit("/", 1)[-1] for uri in incomplete])
        log.warning("removed %d incomplete shard(s) left by an interrupted run", len(incomplete))
    if not complete:
        return set(), len(incomplete)
    # One shard's parameters stand for the output's (every run checks them before writing), and
    # only the source column of the others is read: at a million rows the params strings alone
    # would be ~300 MB in the driver (benchmarks/resume_plan.py).
    stored = next((p for p in schema.read_shard(complete[0], ["params"]).column("params").to_pylist() if p), None)
    if stored is not None:
        changed = changed_settings(json.loads(stored), params)
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise inputs.InputError(
                f"{output} holds labels made with other parameters ({details}); "
                "pass --overwrite to replace them or choose another --output"
            )
    return schema.shard_sources(complete, threads=16 if inputs.is_remote(output) else 2), len(incomplete)


class RunFailed(OutputError):
    """The output failed mid-run (full, read-only); ``summary`` is the run's summary, written where possible."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class StoppedBeforeLabeling(Exception):
    """A signal (its name in ``signal``) stopped the run while it planned: nothing was labeled."""

    def __init__(self, signal_name: str):
        super().__init__(
            f"stopped by {signal_name} before labeling started; nothing was labeled, the same command starts again"
        )
        self.signal = signal_name


def _write_summary(output: str, summary: dict) -> None:
    """Replace the output's summary whole; when that fails (a full disk), none stays that describes an older run."""
    fs, root = inputs.open_filesystem(output)
    fs.makedirs(root, exist_ok=True)
    path, data = root.rstrip("/") + "/" + schema.SUMMARY_NAME, (json.dumps(summary, indent=2) + "\n").encode()
    if inputs.is_remote(output):
        fs.pipe_file(path, data)  # an object appears whole
        return
    temporary = f"{path}.{summary['run_id']}.tmp"
    try:
        fs.pipe_file(temporary, data)
        os.replace(temporary, path)
    except OSError:
        for name in (temporary, path):
            if os.path.lexists(name):
                os.unlink(name)
        raise


def run_summary(
    output: str,
    run_id: str,
    *,
    listing: inputs.InputListing,
    plan: inputs.Plan,
    params: dict,
    limit: int | None,
    interrupted_by: str | None,
    failure: str | None,
    pipeline_seconds: float,
    started: float,
    removed: int,
    incomplete: int,
    max_error_rate: float,
) -> dict:
    """The run's summary (``_summary.json``): this run's rows and the output's, counted from the shards."""
    complete = schema.list_shards(output)[0]  # listed (and every local footer checked) once for both counts
    run_table = _run_rows(complete, run_id)
    run_ok, run_error = _count(run_table)
    by_key = listing.format == "webdataset"  # a sample key used in two shards is only known once both are read
    totals = schema.labels_of_shards(complete, columns=["source", "status"] + (["image_id"] if by_key else []))
    total_ok, total_error = _count(totals)
    error_rate = total_error / max(1, total_ok + total_error)
    error_counts: dict[str, int] = defaultdict(int)
    for status, message in zip(run_table.column("status").to_pylist(), run_table.column("error").to_pylist()):
        if status == schema.STATUS_ERROR:
            error_counts[message] += 1
    common_errors = sorted(error_counts.items(), key=lambda item: (-item[1], item[0]))[:10]
    summary = {
        "run_id": run_id,
        "input": listing.root,
        "output": output,
        "format": listing.format,
        # WebDataset shards: counted while reading; every sample is counted when each shard was read to the end.
        "inputs_listed": plan.listed
        if plan.listed is not None
        else (
            plan.already_done + run_ok + run_error
            if limit is None and interrupted_by is None and failure is None
            else None
        ),
        "skipped_non_input_files": plan.skipped_files,
        # The first inputs.SKIPPED_NAMED of them, {"path", "reason"}: a file never labeled is named, not only counted.
        "skipped_files": listing.skipped_named,
        "already_done": plan.already_done,
        "processed": run_ok + run_error,
        "ok": run_ok,
        "error": run_error,
        "seconds": round(pipeline_seconds, 3),
        "images_per_second": round((run_ok + run_error) / pipeline_seconds, 3) if pipeline_seconds else 0.0,
        "wall_seconds": round(time.time() - started, 3),
        "output_rows": total_ok + total_error,
        "output_ok": total_ok,
        "output_error": total_error,
        "error_rate": round(error_rate, 6),
        "max_error_rate": max_error_rate,
        "error_rate_exceeded": error_rate > max_error_rate,
        "removed_incomplete_shards": incomplete,
        "removed_by_overwrite": removed,
        "interrupted": interrupted_by is not None,
        "interrupted_by": interrupted_by,
        "failed": failure,
        "common_errors": [{"error": message, "count": count} for message, count in common_errors],
        "params": params,
    }
    warnings = []
    planned = "" if plan.planned is None else f" of {plan.planned} planned"
    if failure:
        warnings.append(f"stopped after {run_ok + run_error}{planned} records: {failure}")
    elif interrupted_by:
        warnings.append(
            f"interrupted by {interrupted_by} after {run_ok + run_error}{planned} "
            "records; run the same command again to resume"
        )
    elif plan.planned is not None and run_ok + run_error != plan.planned:
        warnings.append(f"planned {plan.planned} records but this run wrote {run_ok + run_error} rows")
    if by_key:
        summary["duplicate_keys"] = webdataset.duplicate_keys(
            totals.column("image_id").to_pylist(), totals.column("source").to_pylist()
        )
        if summary["duplicate_keys"]["count"]:
            warnings.append(
                f"{summary['duplicate_keys']['count']} sample key(s) occur in more than one shard: "
                "their rows share an image_id (see duplicate_keys)"
            )
    if warnings:
        summary["warning"] = "; ".join(warnings)
    return json.loads(inputs.redact(json.dumps(summary)))


def _count(table: pa.Table) -> tuple[int, int]:
    status = table.column("status").to_pylist()
    ok = sum(s == schema.STATUS_OK for s in status)
    return ok, len(status) - ok


def _run_rows(complete: list[str], run_id: str) -> pa.Table:
    tables = []
    for uri in complete:
        if uri.rsplit("/", 1)[-1].startswith(f"{schema.SHARD_PREFIX}{run_id}-"):
            tables.append(schema.read_shard(uri, ["status", "error"]))
    if not tables:
        return pa.table({"status": pa.array([], pa.string()), "error": pa.array([], pa.string())})
    return pa.concat_tables(tables)
