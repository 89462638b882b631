"""Resume: what an output already holds, from its unit records, and the run's summary.

A re-run of the same command skips the units recorded as done
(:mod:`diffcut.job.units`); what a killed run left unrecorded is deleted first
and redone whole; an output made with other label settings
(:class:`diffcut.job.settings.LabelSettings`) is refused
(docs/reliability.md). Also the run's summary (``_summary.json``), the
counts it reports, and how a run ends without one of its own (a failed output,
a signal while planning). Everything here reads records, never rows: it costs
O(units) (docs/scale.md). Plain Python on the filesystem (no Ray).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from functools import partial

from diffcut.job import inputs, schema, units, webdataset
from diffcut.job.plan import Done, SortedSources
from diffcut.job.settings import changed_settings
from diffcut.job.storage import OutputError
from diffcut.job.writer import RunCounts

log = logging.getLogger(__name__)

#: Up to this many output rows, a WebDataset run's summary checks for sample keys used in two shards
#: (it reads the ``image_id`` and ``source`` columns of every label file); beyond, it says it did not.
DUPLICATE_CHECK_ROWS = 1_000_000


def output_state(output: str, params: dict, *, clean: bool = True) -> tuple[Done, int]:
    """(what ``output`` holds, units to redo removed -- or found, without ``clean``); refuses an output made
    with other parameters. Reads the unit records only. Cleaning (the lease's holder only, as another
    run's units are unrecorded while it writes them) deletes staged parts, label files without a record
    and the units a ``--limit`` cut, so that they are redone whole."""
    current = schema.params_json(params)
    done, chunks, others, sources = Done(), defaultdict(list), set(), 0
    for record in units.iter_records(output):  # folded as read: the records are never all held
        if record.params != current:
            others.add(record.params)
        if not record.complete:
            done.partial.append(record.unit)
            continue
        done.units.add(record.unit)
        if record.sources:  # a chunk of image files: its files are streamed when planning, not kept
            chunks[record.run_id].append(record.unit)
            sources += len(record.sources)
        done.rows, done.ok, done.error = done.rows + record.rows, done.ok + record.ok, done.error + record.error
    for stored in sorted(others):
        changed = changed_settings(json.loads(stored), params)
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise inputs.InputError(
                f"{output} holds labels made with other parameters ({details}); "
                "pass --overwrite to replace them or choose another --output"
            )
    if sources:
        done.sources = SortedSources([partial(_chunk_sources, output, names) for names in chunks.values()], sources)
    if clean:
        units.remove_units(output, done.partial)
    redo = len(done.partial) + units.sweep(output, done.units | set(done.partial), delete=clean)
    if clean and redo:
        log.warning("removed %d unit(s) an earlier run left incomplete: they are redone whole", redo)
    return done, redo


def _chunk_sources(output: str, names: list[str]) -> Iterator[str]:
    """The files of one run's chunks, in path order: its chunks in name (= cut) order."""
    # One run's chunk names differ only in their index (six digits and more): by length, then by name.
    for record in units.iter_records(output, sorted(names, key=lambda name: (len(name), name))):
        yield from record.sources or ()


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
    uri = inputs.join_uri(output, schema.SUMMARY_NAME)
    try:
        units.put_durably(uri, (json.dumps(summary, indent=2) + "\n").encode())
    except OSError:
        path = inputs.open_filesystem(uri)[1]
        if not inputs.is_remote(output) and os.path.lexists(path):
            os.unlink(path)
        raise


def run_summary(
    output: str,
    run_id: str,
    *,
    listing: inputs.InputListing,
    plan: inputs.Plan,
    done: Done,
    counts: RunCounts,
    unfinished: int,
    params: dict,
    limit: int | None,
    interrupted_by: str | None,
    failure: str | None,
    pipeline_seconds: float,
    started: float,
    removed: int,
    redone: int,
    max_error_rate: float,
) -> dict:
    """The run's summary (``_summary.json``): this run's units and rows and the output's, from unit records."""
    run_rows = counts.ok + counts.error
    total_ok, total_error = done.ok + counts.ok, done.error + counts.error
    error_rate = total_error / max(1, total_ok + total_error)
    common_errors = sorted(counts.errors.items(), key=lambda item: (-item[1], item[0]))[:10]
    clean_end = interrupted_by is None and failure is None and not unfinished
    summary = {
        "run_id": run_id,
        "input": listing.root,
        "output": output,
        "format": listing.format,
        # WebDataset shards: counted while reading; every sample is counted when each shard was read to the end.
        "inputs_listed": plan.listed
        if plan.listed is not None
        else (plan.already_done + run_rows if limit is None and clean_end else None),
        "skipped_non_input_files": plan.skipped_files,
        # The first inputs.SKIPPED_NAMED of them, {"path", "reason"}: a file never labeled is named, not only counted.
        "skipped_files": listing.skipped_named,
        "units_listed": plan.units_listed,
        "units_done_before": plan.units_done,
        "units_planned": len(plan.expected),
        "units_recorded": counts.units,
        "units_unfinished": unfinished,
        "already_done": plan.already_done,
        "processed": run_rows,
        "ok": counts.ok,
        "error": counts.error,
        "seconds": round(pipeline_seconds, 3),
        "images_per_second": round(run_rows / pipeline_seconds, 3) if pipeline_seconds else 0.0,
        "wall_seconds": round(time.time() - started, 3),
        "output_rows": total_ok + total_error,
        "output_ok": total_ok,
        "output_error": total_error,
        "error_rate": round(error_rate, 6),
        "max_error_rate": max_error_rate,
        "error_rate_exceeded": error_rate > max_error_rate,
        "removed_incomplete_units": redone,
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
        warnings.append(f"stopped after {run_rows}{planned} records: {failure}")
    elif interrupted_by:
        warnings.append(
            f"interrupted by {interrupted_by} after {run_rows}{planned} records; run the same command again to resume"
        )
    elif unfinished:
        warnings.append(f"{unfinished} unit(s) were not finished: the same command redoes them")
    elif plan.planned is not None and run_rows != plan.planned:
        warnings.append(f"planned {plan.planned} records but this run wrote {run_rows} rows")
    if listing.format == "webdataset":
        summary["duplicate_keys"] = _duplicate_keys(output, total_ok + total_error)
        if summary["duplicate_keys"]["count"]:
            warnings.append(
                f"{summary['duplicate_keys']['count']} sample key(s) occur in more than one shard: "
                "their rows share an image_id (see duplicate_keys)"
            )
    if warnings:
        summary["warning"] = "; ".join(warnings)
    return json.loads(inputs.redact(json.dumps(summary)))


def _duplicate_keys(output: str, rows: int) -> dict:
    """Sample keys in two shards (:func:`diffcut.job.webdataset.duplicate_keys`), checked up to
    :data:`DUPLICATE_CHECK_ROWS` output rows (``checked`` says whether it was)."""
    if rows > DUPLICATE_CHECK_ROWS:
        return {"checked": False, "count": 0, "named": []}
    table = schema.read_labels(output, columns=["image_id", "source"])
    found = webdataset.duplicate_keys(table.column("image_id").to_pylist(), table.column("source").to_pylist())
    return {"checked": True, **found}
