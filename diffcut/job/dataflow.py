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
    image_column: str,
    model: str,
    device: str,
    dtype: str,
    timestep: int,
    tau: float,
    alpha: float,
    resolution: int,
    resize: str,
    stride: int,
    mask_size: str,
    refine: bool,
    exact_search: bool,
    batch_size: int | str,
    speed: dict,
    decode_batch_size: int,
    decode_cpus: float,
    extractor_pool: tuple[int, int],
    extractor_gpus: float | None,
    extractor_cpus: float,
    ncut_pool: tuple[int, int],
    ncut_cpus: float,
    shard_rows: int,
    max_image_pixels: int,
    params_text: str,
    keep_metadata: bool = False,
    limit: int | None = None,
    vocabulary: str | None = None,
    naming_model: str,
    naming_pool: tuple[int, int] = (1, 1),
    naming_gpus: float | None = None,
    naming_cpus: float = 1.0,
) -> None:
    """Build the Ray Data pipeline for ``plan`` (the stages above, in order) and run it to the end of the write."""
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
        fn_kwargs=dict(
            image_column=image_column,
            resolution=resolution,
            resize=resize,
            stride=stride,
            mask_size=mask_size,
            max_image_pixels=max_image_pixels,
            keep_image_bytes=refine or vocabulary is not None,
            chunk_rows=feature_batch,
            keep_metadata=keep_metadata,
            sort_records=decode_batch_size if kind == webdataset.UNIT_KIND else None,
        ),
    )
    if limit is not None and kind == webdataset.UNIT_KIND:
        # The plan could not cut at the limit (a shard's samples are known once read): stop the stream there.
        dataset = dataset.limit(max(0, int(limit)))
    actor_device, on_gpu = _actor_device(device)
    dataset = dataset.map_batches(
        FeatureStage,
        fn_constructor_kwargs=dict(
            model=model, device=actor_device, dtype=dtype, timestep=timestep, batch_size=batch_size, speed=speed
        ),
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
        fn_constructor_kwargs=dict(
            tau=tau,
            alpha=alpha,
            refine=refine,
            exact_search=exact_search,
            params=params_text,
            max_image_pixels=max_image_pixels,
            keep_metadata=keep_metadata,
            carry_image=vocabulary is not None,
        ),
        compute=ActorPoolStrategy(min_size=ncut_pool[0], max_size=ncut_pool[1]),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=ncut_cpus,
    )
    if vocabulary is not None:
        # Its own pool: on the GPU nodes when the model runs on CUDA (naming_gpus None), as the feature pool.
        dataset = dataset.map_batches(
            NamingStage,
            fn_constructor_kwargs=dict(
                naming_model=naming_model,
                vocabulary=vocabulary,
                device=actor_device,
                params=params_text,
                max_image_pixels=max_image_pixels,
                keep_metadata=keep_metadata,
            ),
            compute=ActorPoolStrategy(min_size=naming_pool[0], max_size=naming_pool[1]),
            batch_size=1,  # rows are named one by one; batch_size may be "auto" (the feature actors')
            batch_format="pyarrow",
            num_cpus=naming_cpus,
            num_gpus=naming_gpus if naming_gpus is not None else (1.0 if on_gpu else 0),
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
            ray_remote_args={"num_cpus": decode_cpus},
            schema=schema.labels_schema(keep_metadata, named=vocabulary is not None),
        )
    finally:
        for handler in consoles:
            handler.removeFilter(_below_error)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR
