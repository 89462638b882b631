"""The labeling job on Ray Data: images in, Parquet label shards out (DESIGN.md §1).

Stages (one Ray Data operator each, streaming):

1. **read + decode** (CPU tasks): a read unit is one image file, the pending
   rows of one Parquet row group (:mod:`diffcut.job.io`), or one WebDataset tar
   shard, streamed (:mod:`diffcut.job.webdataset`); bytes are decoded,
   EXIF-rotated, converted to RGB and resized to the model's input size
   (``bucket`` or ``square``). A record that cannot be read or decoded
   becomes an error row here and passes every later stage untouched.
2. **features** (actor pool, one GPU per actor on GPU nodes, CPU actors with
   ``device="cpu"``): each actor loads :class:`~diffcut.method.features.FeatureExtractor`
   once; a batch is split by input size (bucket) and run in chunks of
   ``batch_size``. Features leave the stage as float16.
3. **segment** (CPU actor pool): recursive normalized cut with its split tree,
   concept assignment at the mask size, optional PAMR, descriptors, and the
   output row (:func:`diffcut.method.segmenter.segment_features`, :mod:`diffcut.job.schema`).
4. **write**: ``write_parquet`` shards named ``labels-<run id>-...`` directly
   under the output.

Every input record gives exactly one row. Re-runs resume: the sources of the
rows in complete shards are skipped, shards a killed run left half-written are
deleted first, and readers keep one row per source
(:func:`diffcut.job.schema.read_labels`). ``overwrite=True`` deletes the job's
shards and summary and starts over. SIGTERM/SIGINT stop a run cleanly
(:class:`StopSignals`). What Ray Data retries on lost workers, nodes and
storage errors, and what this module adds to make every input come out
exactly once, is in docs/reliability.md.

The stages themselves are in :mod:`diffcut.job.stages`, the Ray session and the
stop signals in :mod:`diffcut.job.ray_session`, resume (which rows an output
already has) in :mod:`diffcut.job.resume`; this module wires them into one Ray
Data dataset and writes the run's summary. Ray is
imported only by these three modules of the job (and by the tools that run on a
cluster: discover, training).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections import defaultdict

import ray

from diffcut import __version__
from diffcut.job import io as dio
from diffcut.job import schema
from diffcut.job import webdataset
from diffcut.job.resume import _count, _run_rows, _write_summary, existing_output, remove_job_files
from diffcut.job.ray_session import JobInterrupted, StopSignals, _actor_device, connect_ray
from diffcut.job.stages import (AUTO_FEATURE_BATCH_ROWS, FeatureStage, NamingStage, SegmentStage,  # noqa: F401
                                ShardNames, decode_stage)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "segmind/SSD-1B"
#: The published open-vocabulary extension's CLIP (diffcut.method.naming.DEFAULT_NAMING_MODEL; not imported: no CLIP
#: code is loaded without --vocabulary).
DEFAULT_NAMING_MODEL = "convnext_large_d_320:laion2b_s29b_b131k_ft_soup"

#: Memory reserved per read/decode task (bytes).
DECODE_TASK_MEMORY = 512 * 2**20

#: Messages of the transient storage errors a write retries (Ray Data's ``retried_io_errors``,
#: added to its defaults, which only match Arrow's own S3 client: "AWS Error SLOW_DOWN"...). The
#: output is written through s3fs (``diffcut.job.io.arrow_filesystem``), whose errors read like
#: botocore's and aiohttp's once its retries and botocore's are spent. Each write is then retried
#: whole, up to 10 times with backoff to 32 s: a shard is one object, so a retry replaces it.
RETRIED_IO_ERRORS = (
    "SlowDown", "reduce your request rate", "ServiceUnavailable", "InternalError", "RequestTimeout",
    "Connection reset", "Connection was closed", "Server disconnected", "Could not connect to the endpoint",
    "Read timeout on endpoint",
)


# =========================================================================== the job
def label_dataset(
    input: str,
    output: str,
    *,
    format: str = "auto",
    image_column: str = "image",
    id_column: str | None = None,
    keep_metadata: bool = False,
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    tau: float = 0.5,
    alpha: float = 10.0,
    timestep: int = 50,
    resolution: int = 1024,
    resize: str = "bucket",
    mask_size: str = "original",
    refine: bool = False,
    exact_search: bool = False,
    batch_size: int | str = 4,
    compile: bool = False,
    channels_last: bool = False,
    attention: str = "sdpa",
    tf32: bool = False,
    vae_dtype: str = "auto",
    decode_batch_size: int = 256,
    decode_cpus: float = 1.0,
    extractor_pool_min: int = 1,
    extractor_pool_max: int = 1,
    extractor_gpus: float | None = None,
    extractor_cpus: float = 1.0,
    ncut_pool_min: int = 1,
    ncut_pool_max: int = 2,
    ncut_cpus: float = 1.0,
    shard_rows: int = 256,
    max_image_pixels: int = dio.DEFAULT_MAX_IMAGE_PIXELS,
    address: str | None = None,
    overwrite: bool = False,
    max_error_rate: float = 1.0,
    limit: int | None = None,
    vocabulary: str | None = None,
    naming_model: str = DEFAULT_NAMING_MODEL,
    naming_pool_min: int = 1,
    naming_pool_max: int = 1,
    naming_gpus: float | None = None,
    naming_cpus: float = 1.0,
) -> dict:
    """Label every image under ``input`` and write Parquet shards to ``output``.

    The parameters map one to one to ``diffcut label`` / ``jobs/label.py``
    flags (``--image-column`` for ``image_column`` ...); see
    ``diffcut label --help`` for each. Returns the summary that is also
    written to ``<output>/_summary.json``.

    Raises:
        diffcut.job.io.InputError: bad flags, missing inputs, or an output made
            with other parameters (without ``overwrite``).
    """
    started = time.time()
    stride = dio.DEFAULT_STRIDE
    dio.check_resolution(resolution, stride)
    if resize not in dio.RESIZE_MODES:
        raise dio.InputError(f"unknown --resize {resize!r}; use one of {', '.join(dio.RESIZE_MODES)}")
    mask_spec = dio.MaskSize.parse(mask_size)
    for name, low, high in (("extractor-pool", extractor_pool_min, extractor_pool_max),
                            ("ncut-pool", ncut_pool_min, ncut_pool_max),
                            ("naming-pool", naming_pool_min, naming_pool_max)):
        if low < 1 or high < low:
            raise dio.InputError(f"--{name}-min/-max must satisfy 1 <= min <= max; got {low}, {high}")
    if not tau > 0 or not alpha > 0:
        raise dio.InputError(f"--tau and --alpha must be positive; got {tau}, {alpha}")
    if batch_size != "auto":
        try:
            batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise dio.InputError(f"--batch-size must be a positive integer or auto; got {batch_size!r}") from None
    if (batch_size != "auto" and batch_size < 1) or decode_batch_size < 1 or shard_rows < 1:
        raise dio.InputError("--batch-size, --decode-batch-size and --shard-rows must be at least 1")
    from diffcut.method.features import ATTENTION_KERNELS, VAE_DTYPES

    if attention not in ATTENTION_KERNELS or vae_dtype not in VAE_DTYPES:
        raise dio.InputError(f"--attention must be one of {', '.join(ATTENTION_KERNELS)} and --vae-dtype one of "
                             f"{', '.join(VAE_DTYPES)}; got {attention!r}, {vae_dtype!r}")
    speed = dict(compile=bool(compile), channels_last=bool(channels_last), attention=attention, tf32=bool(tf32),
                 vae_dtype=vae_dtype)
    input = dio.check_uri(input)
    output = dio.check_uri(output)
    if vocabulary is not None:
        from diffcut.method.naming import load_vocabulary

        try:
            load_vocabulary(vocabulary)
        except (ValueError, OSError) as error:
            raise dio.InputError(str(error)) from None

    params = {
        "model": model, "tau": float(tau), "alpha": float(alpha), "timestep": int(timestep), "noise_seed": 42,
        "resolution": int(resolution), "resize": resize, "mask_size": str(mask_spec), "refine": bool(refine),
        "exact_search": bool(exact_search), "dtype": str(dtype), "vae_dtype": str(vae_dtype), "stride": stride, "diffcut_version": __version__,
        "schema_version": schema.SCHEMA_VERSION,
    }
    if vocabulary is not None:  # without naming, params (and so resuming) stay as they were
        params.update(vocabulary=vocabulary, naming_model=naming_model)
    params_text = schema.params_json(params)

    # Output first: what is done decides what to plan.
    removed = 0
    if overwrite:
        removed = remove_job_files(output)
        done: set[str] = set()
        incomplete = 0
    else:
        done, incomplete = existing_output(output, params)

    listing = dio.list_inputs(input, format, exclude=output)
    plan = dio.plan_inputs(listing, image_column=image_column, id_column=id_column, done=done, limit=limit)
    if plan.planned is None:
        log.info("%d tar shards, %d samples already done", len(listing.files), plan.already_done)
    else:
        log.info("%d input records, %d already done, %d to label", plan.listed, plan.already_done, plan.planned)

    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    pipeline_seconds = 0.0
    started_ray = False
    # Signals before this point end the process at once (their default): nothing has been
    # written yet, and removing incomplete shards is redone by the next run.
    stop = StopSignals()
    if plan.planned is None or plan.planned:
        min_cpus = decode_cpus + extractor_pool_min * extractor_cpus + ncut_pool_min * ncut_cpus
        if vocabulary is not None:
            min_cpus += naming_pool_min * naming_cpus
        started_ray = connect_ray(address, min_cpus)
        stop.install()  # after ray.init: it installs a SIGTERM handler of its own (sys.exit)
        pipeline_started = time.time()
        try:
            _run_pipeline(
                plan, output, run_id=run_id, image_column=image_column, model=model, device=device, dtype=dtype,
                timestep=timestep, tau=tau, alpha=alpha, resolution=resolution, resize=resize, stride=stride,
                mask_size=str(mask_spec), refine=refine, exact_search=exact_search, batch_size=batch_size,
                speed=speed, decode_batch_size=decode_batch_size, decode_cpus=decode_cpus,
                extractor_pool=(extractor_pool_min, extractor_pool_max), extractor_gpus=extractor_gpus,
                extractor_cpus=extractor_cpus, ncut_pool=(ncut_pool_min, ncut_pool_max), ncut_cpus=ncut_cpus,
                shard_rows=shard_rows, max_image_pixels=max_image_pixels, params_text=params_text,
                keep_metadata=keep_metadata, limit=limit, vocabulary=vocabulary, naming_model=naming_model,
                naming_pool=(naming_pool_min, naming_pool_max), naming_gpus=naming_gpus, naming_cpus=naming_cpus,
            )
        except JobInterrupted:
            log.warning("%s received: the run stops; shards already written stay valid, the same command "
                        "resumes", stop.received)
        except ray.exceptions.ActorDiedError as error:
            # A model that cannot be loaded fails every feature actor the same way: one clear
            # job-level error (exit status 2), not a Ray traceback or an error row per image.
            reason = _model_load_failure(error)
            if reason is None:
                raise
            raise dio.InputError(f"the feature actors could not load --model {model!r}: {reason}") from None
        finally:
            stop.armed = False  # a second signal no longer interrupts the cleanup
            pipeline_seconds = time.time() - pipeline_started
            if started_ray:
                ray.shutdown()
            stop.restore()

    run_table = _run_rows(output, run_id)
    run_ok, run_error = _count(run_table)
    by_key = listing.format == "webdataset"  # a sample key used in two shards is only known once both are read
    totals = schema.read_labels(output, columns=["source", "status"] + (["image_id"] if by_key else []))
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
        "inputs_listed": plan.listed if plan.listed is not None else (
            plan.already_done + run_ok + run_error if limit is None and stop.received is None else None),
        "skipped_non_input_files": plan.skipped_files,
        # The first dio.SKIPPED_NAMED of them, {"path", "reason"}: a file never labeled is named, not only counted.
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
        "interrupted": stop.received is not None,
        "interrupted_by": stop.received,
        "common_errors": [{"error": message, "count": count} for message, count in common_errors],
        "params": params,
    }
    warnings = []
    if by_key:
        summary["duplicate_keys"] = webdataset.duplicate_keys(totals.column("image_id").to_pylist(),
                                                              totals.column("source").to_pylist())
        if summary["duplicate_keys"]["count"]:
            warnings.append(f"{summary['duplicate_keys']['count']} sample key(s) occur in more than one shard: "
                            "their rows share an image_id (see duplicate_keys)")
    if stop.received:
        planned = "" if plan.planned is None else f" of {plan.planned} planned"
        warnings.insert(0, f"interrupted by {stop.received} after {run_ok + run_error}{planned} "
                           "records; run the same command again to resume")
    elif plan.planned is not None and run_ok + run_error != plan.planned:
        warnings.insert(0, f"planned {plan.planned} records but this run wrote {run_ok + run_error} rows")
    if warnings:
        summary["warning"] = "; ".join(warnings)
    summary = json.loads(dio.redact(json.dumps(summary)))
    _write_summary(output, summary)
    return summary


def _model_load_failure(error: "ray.exceptions.ActorDiedError") -> str | None:
    """The exception line of a FeatureStage constructor failure (the model did not load), else None."""
    message = str(getattr(error, "error_msg", "") or "")
    if not getattr(error, "actor_init_failed", False) or "FeatureStage" not in message:
        return None
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", message).splitlines() if line.strip()]
    return dio.redact(lines[-1]) if lines else "unknown error"


def _run_pipeline(plan: dio.Plan, output: str, *, run_id: str, image_column: str, model: str, device: str,
                  dtype: str, timestep: int, tau: float, alpha: float, resolution: int, resize: str, stride: int,
                  mask_size: str, refine: bool, exact_search: bool, batch_size: int | str, speed: dict,
                  decode_batch_size: int,
                  decode_cpus: float, extractor_pool: tuple[int, int], extractor_gpus: float | None, extractor_cpus: float,
                  ncut_pool: tuple[int, int], ncut_cpus: float, shard_rows: int, max_image_pixels: int,
                  params_text: str, keep_metadata: bool = False, limit: int | None = None,
                  vocabulary: str | None = None, naming_model: str = DEFAULT_NAMING_MODEL,
                  naming_pool: tuple[int, int] = (1, 1), naming_gpus: float | None = None,
                  naming_cpus: float = 1.0) -> None:
    """Build the Ray Data pipeline for ``plan`` and run it to the end of the write."""
    from ray.data import ActorPoolStrategy

    context = ray.data.DataContext.get_current()  # travels with the job to every task
    context.retried_io_errors = list(dict.fromkeys([*context.retried_io_errors, *RETRIED_IO_ERRORS]))

    units = plan.units
    kind = units.column("kind")[0].as_py() if units.num_rows else "file"
    # A Parquet unit is a whole row group, a WebDataset unit a whole shard (one task
    # streams it, holding decode_batch_size encoded images at a time); an image-file unit is one file.
    units_per_batch = decode_batch_size if kind == "file" else 1
    # Bucketed inputs vary in size: hand each feature actor a few model calls'
    # worth of rows at a time, so rows of one size can share a call; decoded
    # blocks of the same length arrive grouped by size (decode_stage).
    if batch_size == "auto":
        feature_batch = AUTO_FEATURE_BATCH_ROWS
    else:
        feature_batch = batch_size * (4 if resize == "bucket" else 1)
    units_per_block = max(units_per_batch, math.ceil(units.num_rows / 10_000))
    blocks = [units.slice(start, units_per_block) for start in range(0, units.num_rows, units_per_block)]
    dataset = ray.data.from_arrow(blocks)

    dataset = dataset.map_batches(
        decode_stage,
        batch_size=units_per_batch,
        batch_format="pyarrow",
        num_cpus=decode_cpus,
        # A memory reservation per decode task: decoding one large image takes
        # a few hundred MB (a 48-megapixel PNG decodes to 144 MB before
        # conversion), so a node never runs more decodes than it can hold.
        # Remote args that differ from the next stage's also keep Ray Data from
        # fusing the decoding into the feature actors (it fuses a task stage
        # into the following actor stage when their arguments match, as on
        # CPU-only runs): decoding stays in parallel CPU tasks and the model
        # actors only run the model.
        memory=DECODE_TASK_MEMORY,
        fn_kwargs=dict(image_column=image_column, resolution=resolution, resize=resize, stride=stride,
                       mask_size=mask_size, max_image_pixels=max_image_pixels,
                       keep_image_bytes=refine or vocabulary is not None,
                       chunk_rows=feature_batch, keep_metadata=keep_metadata,
                       sort_records=decode_batch_size if kind == webdataset.UNIT_KIND else None),
    )
    if limit is not None and kind == webdataset.UNIT_KIND:
        # The plan could not cut at the limit (a shard's samples are known once read): stop the stream there.
        dataset = dataset.limit(max(0, int(limit)))
    actor_device, on_gpu = _actor_device(device)
    dataset = dataset.map_batches(
        FeatureStage,
        fn_constructor_kwargs=dict(model=model, device=actor_device, dtype=dtype, timestep=timestep,
                                   batch_size=batch_size, speed=speed),
        compute=ActorPoolStrategy(min_size=extractor_pool[0], max_size=extractor_pool[1]),
        batch_size=feature_batch,
        batch_format="pyarrow",
        num_cpus=extractor_cpus,
        # None: one GPU per actor when the model runs on CUDA, none on CPU. An
        # explicit value is requested whatever the device, so actors can be
        # placed on GPU nodes (e.g. a fake-GPU autoscaling test running on CPU).
        num_gpus=extractor_gpus if extractor_gpus is not None else (1.0 if on_gpu else 0),
    )
    dataset = dataset.map_batches(
        SegmentStage,
        fn_constructor_kwargs=dict(tau=tau, alpha=alpha, refine=refine, exact_search=exact_search,
                                   params=params_text, max_image_pixels=max_image_pixels,
                                   keep_metadata=keep_metadata, carry_image=vocabulary is not None),
        compute=ActorPoolStrategy(min_size=ncut_pool[0], max_size=ncut_pool[1]),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=ncut_cpus,
    )
    if vocabulary is not None:
        # Its own pool: on the GPU nodes when the model runs on CUDA (naming_gpus None), as the feature pool.
        dataset = dataset.map_batches(
            NamingStage,
            fn_constructor_kwargs=dict(naming_model=naming_model, vocabulary=vocabulary, device=actor_device,
                                       params=params_text, max_image_pixels=max_image_pixels,
                                       keep_metadata=keep_metadata),
            compute=ActorPoolStrategy(min_size=naming_pool[0], max_size=naming_pool[1]),
            batch_size=1,  # rows are named one by one; batch_size may be "auto" (the feature actors')
            batch_format="pyarrow",
            num_cpus=naming_cpus,
            num_gpus=naming_gpus if naming_gpus is not None else (1.0 if on_gpu else 0),
        )
    filesystem, path = dio.arrow_filesystem(output)
    dataset.write_parquet(
        path,
        filesystem=filesystem,
        filename_provider=ShardNames(run_id),
        min_rows_per_file=shard_rows,
        ray_remote_args={"num_cpus": decode_cpus},
        schema=schema.labels_schema(keep_metadata, named=vocabulary is not None),
    )
