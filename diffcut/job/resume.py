"""Resume: which inputs an output already holds, and the job's own files in it.

A re-run of the same command skips the sources of the rows in complete
shards; shards a killed run left half-written are deleted first; an output
made with other label-changing parameters (:data:`RESUME_KEYS`) is refused
(docs/reliability.md). Also the run's summary (``_summary.json``) and the
counts it reports. Plain Python on the filesystem (no Ray).
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa

from diffcut.job import io as dio
from diffcut.job import schema

log = logging.getLogger(__name__)

#: Parameters that change the labels; a resumed run must match the output's.
RESUME_KEYS = ("model", "tau", "alpha", "timestep", "noise_seed", "resolution", "resize", "mask_size", "refine",
               "exact_search", "dtype", "vae_dtype")
#: Value of a resume key in outputs written before the key was recorded.
RESUME_KEY_DEFAULTS = {"vae_dtype": "auto"}


def remove_job_files(output: str, names: list[str] | None = None) -> int:
    """Delete the job's shards (or the given ones) and summary under ``output``; other files stay."""
    fs, root = dio.open_filesystem(output)
    fs.invalidate_cache()
    if not fs.exists(root):
        return 0
    if names is None:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        names = [n for n in names if schema.is_shard_name(n) or n == schema.SUMMARY_NAME]
    for name in names:
        fs.rm(root.rstrip("/") + "/" + name)
    return len(names)


def existing_output(output: str, params: dict) -> tuple[set[str], int]:
    """(sources already done, incomplete shards removed); refuses a mismatching output."""
    complete, incomplete = schema.list_shards(output)
    if incomplete:
        remove_job_files(output, [uri.rsplit("/", 1)[-1] for uri in incomplete])
        log.warning("removed %d incomplete shard(s) left by an interrupted run", len(incomplete))
    if not complete:
        return set(), len(incomplete)
    # One shard's parameters stand for the output's (every run checks them before writing), and
    # only the source column of the others is read: at a million rows the params strings alone
    # would be ~300 MB in the driver (benchmarks/resume_plan.py).
    stored = next((p for p in schema.read_shard(complete[0], ["params"]).column("params").to_pylist() if p), None)
    if stored is not None:
        previous = json.loads(stored)
        changed = {k: (previous.get(k, RESUME_KEY_DEFAULTS.get(k)), params.get(k)) for k in RESUME_KEYS
                   if previous.get(k, RESUME_KEY_DEFAULTS.get(k)) != params.get(k)}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise dio.InputError(
                f"{output} holds labels made with other parameters ({details}); "
                "pass --overwrite to replace them or choose another --output"
            )
    return schema.shard_sources(complete, threads=16 if dio.is_remote(output) else 2), len(incomplete)


def _write_summary(output: str, summary: dict) -> None:
    fs, root = dio.open_filesystem(output)
    fs.makedirs(root, exist_ok=True)
    fs.pipe(root.rstrip("/") + "/" + schema.SUMMARY_NAME, (json.dumps(summary, indent=2) + "\n").encode())


def _count(table: pa.Table) -> tuple[int, int]:
    status = table.column("status").to_pylist()
    ok = sum(s == schema.STATUS_OK for s in status)
    return ok, len(status) - ok


def _run_rows(output: str, run_id: str) -> pa.Table:
    tables = []
    for uri in schema.list_shards(output)[0]:
        if uri.rsplit("/", 1)[-1].startswith(f"{schema.SHARD_PREFIX}{run_id}-"):
            tables.append(schema.read_shard(uri, ["status", "error"]))
    if not tables:
        return pa.table({"status": pa.array([], pa.string()), "error": pa.array([], pa.string())})
    return pa.concat_tables(tables)
