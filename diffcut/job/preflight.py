"""Checked before the run starts: every problem a person has to fix is one line (exit 2), before Ray starts.

Before the first image is read: the credentials of every S3 location the job
touches, whether input and output are the same place, and the output: a
folder or prefix (not a file), its bucket present (created only with
``--create-bucket``), nothing in it that the job would take for its own
labels, writable (a probe object is written and deleted), and no live run
writing to it (:mod:`diffcut.job.lease`). Also the ``--dry-run`` report: what a
run would do, from the listing and the output's unit records only.
docs/reliability.md, "Checked before the run starts". Plain Python, no Ray.
"""

from __future__ import annotations

import os
import uuid

from diffcut.job import schema, units
from diffcut.job.storage import (
    InputError,
    OutputError,
    check_credential_variables,
    describe_exception,
    is_remote,
    open_filesystem,
)

#: The probe object written and deleted to test that the output takes writes.
PROBE_PREFIX = "_diffcut-probe-"


def check_credentials(input: str, output: str) -> None:
    """Refuse AWS credentials no request can carry, whichever side is on S3."""
    for flag, uri in (("--input", input), ("--output", output)):
        check_credential_variables(uri, flag)


def listing_exclude(input: str, output: str) -> str | None:
    """The output, spelled as the input's listing sees it, when it lies inside the input (so it is never
    listed); refuses an output that is the input itself."""
    if is_remote(input) != is_remote(output):
        return None
    if is_remote(input):
        same, inside = output == input, output.startswith(input.rstrip("/") + "/")
        real_input = real_output = None
    else:
        real_input, real_output = os.path.realpath(input), os.path.realpath(output)
        same, inside = real_output == real_input, real_output.startswith(real_input.rstrip(os.sep) + os.sep)
    if same:
        raise InputError(
            f"--input and --output are the same place ({output}): the labels would be written among "
            "the images; choose an --output outside the input"
        )
    if not inside:
        return None
    if real_input is None:
        return output
    return os.path.join(os.path.abspath(input), os.path.relpath(real_output, real_input))


# =========================================================================== the output
def check_output(output: str, *, create_bucket: bool = False) -> bool:
    """Refuse an output that cannot be the job's, without changing anything. Returns whether it exists."""
    if is_remote(output) and not output.startswith(("s3://", "s3a://")):
        raise OutputError(f"--output {output}: only local folders and s3:// locations are supported")
    fs, root = open_filesystem(output)
    if is_remote(output):
        exists = _check_bucket(fs, root, output, create_bucket)
    else:
        exists = _check_local(root, output)
    if exists:
        foreign = foreign_files(fs, root)
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise OutputError(
                f"--output {output} holds files the job did not write where it keeps its labels "
                f"({', '.join(foreign[:3])}{more}): move them away or choose another --output"
            )
    return exists


def _check_local(root: str, output: str) -> bool:
    if os.path.isdir(root):
        return True
    if os.path.lexists(root):
        kind = "a broken link" if os.path.islink(root) else "a file"
        raise OutputError(f"--output {output} is {kind}, not a folder; choose a folder (it is created if missing)")
    parent = _existing_parent(root)
    if not os.path.isdir(parent):
        raise OutputError(f"cannot create --output {output}: {parent} is a file, not a folder")
    return False


