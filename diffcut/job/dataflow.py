"""The labeling job's Ray Data dataset: the stages of :mod:`diffcut.job.stages` chained, ending in the write.

:func:`run_stages` builds one streaming dataset from a run's plan -- read + decode
tasks, the feature actor pool, the segment actor pool, the optional naming pool,
then the write stage (:mod:`diffcut.job.writer`) -- and runs it, finishing each unit
as it becomes whole. :func:`diffcut.job.pipeline.label_dataset` calls it under the
output's lease, after the checks and the plan.
"""

from __future__ import annotations

import logging
import math
import time

import ray
from ray.data import ActorPoolStrategy

from diffcut.job import inputs, schema, units, webdataset
from diffcut.job.ray_session import _actor_device
from diffcut.job.settings import LabelSettings, Pools, PoolSettings, SpeedSettings
from diffcut.job.stages import AUTO_FEATURE_BATCH_ROWS, FeatureStage, NamingStage, SegmentStage, decode_stage
from diffcut.job.writer import UnitProgress, finish_unit, write_parts

log = logging.getLogger(__name__)

#: Memory reserved per read/decode task (bytes).
DECODE_TASK_MEMORY = 512 * 2**20

#: Unit finishes (:func:`diffcut.job.writer.finish_unit`) in flight at once; the driver waits for one beyond.
FINISHES_IN_FLIGHT = 16
#: How long a stopping run (a signal, a failure) waits for the finishes in flight: within Kubernetes' default
#: 30 s grace period, with room for the summary.
DRAIN_SECONDS = 15


def run_stages(
    plan: inputs.Plan,
    output: str,
    *,
    run_id: str,
    label: LabelSettings,
    speed: SpeedSettings,
    pools: Pools,
    device: str,
    image_column: str,
    max_image_pixels: int,
    write_rows: int,
    progress: UnitProgress,
    keep_metadata: bool = False,
    limit: int | None = None,
) -> None:
    """Build the Ray Data pipeline for ``plan`` (the stages above, in order), run it, and finish every unit
    it makes whole (``progress`` counts them, :mod:`diffcut.job.writer`)."""
    read_units = plan.units
    kind = read_units.column("kind")[0].as_py() if read_units.num_rows else "file"
    # A Parquet unit is a whole row group, a WebDataset unit a whole shard (one task
    # streams it, holding decode_batch_size encoded images at a time); an image-file unit is one file.
    units_per_batch = pools.decode.batch_size if kind == "file" else 1
    # Bucketed inputs vary in size: hand each feature actor a few model calls'
    # worth of rows at a time, so rows of one size can share a call; decoded
    # blocks of the same length arrive grouped by size (decode_stage).
    if speed.batch_size == "auto":
        feature_batch = AUTO_FEATURE_BATCH_ROWS
    else:
        feature_batch = speed.batch_size * (4 if label.resize == "bucket" else 1)
    naming = label.vocabulary is not None
    params = schema.params_json(label.params())  # the params column, the same in every row of the run
    units_per_block = max(units_per_batch, math.ceil(read_units.num_rows / 10_000))
    blocks = [read_units.slice(start, units_per_block) for start in range(0, read_units.num_rows, units_per_block)]
    dataset = ray.data.from_arrow(blocks or [read_units])

    dataset = dataset.map_batches(
        decode_stage,
        batch_size=units_per_batch,
        batch_format="pyarrow",
        num_cpus=pools.decode.cpus,
        # A memory reservation per decode task: decoding one large image takes
        # a few hundred MB (a 48-megapixel PNG decodes to 144 MB before
        # conversion), so a node never runs more decodes than it can hold.
        # Remote args that differ from the next stage's also keep Ray Data from
        # fusing the decoding into the feature actors (it fuses a task stage
        # into the following actor stage when their arguments match, as on
        # CPU-only runs): decoding stays in parallel CPU tasks and the model
        # actors only run the model.
        memory=DECODE_TASK_MEMORY,
        fn_kwargs=dict(
            image_column=image_column,
            resolution=label.resolution,
            resize=label.resize,
            stride=label.stride,
            mask_size=label.mask_size,
            max_image_pixels=max_image_pixels,
            keep_image_bytes=label.refine or naming,
            chunk_rows=feature_batch,
            keep_metadata=keep_metadata,
            sort_records=pools.decode.batch_size if kind == webdataset.UNIT_KIND else None,
        ),
    )
    if limit is not None and kind == webdataset.UNIT_KIND:
        # The plan could not cut at the limit (a shard's samples are known once read): stop the stream there.
        dataset = dataset.limit(max(0, int(limit)))
    actor_device, on_gpu = _actor_device(device)
    dataset = dataset.map_batches(
        FeatureStage,
        fn_constructor_kwargs=dict(label=label, speed=speed, device=actor_device),
        compute=ActorPoolStrategy(min_size=pools.extractor.min, max_size=pools.extractor.max),
        batch_size=feature_batch,
        batch_format="pyarrow",
        num_cpus=pools.extractor.cpus,
        num_gpus=_gpus(pools.extractor, on_gpu),
    )
    dataset = dataset.map_batches(
        SegmentStage,
        fn_constructor_kwargs=dict(
            label=label, params=params, max_image_pixels=max_image_pixels, keep_metadata=keep_metadata
        ),
        compute=ActorPoolStrategy(min_size=pools.ncut.min, max_size=pools.ncut.max),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=pools.ncut.cpus,
        num_gpus=pools.ncut.gpus or 0,  # a CPU stage: GPUs only when asked for
    )
    if naming:
        # Its own pool: on the GPU nodes when the model runs on CUDA (gpus None), as the feature pool.
        dataset = dataset.map_batches(
            NamingStage,
            fn_constructor_kwargs=dict(
                label=label,
                device=actor_device,
                params=params,
                max_image_pixels=max_image_pixels,
                keep_metadata=keep_metadata,
            ),
            compute=ActorPoolStrategy(min_size=pools.naming.min, max_size=pools.naming.max),
            batch_size=1,  # rows are named one by one; batch_size may be "auto" (the feature actors')
            batch_format="pyarrow",
            num_cpus=pools.naming.cpus,
            num_gpus=_gpus(pools.naming, on_gpu),
        )
    label_schema = schema.labels_schema(keep_metadata, named=naming)
    dataset = dataset.map_batches(
        write_parts,
        batch_size=write_rows,  # rows per write task, staged as one part file per unit among them
        batch_format="pyarrow",
        num_cpus=pools.decode.cpus,
        fn_kwargs=dict(output=output, run_id=run_id, label_schema=label_schema),
    )
    finishing = _Finishing(
        progress,
        ray.remote(finish_unit).options(num_cpus=0, max_retries=3),
        dict(
            output=output,
            params=params,
            run_id=run_id,
            unit_inputs=plan.inputs,
            list_sources=kind == "file",
            label_schema=label_schema,
        ),
    )
    # The driver reports a failed run itself, once (one line, or the traceback of an unexpected error):
    # Ray Data's console error records would print the same traceback three times (its log file keeps them).
    consoles = [h for h in logging.getLogger("ray.data").handlers if not isinstance(h, logging.FileHandler)]
    for handler in consoles:
        handler.addFilter(_below_error)
    ended = False
    try:
        # Units with no read unit (Parquet files without rows) only need their (empty) label file: at_end.
        for parts in dataset.iter_batches(batch_size=None, batch_format="pyarrow") if blocks else ():
            for unit in progress.add(parts):
                finishing.submit(unit, complete=unit not in progress.partial)
            finishing.collect(block=False)
        ended = True
        for unit, complete in progress.at_end(cut=limit is not None and kind == webdataset.UNIT_KIND):
            finishing.submit(unit, complete=complete)
    finally:
        for handler in consoles:
            handler.removeFilter(_below_error)
        # Units already whole are finished even when the run stops (a signal, a failure): they are done work.
        finishing.drain(ended)
    if not progress.flight:  # every unit finished: nothing staged is needed any more
        units.remove_parts(output)


