"""``diffcut label`` (and ``jobs/label.py``): label a whole dataset with Ray Data.

Every flag is a parameter of :func:`diffcut.job.pipeline.label_dataset` of the same
name (``--image-column`` -> ``image_column``); defaults come from that
function's signature, so the two cannot drift apart.

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

from diffcut.job import inputs


def _defaults() -> dict:
    # Reading the signature imports Ray; only the label command pays for it.
    from diffcut.job.pipeline import label_dataset

    return {
        name: p.default
        for name, p in inspect.signature(label_dataset).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none", "all") else int(text)


def batch_size_arg(text: str) -> int | str:
    """``--batch-size``: a positive integer or ``auto``."""
    if text.lower() == "auto":
        return "auto"
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1, or auto")
    return value


def add_speed_arguments(group, defaults: dict) -> None:
    """The feature extractor's speed options; shared by ``diffcut label`` and ``diffcut segment``."""
    from diffcut.method.features import ATTENTION_KERNELS, VAE_DTYPES

    group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the VAE encoder and the truncated UNet (dynamic sizes; the first call "
        "per size range compiles)",
    )
    group.add_argument("--channels-last", action="store_true", help="NHWC memory format for the convolutions")
    group.add_argument(
        "--attention",
        default=defaults["attention"],
        choices=ATTENTION_KERNELS,
        help="attention kernel: sdpa (flash / memory-efficient on CUDA) or eager (reference)",
    )
    group.add_argument("--tf32", action="store_true", help="TF32 for float32 matmuls and convolutions on CUDA")
    group.add_argument(
        "--vae-dtype",
        default=defaults["vae_dtype"],
        choices=VAE_DTYPES,
        help="VAE encoder dtype: auto (the VAE config's: float32 for SDXL's under float16); "
        "bfloat16 deviates from the paper",
    )


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
    io.add_argument("--output", required=True, help="local folder or s3://bucket/prefix for the Parquet shards")
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
        help="delete the job's previous shards in --output and start over (default: resume)",
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

    method = parser.add_argument_group("method (DiffCut)")
    method.add_argument(
        "--model",
        default=d["model"],
        help="diffusers pipeline: hub id, local folder (safetensors), or tiny-random (tests)",
    )
    method.add_argument(
        "--device", default=d["device"], help="feature actors' device: auto (cuda if the cluster has GPUs), cuda, cpu"
    )
    method.add_argument("--dtype", default=d["dtype"], help="model dtype: auto (float16 on CUDA), float32, bfloat16")
    method.add_argument("--tau", type=float, default=d["tau"], help="recursive NCut threshold")
    method.add_argument("--alpha", type=float, default=d["alpha"], help="affinity exponent")
    method.add_argument("--timestep", type=int, default=d["timestep"], help="diffusion timestep of the noised latent")
    method.add_argument(
        "--exact-search",
        action="store_true",
        help="search every sweep cut of the Fiedler vector, not the paper's 100 thresholds",
    )
    method.add_argument("--refine", action="store_true", help="refine masks with PAMR (paper's headline numbers)")
    method.add_argument(
        "--vocabulary",
        default=d["vocabulary"],
        help="name every segment: voc, context, coco-object, or FILE (one class per line, "
        "synonyms comma-separated); adds a CLIP naming stage and class columns",
    )
    method.add_argument(
        "--naming-model",
        default=d["naming_model"],
        help="open_clip ConvNeXt CLIP for --vocabulary: name:pretrained tag, hub id, local "
        "folder (safetensors), or tiny-random (tests)",
    )

    sizes = parser.add_argument_group("sizes")
    sizes.add_argument(
        "--resolution",
        type=int,
        default=d["resolution"],
        help="model input: about resolution^2 pixels (a multiple of 32)",
    )
    sizes.add_argument(
        "--resize",
        default=d["resize"],
        choices=inputs.RESIZE_MODES,
        help="square: resolution x resolution (paper); bucket: keep the aspect ratio",
    )
    sizes.add_argument(
        "--mask-size", default=d["mask_size"], help="output mask size: original, model, N (longest side), or WxH"
    )

    add_speed_arguments(parser.add_argument_group("speed (feature actors)"), d)

    pools = parser.add_argument_group("Ray pools")
    pools.add_argument(
        "--batch-size",
        type=batch_size_arg,
        default=d["batch_size"],
        help="images per feature-extraction call, or auto: the largest that fits the GPU memory, "
        "per input size (1 on CPU)",
    )
    pools.add_argument(
        "--decode-batch-size",
        type=int,
        default=d["decode_batch_size"],
        help="image files per read/decode task (WebDataset: images a shard's task holds at "
        "once); a task orders them by model input size so "
        "that model calls fill up (larger: fewer blank images in the calls, more memory: "
        "the encoded files of a task are held together)",
    )
    pools.add_argument(
        "--decode-cpus", type=float, default=d["decode_cpus"], help="CPUs per read/decode task and per write task"
    )
    pools.add_argument("--extractor-pool-min", type=int, default=d["extractor_pool_min"], help="minimum feature actors")
    pools.add_argument("--extractor-pool-max", type=int, default=d["extractor_pool_max"], help="maximum feature actors")
    pools.add_argument(
        "--extractor-gpus",
        type=float,
        default=d["extractor_gpus"],
        help="GPUs each feature actor requests (default: 1 when it runs on CUDA, 0 on CPU; "
        "an explicit value is requested on any device)",
    )
    pools.add_argument("--extractor-cpus", type=float, default=d["extractor_cpus"], help="CPUs per feature actor")
    pools.add_argument("--ncut-pool-min", type=int, default=d["ncut_pool_min"], help="minimum segmentation actors")
    pools.add_argument("--ncut-pool-max", type=int, default=d["ncut_pool_max"], help="maximum segmentation actors")
    pools.add_argument("--ncut-cpus", type=float, default=d["ncut_cpus"], help="CPUs per segmentation actor")
    pools.add_argument(
        "--naming-pool-min", type=int, default=d["naming_pool_min"], help="minimum naming actors (--vocabulary)"
    )
    pools.add_argument(
        "--naming-pool-max", type=int, default=d["naming_pool_max"], help="maximum naming actors (--vocabulary)"
    )
    pools.add_argument(
        "--naming-gpus",
        type=float,
        default=d["naming_gpus"],
        help="GPUs each naming actor requests (default: 1 when the model runs on CUDA, 0 on CPU)",
    )
    pools.add_argument("--naming-cpus", type=float, default=d["naming_cpus"], help="CPUs per naming actor")
    pools.add_argument(
        "--shard-rows", type=int, default=d["shard_rows"], help="rows per output Parquet shard (at least)"
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
        f"read units ({units['kind']}): {units['total']} in total, {count(units['done'])} done, {units['to_do']} to do",
        f"samples: {count(samples['total'])} in total, {samples['done']} done, {count(samples['to_do'])} to do"
        + (" (a shard's samples are known once it is read)" if samples["total"] is None else ""),
        f"skipped {report['skipped_non_input_files']} non-input files",
    ]
    if report["limit"] is not None:
        lines.append(f"--limit: at most {report['limit']} records this run")
    if report["overwrite"]:
        lines.append("--overwrite: the job's shards in the output would be deleted first")
    elif report["incomplete_shards"]:
        lines.append(f"{report['incomplete_shards']} half-written shard(s) of an interrupted run would be removed")
    if not report["output_exists"]:
        lines.append("the output does not exist yet: it would be created")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from diffcut.job.pipeline import RunFailed, StoppedBeforeLabeling, label_dataset

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("botocore", "aiobotocore"):  # "Found credentials in environment variables." on every S3 run
        logging.getLogger(name).setLevel(logging.WARNING)
    names = inspect.signature(label_dataset).parameters
    kwargs = {name: getattr(args, name) for name in names}
    try:
        summary = label_dataset(**kwargs)
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
        print("diffcut label: unexpected failure (above); the shards already written stay valid", file=sys.stderr)
        return 3
    if summary.get("dry_run"):
        print(json.dumps(summary, indent=2) if args.json else format_dry_run(summary))
        return 0
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if summary.get("interrupted"):
        return 128 + signal.Signals[summary["interrupted_by"]].value  # as a shell reports death by that signal
    return 1 if summary["error_rate_exceeded"] else 0