def _existing_parent(path: str) -> str:
    """The nearest existing path above a missing local ``path``: where creating it would start."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return parent


def _check_bucket(fs, root: str, output: str, create_bucket: bool) -> bool:
    bucket, _, key = root.partition("/")
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        if create_bucket:
            return False
        raise OutputError(
            f"the bucket {bucket!r} of --output {output} does not exist: check its name, or pass "
            "--create-bucket to create it"
        ) from None
    except Exception as error:  # noqa: BLE001 - credentials, permissions, network: the user's to fix
        raise OutputError(_s3_problem(output, error)) from None
    if key.strip("/"):
        try:
            fs.call_s3("head_object", Bucket=bucket, Key=key.strip("/"))
        except FileNotFoundError:
            return True
        except Exception as error:  # noqa: BLE001
            raise OutputError(_s3_problem(output, error)) from None
        raise OutputError(
            f"--output {output} is an object (a file), not a prefix; choose a prefix that is not an object"
        )
    return True


def _s3_problem(output: str, error: BaseException) -> str:
    if isinstance(error, PermissionError):
        return (
            f"--output {output}: access denied ({describe_exception(error)}); check the AWS credentials "
            "(environment, profile or role) and the bucket's policy"
        )
    return f"cannot reach --output {output}: {describe_exception(error)}"


def foreign_files(fs, root: str) -> list[str]:
    """Names under ``root`` the job would take for its own but did not write: a ``labels-*.parquet`` file
    without the labels schema's version in its footer (an earlier diffcut's shards carry it:
    :func:`diffcut.job.units.check_layout` names those), and files where the job keeps folders
    (``labels``, ``_units``, ``_parts``)."""
    import pyarrow.parquet as pq

    fs.invalidate_cache()
    foreign = []
    key = next(iter(schema.LABELS_SCHEMA.metadata))
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:  # an S3 prefix with nothing under it yet
        return []
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if name in (units.LABELS_DIR, units.RECORDS_DIR, units.PARTS_DIR):
            if entry["type"] != "directory":
                foreign.append(name)
            continue
        if not (name.startswith("labels-") and name.endswith(".parquet")):
            continue
        if entry["type"] == "file":
            try:
                with fs.open(entry["name"], "rb") as handle:
                    if key in (pq.ParquetFile(handle, pre_buffer=False).schema_arrow.metadata or {}):
                        continue
            except Exception:  # noqa: BLE001 - not Parquet, cut off: not a shard the job wrote
                pass
        foreign.append(name)
    return sorted(foreign)


def prepare_output(output: str, *, create_bucket: bool = False) -> None:
    """Create the output (its bucket only with ``create_bucket``) and prove it takes writes and deletes."""
    fs, root = open_filesystem(output)
    try:
        if is_remote(output):
            bucket = root.partition("/")[0]
            if create_bucket and not fs.exists(bucket):
                fs.mkdir(bucket)
        else:
            os.makedirs(root, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create --output {output}: {_reason(error)}") from None
    probe(output)


def probe(output: str) -> None:
    """Write and delete a small object in the output: refuses a read-only or full output."""
    fs, root = open_filesystem(output)
    path = f"{root.rstrip('/')}/{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        fs.pipe_file(path, b"diffcut write probe\n")
        fs.rm_file(path)
    except Exception as error:  # noqa: BLE001 - read-only, full, denied: the user's to fix
        if is_remote(output):
            raise OutputError(f"the output takes no writes: {_s3_problem(output, error)}") from None
        raise OutputError(f"--output {output} takes no writes: {_reason(error)}") from None


def _reason(error: BaseException) -> str:
    """An OS error's reason without the path (the message names the output already)."""
    return getattr(error, "strerror", None) or describe_exception(error)


def check_creatable(output: str) -> None:
    """For a dry run: whether a missing local output could be created (nothing is created)."""
    if is_remote(output):
        return
    parent = _existing_parent(output)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create --output {output}: {parent} takes no writes")


# =========================================================================== --dry-run
def dry_run(
    input: str,
    output: str,
    listing,
    params: dict,
    *,
    image_column: str,
    id_column: str | None,
    limit: int | None,
    unit_files: int,
    overwrite: bool,
    exists: bool,
) -> dict:
    """The ``--dry-run`` report: the plan against the output as it is; nothing stays written, Ray is not started."""
    from diffcut.job.plan import Done, plan_inputs
    from diffcut.job.resume import output_state

    done, redo = Done(), 0
    if exists:
        probe(output)
        if not overwrite:
            done, redo = output_state(output, params, clean=False)
    else:
        check_creatable(output)
    plan = plan_inputs(
        listing, image_column=image_column, id_column=id_column, done=done, limit=limit, unit_files=unit_files
    )
    return dry_run_report(input, output, listing, plan, redo=redo, overwrite=overwrite, limit=limit, exists=exists)


def dry_run_report(
    input: str, output: str, listing, plan, *, redo: int, overwrite: bool, limit: int | None, exists: bool
) -> dict:
    """What a run would do: units and samples in total, done and to do (None: known only once read)."""
    unit_kind = {"parquet": "Parquet files", "webdataset": "tar shards"}.get(listing.format, "chunks of image files")
    return {
        "dry_run": True,
        "input": input,
        "output": output,
        "format": listing.format,
        "units": {
            "kind": unit_kind,
            "total": plan.units_listed,
            "done": plan.units_done,
            "to_do": len(plan.expected),
        },
        "samples": {"total": plan.listed, "done": plan.already_done, "to_do": plan.planned},
        "limit": limit,
        "skipped_non_input_files": plan.skipped_files,
        "output_exists": exists,
        "overwrite": overwrite,
        "units_to_redo": redo,
    }
