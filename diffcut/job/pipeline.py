"""The labeling job on Ray Data: images in, Parquet label shards out (docs/architecture.md).

Stages (one Ray Data operator each, streaming):

1. **read + decode** (CPU tasks): a read unit is one image file, the pending
   rows of one Parquet row group (:mod:`diffcut.job.inputs`), or one WebDataset tar
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

Before anything is listed or written, the locations are checked
(:mod:`diffcut.job.preflight`); then the run takes the output's lease
(:mod:`diffcut.job.lease`: one run per output) and holds it to the end.
``dry_run=True`` stops after the checks and the plan, and reports it.

Every input record gives exactly one row. Re-runs resume: the sources of the
rows in complete shards are skipped, shards a killed run left half-written are
deleted first, and readers keep one row per source
(:func:`diffcut.job.schema.read_labels`). ``overwrite=True`` deletes the job's
shards and summary and starts over. SIGTERM/SIGINT stop a run cleanly
(:class:`~diffcut.job.ray_session.StopSignals`). What Ray Data retries on lost workers, nodes and
storage errors, and what this module adds to make every input come out
exactly once, is in docs/reliability.md.

The stages are in :mod:`diffcut.job.stages`, the Ray Data dataset that chains them in
:mod:`diffcut.job.dataflow`, the Ray session and the stop signals in :mod:`diffcut.job.ray_session`, resume
(which rows an output already has) and the summary in :mod:`diffcut.job.resume`; this module runs them in
order. Ray is imported only by these three modules of the job (here inside the
functions that run the pipeline, so the checks and ``--dry-run`` never load it) and by
the tools that run on a cluster: discover, training.
"""

from __future__ import annotations

import logging
import re
import signal
import time
import uuid

from diffcut import __version__
from diffcut.job import inputs, preflight, schema
from diffcut.job.lease import Lease
from diffcut.job.resume import (
    RunFailed,
    StoppedBeforeLabeling,
    _write_summary,
    existing_output,
    remove_job_files,
    run_summary,
)
from diffcut.job.storage import OutputError, write_failure

log = logging.getLogger(__name__)

DEFAULT_MODEL = "segmind/SSD-1B"
#: The published open-vocabulary extension's CLIP (diffcut.method.naming.DEFAULT_NAMING_MODEL; not imported: no CLIP
#: code is loaded without --vocabulary).
DEFAULT_NAMING_MODEL = "convnext_large_d_320:laion2b_s29b_b131k_ft_soup"


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
    max_image_pixels: int = inputs.DEFAULT_MAX_IMAGE_PIXELS,
    address: str | None = None,
    overwrite: bool = False,
    create_bucket: bool = False,
    dry_run: bool = False,
    max_error_rate: float = 1.0,
    limit: int | None = None,
    vocabulary: str | None = None,
    naming_model: str = DEFAULT_NAMING_MODEL,
    naming_pool_min: int = 1,
    naming_pool_max: int = 1,
    naming_gpus: float | None = None,
    naming_cpus: float = 1.0,
) -> dict:
    """Label every image under ``input`` (docs/method.md §2) and write Parquet shards to ``output``.

    Parameters
    ----------
    input : str
        Local path or ``s3://`` URI of image files, Parquet, or WebDataset shards.
    output : str
        Local directory or ``s3://`` prefix for the ``labels-*.parquet`` shards
        (:func:`diffcut.job.schema.read_labels`); a rerun labels only what has no row yet.
    format, image_column, model, tau, alpha, resolution, ... : keyword-only
        Every other parameter is the ``diffcut label`` flag of the same name (``--image-column``
        for ``image_column`` ...; see ``diffcut label --help``). Those that change the labels
        (``model``, ``tau``, ...) are stored with every row (the ``params`` column).

    Returns
    -------
    dict
        The run's summary (counts of inputs, rows written, errors, timings,
        the params), also written to ``<output>/_summary.json``.

    Raises
    ------
    diffcut.job.inputs.InputError
        Bad flags, missing inputs, or an output made with other parameters
        (without ``overwrite``).

    References
    ----------
    .. [1] P. Couairon et al., NeurIPS 2024, arXiv:2406.02842 (the method, per image).
    .. [2] docs/output-format.md (the shards' columns).

    Examples
    --------
    Two small images labeled with the tiny random model on the CPU (Ray starts
    embedded, on 127.0.0.1, and stops at the end):

    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from diffcut.job.pipeline import label_dataset
    >>> from diffcut.job.schema import read_labels
    >>> folder = Path(tempfile.mkdtemp())
    >>> (folder / "images").mkdir()
    >>> for name, colour in (("red.png", (200, 30, 30)), ("blue.png", (20, 40, 220))):
    ...     Image.new("RGB", (96, 64), colour).save(folder / "images" / name)
    >>> summary = label_dataset(str(folder / "images"), str(folder / "labels"), model="tiny-random",
    ...                         device="cpu", resolution=64, decode_cpus=0.5, extractor_cpus=0.5,
    ...                         ncut_cpus=0.5, ncut_pool_max=1)
    >>> summary["processed"], summary["ok"], summary["error"]
    (2, 2, 0)
    >>> table = read_labels(str(folder / "labels"), columns=["status", "width", "height", "mask_width"])
    >>> table.to_pylist()[0]
    {'status': 'ok', 'width': 96, 'height': 64, 'mask_width': 96}
    """
    started = time.time()
    stride = inputs.DEFAULT_STRIDE
    inputs.check_resolution(resolution, stride)
    if resize not in inputs.RESIZE_MODES:
        raise inputs.InputError(f"unknown --resize {resize!r}; use one of {', '.join(inputs.RESIZE_MODES)}")
    mask_spec = inputs.MaskSize.parse(mask_size)
    for name, low, high in (
        ("extractor-pool", extractor_pool_min, extractor_pool_max),
        ("ncut-pool", ncut_pool_min, ncut_pool_max),
        ("naming-pool", naming_pool_min, naming_pool_max),
    ):
        if low < 1 or high < low:
            raise inputs.InputError(f"--{name}-min/-max must satisfy 1 <= min <= max; got {low}, {high}")
    if not tau > 0 or not alpha > 0:
        raise inputs.InputError(f"--tau and --alpha must be positive; got {tau}, {alpha}")
    if batch_size != "auto":
        try:
            batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise inputs.InputError(f"--batch-size must be a positive integer or auto; got {batch_size!r}") from None
    if (batch_size != "auto" and batch_size < 1) or decode_batch_size < 1 or shard_rows < 1:
        raise inputs.InputError("--batch-size, --decode-batch-size and --shard-rows must be at least 1")
    from diffcut.method.features import ATTENTION_KERNELS, VAE_DTYPES

    if attention not in ATTENTION_KERNELS or vae_dtype not in VAE_DTYPES:
        raise inputs.InputError(
            f"--attention must be one of {', '.join(ATTENTION_KERNELS)} and --vae-dtype one of "
            f"{', '.join(VAE_DTYPES)}; got {attention!r}, {vae_dtype!r}"
        )
    speed = dict(
        compile=bool(compile),
        channels_last=bool(channels_last),
        attention=attention,
        tf32=bool(tf32),
        vae_dtype=vae_dtype,
    )
    input = inputs.check_uri(input)
    output = inputs.check_uri(output)
    if vocabulary is not None:
        from diffcut.method.naming import load_vocabulary

        try:
            load_vocabulary(vocabulary)
        except (ValueError, OSError) as error:
            raise inputs.InputError(str(error)) from None

    params = {
        "model": model,
        "tau": float(tau),
        "alpha": float(alpha),
        "timestep": int(timestep),
        "noise_seed": 42,
        "resolution": int(resolution),
        "resize": resize,
        "mask_size": str(mask_spec),
        "refine": bool(refine),
        "exact_search": bool(exact_search),
        "dtype": str(dtype),
        "vae_dtype": str(vae_dtype),
        "stride": stride,
        "diffcut_version": __version__,
        "schema_version": schema.SCHEMA_VERSION,
    }
    if vocabulary is not None:  # without naming, params (and so resuming) stay as they were
        params.update(vocabulary=vocabulary, naming_model=naming_model)
    min_cpus = decode_cpus + extractor_pool_min * extractor_cpus + ncut_pool_min * ncut_cpus
    if vocabulary is not None:
        min_cpus += naming_pool_min * naming_cpus

    # Checked before anything is listed, read or written: one clear line (exit 2) instead of a failure mid-run.
    preflight.check_credentials(input, output)
    exclude = preflight.listing_exclude(input, output)
    exists = preflight.check_output(output, create_bucket=create_bucket)
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    lease = Lease(output, run_id, on_lost=_stop_main_thread)
    if exists:
        lease.check()  # a live run writing there: refuse now, before listing the input
    listing = inputs.list_inputs(input, format, exclude=exclude)
    if dry_run:
        return preflight.dry_run(
            input,
            output,
            listing,
            params,
            image_column=image_column,
            id_column=id_column,
            limit=limit,
            overwrite=overwrite,
            exists=exists,
        )
    preflight.prepare_output(output, create_bucket=create_bucket)
    with lease:  # what follows deletes and writes shards: only one run at a time
        return _label(
            input,
            output,
            listing,
            params,
            lease=lease,
            run_id=run_id,
            started=started,
            overwrite=overwrite,
            limit=limit,
            image_column=image_column,
            id_column=id_column,
            max_error_rate=max_error_rate,
            min_cpus=min_cpus,
            address=address,
            model=model,
            stages=dict(
                image_column=image_column,
                model=model,
                device=device,
                dtype=dtype,
                timestep=timestep,
                tau=tau,
                alpha=alpha,
                resolution=resolution,
                resize=resize,
                stride=stride,
                mask_size=str(mask_spec),
                refine=refine,
                exact_search=exact_search,
                batch_size=batch_size,
                speed=speed,
                decode_batch_size=decode_batch_size,
                decode_cpus=decode_cpus,
                extractor_pool=(extractor_pool_min, extractor_pool_max),
                extractor_gpus=extractor_gpus,
                extractor_cpus=extractor_cpus,
                ncut_pool=(ncut_pool_min, ncut_pool_max),
                ncut_cpus=ncut_cpus,
                shard_rows=shard_rows,
                max_image_pixels=max_image_pixels,
                params_text=schema.params_json(params),
                keep_metadata=keep_metadata,
                limit=limit,
                vocabulary=vocabulary,
                naming_model=naming_model,
                naming_pool=(naming_pool_min, naming_pool_max),
                naming_gpus=naming_gpus,
                naming_cpus=naming_cpus,
            ),
        )