class _Finishing:
    """The driver's side of finishing units: Ray tasks of :func:`diffcut.job.writer.finish_unit`, a few at a time."""

    def __init__(self, progress: UnitProgress, remote, options: dict):
        self.progress, self.remote, self.options = progress, remote, dict(options)
        self.unit_inputs = self.options.pop("unit_inputs")
        self.pending: dict = {}  # ObjectRef -> (unit, complete)

    def submit(self, unit: str, *, complete: bool) -> None:
        while len(self.pending) >= FINISHES_IN_FLIGHT:
            self.collect(block=True)
        expected = self.progress.target(unit) if complete else None
        ref = self.remote.remote(
            unit=unit,
            parts=self.progress.parts(unit),
            expected=expected,
            complete=complete,
            input=self.unit_inputs.get(unit),
            **self.options,
        )
        self.pending[ref] = (unit, complete)

    def collect(self, *, block: bool) -> None:
        if not self.pending:
            return
        refs = list(self.pending)
        ready, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
        for ref in ready:
            unit, _ = self.pending.pop(ref)
            self.progress.finished_unit(unit, ray.get(ref))

    def drain(self, ended: bool) -> None:
        """Wait for every finish; after a clean end a unit found short (a duplicate had hidden a missing row)
        is recorded as incomplete, so that the next run redoes it."""
        deadline = None if ended else time.monotonic() + DRAIN_SECONDS
        while self.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                log.warning("%d unit(s) were not finished in time: the next run redoes them", len(self.pending))
                return
            refs = list(self.pending)
            ready, _ = ray.wait(refs, num_returns=1, timeout=left)
            for ref in ready:
                unit, complete = self.pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception:
                    if ended:
                        raise
                    log.warning("unit %s could not be finished: the next run redoes it", unit, exc_info=True)
                    continue
                self.progress.finished_unit(unit, record)
                if record is None and ended:
                    self.submit(unit, complete=False)


def _gpus(pool: PoolSettings, on_gpu: bool) -> float:
    """GPUs per actor: ``pool.gpus`` (requested on any device, so actors can be placed on GPU nodes, e.g. a
    fake-GPU autoscaling test on CPU), else one when the model runs on CUDA, none on CPU."""
    return pool.gpus if pool.gpus is not None else (1.0 if on_gpu else 0)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR
