"""The labeling job on Ray Data: images in, one Parquet label file per input unit out (docs/architecture.md).

Stages (one Ray Data operator each, streaming):

1. **read + decode** (CPU tasks): a read unit is one image file, the
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
4. **write** (:mod:`diffcut.job.writer`): rows staged per input unit; once a unit
   (a WebDataset shard, a Parquet file, a chunk of ``unit_files`` image files) is
   whole, its ``labels/<unit>.parquet`` is written, then its record
   ``_units/<unit>.json`` (:mod:`diffcut.job.units`).

A run's settings are the frozen dataclasses of :mod:`diffcut.job.settings`: what changes the labels
(:class:`~diffcut.job.settings.LabelSettings`, recorded with every row), the speed options and each stage's pool.

Before anything is listed or written, the locations are checked
(:mod:`diffcut.job.preflight`); then the run takes the output's lease
(:mod:`diffcut.job.lease`: one run per output) and holds it to the end.
``dry_run=True`` stops after the checks and the plan, and reports it.

Every input record gives exactly one row. Re-runs resume from the unit records
alone (O(units), docs/scale.md): recorded units are skipped, what a killed run left
unrecorded is deleted and redone whole, and readers read recorded units only
(:func:`diffcut.job.schema.read_labels`). ``overwrite=True`` deletes the job's
labels, records and summary and starts over. SIGTERM/SIGINT stop a run cleanly
(:class:`~diffcut.job.ray_session.StopSignals`). What Ray Data retries on lost workers, nodes and
storage errors, and what this module adds to make every input come out
exactly once, is in docs/reliability.md.

The stages are in :mod:`diffcut.job.stages`, the Ray Data dataset that chains them in
:mod:`diffcut.job.dataflow`, the Ray session and the stop signals in :mod:`diffcut.job.ray_session`, resume
(which units an output already has) and the summary in :mod:`diffcut.job.resume`; this module runs them in
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

from diffcut.job import inputs, preflight, units
from diffcut.job.lease import Lease
from diffcut.job.resume import RunFailed, StoppedBeforeLabeling, _write_summary, output_state, run_summary
from diffcut.job.settings import LabelSettings, Pools, SpeedSettings
from diffcut.job.storage import OutputError, write_failure

log = logging.getLogger(__name__)


# =========================================================================== the job
def label_dataset(
    input: str,
    output: str,
    *,
    label: LabelSettings | None = None,
    speed: SpeedSettings | None = None,
    pools: Pools | None = None,
    device: str = "auto",
    format: str = "auto",
    image_column: str = "image",
    id_column: str | None = None,
    keep_metadata: bool = False,
    unit_files: int = 1000,
    write_rows: int = 256,
    max_image_pixels: int = inputs.DEFAULT_MAX_IMAGE_PIXELS,
    max_error_rate: float = 1.0,
    limit: int | None = None,
    address: str | None = None,
    overwrite: bool = False,
    create_bucket: bool = False,
    dry_run: bool = False,
) -> dict:
    """Label every image under ``input`` (docs/method.md §2); one Parquet label file per input unit in ``output``.

    Parameters
    ----------
    input : str
        Local path or ``s3://`` URI of image files, Parquet, or WebDataset shards.
    output : str
        Local directory or ``s3://`` prefix for the labels (``labels/<unit>.parquet``, docs/output-format.md)
        (:func:`diffcut.job.schema.read_labels`); a rerun labels only the units not recorded yet.
    label : LabelSettings, optional
        What changes the labels (model, tau, resolution, ...; :class:`diffcut.job.settings.LabelSettings`),
        stored with every row (the ``params`` column). Default: the paper's settings.
    speed : SpeedSettings, optional
        The feature actors' batch size and speed options (:class:`diffcut.job.settings.SpeedSettings`).
    pools : Pools, optional
        Each stage's Ray resources (:class:`diffcut.job.settings.Pools`).
    device, format, image_column, ... : keyword-only
        Every other parameter is the ``diffcut label`` flag of the same name (``--image-column``
        for ``image_column`` ...; see ``diffcut label --help``).

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
    .. [2] docs/output-format.md (the layout and the columns).

    Examples
    --------
    Two small images labeled with the tiny random model on the CPU (Ray starts
    embedded, on 127.0.0.1, and stops at the end):

    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from diffcut.job.pipeline import label_dataset
    >>> from diffcut.job.schema import read_labels
    >>> from diffcut.job.settings import DecodeSettings, LabelSettings, Pools, PoolSettings
    >>> folder = Path(tempfile.mkdtemp())
    >>> (folder / "images").mkdir()
    >>> for name, colour in (("red.png", (200, 30, 30)), ("blue.png", (20, 40, 220))):
    ...     Image.new("RGB", (96, 64), colour).save(folder / "images" / name)
    >>> small = Pools(decode=DecodeSettings(cpus=0.5), extractor=PoolSettings(cpus=0.5),
    ...               ncut=PoolSettings(max=1, cpus=0.5))
    >>> summary = label_dataset(str(folder / "images"), str(folder / "labels"), device="cpu",
    ...                         label=LabelSettings(model="tiny-random", resolution=64), pools=small)
    >>> summary["processed"], summary["ok"], summary["error"]
    (2, 2, 0)
    >>> table = read_labels(str(folder / "labels"), columns=["status", "width", "height", "mask_width"])
    >>> table.to_pylist()[0]
    {'status': 'ok', 'width': 96, 'height': 64, 'mask_width': 96}
    """
    started = time.time()
    label, speed, pools = label or LabelSettings(), speed or SpeedSettings(), pools or Pools()
    for flag, value in (("--unit-files", unit_files), ("--write-rows", write_rows)):
        if value < 1:
            raise inputs.InputError(f"{flag} must be at least 1; got {value}")
    input, output = inputs.check_uri(input), inputs.check_uri(output)
    params = label.params()

    # Check: before anything is listed, read or written, one clear line (exit 2) instead of a failure mid-run.
    preflight.check_credentials(input, output)
    exclude = preflight.listing_exclude(input, output)
    exists = preflight.check_output(output, create_bucket=create_bucket)
    run_id = new_run_id()
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
            unit_files=unit_files,
            overwrite=overwrite,
            exists=exists,
        )
    preflight.prepare_output(output, create_bucket=create_bucket)
    # Plan, run and summarize: under the lease, as what follows deletes and writes units.
    with lease:
        return _label(
            output,
            listing,
            params,
            lease=lease,
            run_id=run_id,
            started=started,
            overwrite=overwrite,
            id_column=id_column,
            unit_files=unit_files,
            max_error_rate=max_error_rate,
            min_cpus=pools.min_cpus(naming=label.vocabulary is not None),
            address=address,
            stages=dict(
                label=label,
                speed=speed,
                pools=pools,
                device=device,
                image_column=image_column,
                keep_metadata=keep_metadata,
                write_rows=write_rows,
                max_image_pixels=max_image_pixels,
                limit=limit,
            ),
        )


def new_run_id() -> str:
    """A run's id: its UTC start time and 8 random hex digits (in the names of its chunks of image files)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def _label(
    output: str,
    listing: inputs.InputListing,
    params: dict,
    *,
    lease: Lease,
    run_id: str,
    started: float,
    overwrite: bool,
    id_column: str | None,
    unit_files: int,
    max_error_rate: float,
    min_cpus: float,
    address: str | None,
    stages: dict,
) -> dict:
    """Resume or overwrite, plan, run the stages (:func:`diffcut.job.dataflow.run_stages` with ``stages``),
    write the summary; under the output's lease."""
    import ray

    from diffcut.job.dataflow import run_stages
    from diffcut.job.ray_session import JobInterrupted, StopSignals, connect_ray
    from diffcut.job.writer import UnitProgress

    limit = stages["limit"]
    removed = redone = 0
    done = inputs.Done()
    progress = UnitProgress({})
    pipeline_seconds = 0.0
    failure = None
    stop = StopSignals()
    stop.install()  # a signal while planning unwinds (the lease is released) instead of killing the process
    try:
        if overwrite:
            removed = units.remove_layout(output)
        else:
            done, redone = output_state(output, params)
        plan = inputs.plan_inputs(
            listing,
            image_column=stages["image_column"],
            id_column=id_column,
            done=done,
            limit=limit,
            unit_files=unit_files,
            run_id=run_id,
        )
        log.info(
            "%s units in the input, %d done, %d to do (%s records to label)",
            "?" if plan.units_listed is None else plan.units_listed,
            plan.units_done,
            len(plan.expected),
            "?" if plan.planned is None else plan.planned,
        )
        progress = UnitProgress(plan.expected, plan.partial)
        if plan.expected:
            started_ray = connect_ray(address, min_cpus)
            stop.install()  # after ray.init: it installs a SIGTERM handler of its own (sys.exit)
            pipeline_started = time.time()
            try:
                run_stages(plan, output, run_id=run_id, progress=progress, **stages)
            except JobInterrupted:
                if lease.lost is None:
                    log.warning(
                        "%s received: the run stops; units already recorded stay done, the same command resumes",
                        stop.received,
                    )
            except ray.exceptions.ActorDiedError as error:
                # A model that cannot be loaded fails every feature actor the same way: one clear
                # job-level error (exit status 2), not a Ray traceback or an error row per image.
                reason = _model_load_failure(error)
                if reason is None:
                    raise
                model = stages["label"].model
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
        done=done,
        counts=progress.counts,
        unfinished=len(progress.flight),
        params=params,
        limit=limit,
        interrupted_by=stop.received,
        failure=failure,
        pipeline_seconds=pipeline_seconds,
        started=started,
        removed=removed,
        redone=redone,
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