def _label(
    input: str,
    output: str,
    listing: inputs.InputListing,
    params: dict,
    *,
    lease: Lease,
    run_id: str,
    started: float,
    overwrite: bool,
    limit: int | None,
    image_column: str,
    id_column: str | None,
    max_error_rate: float,
    min_cpus: float,
    address: str | None,
    model: str,
    stages: dict,
) -> dict:
    """Resume or overwrite, plan, run the pipeline, write the summary; under the output's lease."""
    import ray

    from diffcut.job.dataflow import run_stages
    from diffcut.job.ray_session import JobInterrupted, StopSignals, connect_ray

    removed = incomplete = 0
    pipeline_seconds = 0.0
    failure = None
    stop = StopSignals()
    stop.install()  # a signal while planning unwinds (the lease is released) instead of killing the process
    try:
        if overwrite:
            removed = remove_job_files(output)
            done: set[str] = set()
        else:
            done, incomplete = existing_output(output, params)
        plan = inputs.plan_inputs(listing, image_column=image_column, id_column=id_column, done=done, limit=limit)
        if plan.planned is None:
            log.info("%d tar shards, %d samples already done", len(listing.files), plan.already_done)
        else:
            log.info("%d input records, %d already done, %d to label", plan.listed, plan.already_done, plan.planned)
        if plan.planned is None or plan.planned:
            started_ray = connect_ray(address, min_cpus)
            stop.install()  # after ray.init: it installs a SIGTERM handler of its own (sys.exit)
            pipeline_started = time.time()
            try:
                run_stages(plan, output, run_id=run_id, **stages)
            except JobInterrupted:
                if lease.lost is None:
                    log.warning(
                        "%s received: the run stops; shards already written stay valid, the same command resumes",
                        stop.received,
                    )
            except ray.exceptions.ActorDiedError as error:
                # A model that cannot be loaded fails every feature actor the same way: one clear
                # job-level error (exit status 2), not a Ray traceback or an error row per image.
                reason = _model_load_failure(error)
                if reason is None:
                    raise
                raise inputs.InputError(f"the feature actors could not load --model {model!r}: {reason}") from None
            except Exception as error:
                failure = write_failure(error, output)
                if failure is None:
                    raise
            finally:
                stop.armed = False  # a second signal no longer interrupts the cleanup
                pipeline_seconds = time.time() - pipeline_started
                if started_ray:
                    ray.shutdown()
    except JobInterrupted:  # before the pipeline started
        if lease.lost is not None:
            raise OutputError(lease.lost) from None
        raise StoppedBeforeLabeling(stop.received) from None
    finally:
        stop.restore()
    if lease.lost is not None:  # another run owns the output now: its summary is not this run's to write
        raise OutputError(lease.lost)

    summary = run_summary(
        output,
        run_id,
        listing=listing,
        plan=plan,
        params=params,
        limit=limit,
        interrupted_by=stop.received,
        failure=failure,
        pipeline_seconds=pipeline_seconds,
        started=started,
        removed=removed,
        incomplete=incomplete,
        max_error_rate=max_error_rate,
    )
    try:
        _write_summary(output, summary)
    except OSError as error:
        if failure is None:
            raise
        log.warning("the summary could not be written to the output either (%s)", inputs.describe_exception(error))
    if failure is not None:
        raise RunFailed(failure, summary)
    return summary


def _stop_main_thread(message: str) -> None:
    """The lease was lost (heartbeat thread): stop the pipeline as a SIGTERM would (nothing before it starts)."""
    import _thread

    _thread.interrupt_main(signal.SIGTERM)


def _model_load_failure(error: Exception) -> str | None:
    """The exception line of a FeatureStage constructor failure (a Ray ``ActorDiedError``: the model did not load),
    else None."""
    message = str(getattr(error, "error_msg", "") or "")
    if not getattr(error, "actor_init_failed", False) or "FeatureStage" not in message:
        return None
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", message).splitlines() if line.strip()]
    return inputs.redact(lines[-1]) if lines else "unknown error"
