"""The labeling job's Ray Data dataset: the stages of :mod:`diffcut.job.stages` chained, ending in the write.

:func:`run_stages` builds one streaming dataset from a run's plan -- read + decode
tasks, the feature actor pool, the segment actor pool, the optional naming pool --
and runs it to the end of ``write_parquet``. :func:`diffcut.job.pipeline.label_dataset`
calls it under the output's lease, after the checks and the plan.
"""

from __future__ import annotations

import logging
import math

import ray
from ray.data import ActorPoolStrategy

from diffcut.job import inputs, schema, webdataset
from diffcut.job.ray_session import _actor_device
from diffcut.job.settings import LabelSettings, Pools, PoolSettings, SpeedSettings
from diffcut.job.stages import (
    AUTO_FEATURE_BATCH_ROWS,
    FeatureStage,
    NamingStage,
    SegmentStage,
    ShardNames,
    decode_stage,
)

#: Memory reserved per read/decode task (bytes).
DECODE_TASK_MEMORY = 512 * 2**20

#: Messages of the transient storage errors a write retries (Ray Data's ``retried_io_errors``,
#: added to its defaults, which only match Arrow's own S3 client: "AWS Error SLOW_DOWN"...). The
#: output is written through s3fs (``diffcut.job.inputs.arrow_filesystem``), whose errors read like
#: botocore's and aiohttp's once its retries and botocore's are spent. Each write is then retried
#: whole, up to 10 times with backoff to 32 s: a shard is one object, so a retry replaces it.
RETRIED_IO_ERRORS = (
    "SlowDown",
    "reduce your request rate",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Connection reset",
    "Connection was closed",
    "Server disconnected",
    "Could not connect to the endpoint",
    "Read timeout on endpoint",
)


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
    shard_rows: int,
    max_image_pixels: int,
    keep_metadata: bool = False,
    limit: int | None = None,
) -> None:
    """Build the Ray Data pipeline for ``plan`` (the stages above, in order) and run it to the end of the write."""
    context = ray.data.DataContext.get_current()  # travels with the job to every task
    context.retried_io_errors = list(dict.fromkeys([*context.retried_io_errors, *RETRIED_IO_ERRORS]))

    units = plan.units
    kind = units.column("kind")[0].as_py() if units.num_rows else "file"
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
    units_per_block = max(units_per_batch, math.ceil(units.num_rows / 10_000))
    blocks = [units.slice(start, units_per_block) for start in range(0, units.num_rows, units_per_block)]
    dataset = ray.data.from_arrow(blocks)

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
    filesystem, path = inputs.arrow_filesystem(output)
    # The driver reports a failed run itself, once (one line, or the traceback of an unexpected error):
    # Ray Data's console error records would print the same traceback three times (its log file keeps them).
    consoles = [h for h in logging.getLogger("ray.data").handlers if not isinstance(h, logging.FileHandler)]
    for handler in consoles:
        handler.addFilter(_below_error)
    try:
        dataset.write_parquet(
            path,
            filesystem=filesystem,
            filename_provider=ShardNames(run_id),
            min_rows_per_file=shard_rows,
            ray_remote_args={"num_cpus": pools.decode.cpus},
            schema=schema.labels_schema(keep_metadata, named=naming),
        )
    finally:
        for handler in consoles:
            handler.removeFilter(_below_error)


def _gpus(pool: PoolSettings, on_gpu: bool) -> float:
    """GPUs per actor: ``pool.gpus`` (requested on any device, so actors can be placed on GPU nodes, e.g. a
    fake-GPU autoscaling test on CPU), else one when the model runs on CUDA, none on CPU."""
    return pool.gpus if pool.gpus is not None else (1.0 if on_gpu else 0)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR
