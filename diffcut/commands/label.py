"""``diffcut label`` (and ``jobs/label.py``): label a whole dataset with Ray Data.

The flags of the run's settings are built from the fields of :mod:`diffcut.job.settings`
(``--tau`` -> ``LabelSettings.tau``, ``--ncut-pool-max`` -> ``Pools.ncut.max``): their defaults and help
are the fields'. Every other flag is a parameter of :func:`diffcut.job.pipeline.label_dataset` of the same
name (``--image-column`` -> ``image_column``), its default that function's.

Exit status (README, docs/reliability.md "Exit statuses"): 0 the run completed (error rows
included) or the dry run found nothing to refuse; 1 the output's error rate is above
``--max-error-rate``; 2 a problem with the inputs, the output, the flags or the
credentials -- one line naming what to fix, no traceback; 128 + N signal N
stopped the run (SIGTERM: 143; the summary is written, the same command
resumes); 3 an unexpected failure (a bug, or a failure the job does not
recognise), with its traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import signal
import sys
import traceback

from diffcut.job import inputs, settings


def _defaults() -> dict:
    """The defaults of the flags that are not settings: label_dataset's signature."""
    from diffcut.job.pipeline import label_dataset

    return {
        name: p.default
        for name, p in inspect.signature(label_dataset).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none", "all") else int(text)


def add_setting_flag(group, spec: settings.Flag) -> None:
    """The flag of one settings field: its default, help, type and choices are the field's."""
    if spec.default is False:
        group.add_argument(spec.flag, action="store_true", help=spec.help)
        return
    # A str flag takes argparse's default type (the text as given), as the ordinary flags.
    kind = spec.options.get("type") or (
        None if spec.default is None or isinstance(spec.default, str) else type(spec.default)
    )
    group.add_argument(spec.flag, type=kind, default=spec.default, choices=spec.options.get("choices"), help=spec.help)


def add_speed_arguments(group) -> None:
    """The feature extractor's speed options; shared by ``diffcut label`` and ``diffcut segment``."""
    for spec in settings.flags():
        if spec.group == settings.SPEED:
            add_setting_flag(group, spec)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = _defaults()
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument(
        "--input",
        required=True,
        help="local folder/file or s3://bucket/prefix: image files (recursive; jpg jpeg png webp bmp tif "
        "tiff gif), a Parquet dataset, or WebDataset .tar shards",
    )
    io.add_argument(
        "--output", required=True, help="local folder or s3://bucket/prefix for the labels (labels/<unit>.parquet)"
    )
    io.add_argument(
        "--format",
        default=d["format"],
        choices=inputs.INPUT_FORMATS,
        help="input kind; auto detects image files, Parquet or .tar shards (img2dataset's "
        ".parquet/_stats.json beside its shards are not inputs)",
    )
    io.add_argument(
        "--image-column",
        default=d["image_column"],
        help="Parquet column with the image bytes (binary, or the HF datasets Image struct; img2dataset: jpg)",
    )
    io.add_argument(
        "--id-column",
        default=d["id_column"],
        help="Parquet column with the image ids (default: the source, file.parquet#row=N; "
        "img2dataset: key); WebDataset: the sample key",
    )
    io.add_argument(
        "--keep-metadata",
        action="store_true",
        help="copy each WebDataset sample's {key}.json into the output's metadata column",
    )
    io.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the job's previous labels in --output and start over (default: resume)",
    )
    io.add_argument(
        "--create-bucket",
        action="store_true",
        help="create the --output S3 bucket when it does not exist (default: refuse, a typo in the "
        "name would put the labels in a new bucket)",
    )
    io.add_argument(
        "--dry-run",
        action="store_true",
        help="check the input and output, print the read units and samples in total, done and to "
        "do, and exit; nothing is labeled, Ray is not started",
    )
    io.add_argument(
        "--limit", type=_optional_int, default=d["limit"], help="label at most N not-yet-done records this run"
    )
    io.add_argument(
        "--max-image-pixels",
        type=int,
        default=d["max_image_pixels"],
        help="refuse images declaring more pixels than this (decompression-bomb guard)",
    )
    io.add_argument(
        "--max-error-rate",
        type=float,
        default=d["max_error_rate"],
        help="exit 1 when more than this fraction of the output rows are errors",
    )

    groups = {}
    for name in (settings.METHOD, settings.SIZES, settings.SPEED, settings.POOLS):
        groups[name] = parser.add_argument_group(name)
        for spec in settings.flags():
            if spec.group != name:
                continue
            add_setting_flag(groups[name], spec)
            if spec.flag == "--model":  # the model, then where it runs
                groups[name].add_argument(
                    "--device",
                    default=d["device"],
                    help="feature actors' device: auto (cuda if the cluster has GPUs), cuda, cpu",
                )
    pools = groups[settings.POOLS]
    pools.add_argument(
        "--unit-files",
        type=int,
        default=d["unit_files"],
        help="loose image files per unit of work and output file (a shard or Parquet file is one unit)",
    )
    pools.add_argument(
        "--write-rows",
        type=int,
        default=d["write_rows"],
        help="rows handed to each write task; a unit's rows are staged until the unit is whole",
    )
    pools.add_argument(
        "--address",
        default=d["address"],
        help="Ray cluster to join (default: RAY_ADDRESS, else an embedded Ray on 127.0.0.1)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON only")


def format_summary(summary: dict) -> str:
    lines = [
        f"labeled {summary['processed']} images in {summary['seconds']:.1f} s "
        f"({summary['images_per_second']:.2f} images/s): {summary['ok']} ok, {summary['error']} error",
        f"skipped {summary['already_done']} already labeled; {summary['skipped_non_input_files']} non-input files",
        f"units: {summary['units_recorded']} of {summary['units_planned']} planned recorded this run, "
        f"{summary['units_done_before']} done before",
        f"output {summary['output']}: {summary['output_rows']} rows, {summary['output_ok']} ok, "
        f"{summary['output_error']} error (error rate {summary['error_rate']:.2%})",
    ]
    for entry in summary["common_errors"][:5]:
        lines.append(f"  {entry['count']} x {entry['error']}")
    if summary.get("warning"):
        lines.append(f"warning: {summary['warning']}")
    if summary["error_rate_exceeded"]:
        lines.append(f"error rate above --max-error-rate {summary['max_error_rate']}")
    return "\n".join(lines)


def format_dry_run(report: dict) -> str:
    def count(value) -> str:
        return "?" if value is None else str(value)

    units, samples = report["units"], report["samples"]
    lines = [
        f"dry run: {report['input']} ({report['format']}) -> {report['output']}; nothing was labeled",
        f"units ({units['kind']}): {count(units['total'])} in total, {units['done']} done, {units['to_do']} to do",
        f"samples: {count(samples['total'])} in total, {samples['done']} done, {count(samples['to_do'])} to do"
        + (" (a shard's samples are known once it is read)" if samples["total"] is None else ""),
        f"skipped {report['skipped_non_input_files']} non-input files",
    ]
    if report["limit"] is not None:
        lines.append(f"--limit: at most {report['limit']} records this run")
    if report["overwrite"]:
        lines.append("--overwrite: the job's labels in the output would be deleted first")
    elif report["units_to_redo"]:
        lines.append(f"{report['units_to_redo']} unit(s) an earlier run left incomplete would be redone whole")
    if not report["output_exists"]:
        lines.append("the output does not exist yet: it would be created")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from diffcut.job.pipeline import RunFailed, StoppedBeforeLabeling, label_dataset

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("botocore", "aiobotocore"):  # "Found credentials in environment variables." on every S3 run
        logging.getLogger(name).setLevel(logging.WARNING)
    names = inspect.signature(label_dataset).parameters
    try:
        kwargs = settings.job_arguments(vars(args))
        summary = label_dataset(**{name: value for name, value in kwargs.items() if name in names})
    except RunFailed as failed:  # the summary goes to stdout as always (the output may have no room for it)
        print(json.dumps(failed.summary, indent=2) if args.json else format_summary(failed.summary))
        print(f"diffcut label: {inputs.redact(failed)}", file=sys.stderr)
        return 2
    except inputs.InputError as error:
        print(f"diffcut label: {inputs.redact(error)}", file=sys.stderr)
        return 2
    except StoppedBeforeLabeling as stopped:
        print(f"diffcut label: {stopped}", file=sys.stderr)
        return 128 + signal.Signals[stopped.signal].value
    except KeyboardInterrupt:
        print("diffcut label: interrupted (SIGINT) before labeling started; nothing was labeled", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception:  # noqa: BLE001 - unexpected: the traceback is what a bug report needs
        print(inputs.redact(traceback.format_exc()), file=sys.stderr, end="")
        print("diffcut label: unexpected failure (above); the units already recorded stay valid", file=sys.stderr)
        return 3
    if summary.get("dry_run"):
        print(json.dumps(summary, indent=2) if args.json else format_dry_run(summary))
        return 0
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if summary.get("interrupted"):
        return 128 + signal.Signals[summary["interrupted_by"]].value  # as a shell reports death by that signal
    return 1 if summary["error_rate_exceeded"] else 0
