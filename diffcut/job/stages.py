"""The labeling job's Ray Data stages: read + decode, features, segment, naming.

Each stage is a plain function or callable class on Arrow/numpy batches that
Ray Data runs as one streaming operator, chained by :func:`run_stages`
(which :func:`diffcut.job.pipeline.label_dataset` calls):

1. **read + decode** (:func:`decode_stage`, CPU tasks): image bytes to pixels at
   the model's input size; a record that cannot be read or decoded becomes an
   error row here and passes every later stage untouched.
2. **features** (:class:`FeatureStage`, an actor pool, one GPU per actor):
   pixels to float16 features, in calls grouped by input size.
3. **segment** (:class:`SegmentStage`, CPU actors): features to labels, split
   tree and descriptors -- the output row (:mod:`diffcut.job.schema`).
4. **naming** (:class:`NamingStage`, optional): segments to vocabulary classes.

The method itself is imported lazily inside the actors, so the driver does not
load torch.
The feature actor's batch work and the schemas between decode and features
live in :mod:`diffcut.job.feature_batches`, which imports no Ray.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import numpy as np
import pyarrow as pa
from ray.data.datasource import FilenameProvider

from diffcut.job import io as dio
from diffcut.job import schema, webdataset
from diffcut.job.feature_batches import DECODED_SCHEMA, FeatureBatches, error_fields
from diffcut.job.ray_session import _actor_device

log = logging.getLogger(__name__)

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
#: Rows handed to a feature actor at a time with ``batch_size="auto"`` (a few calls' worth).
AUTO_FEATURE_BATCH_ROWS = 64


# =========================================================================== stages
def _carried(record: dio.RawRecord) -> dict:
    row = dict.fromkeys(DECODED_SCHEMA.names)
    row.update(image_id=record.image_id, source=record.source, status=schema.STATUS_OK, metadata=record.metadata)
    return row


def decode_record(record: dio.RawRecord, *, resolution: int, resize: str, stride: int, mask_size: dio.MaskSize,
                  max_image_pixels: int, keep_image_bytes: bool) -> dict:
    """One row of :data:`DECODED_SCHEMA` for a raw record; never raises."""
    row = _carried(record)
    if record.error is not None:
        row.update(error_fields(record.error))
        return row
    try:
        decoded = dio.decode_image(
            record.data, lambda w, h: dio.model_size(w, h, resolution, resize, stride), max_pixels=max_image_pixels
        )
        height, width = decoded.pixels.shape[:2]
        mask_width, mask_height = mask_size.resolve((decoded.width, decoded.height), (width, height))
    except dio.ImageDecodeError as error:
        row.update(error_fields(str(error)))
        return row
    except Exception as error:  # noqa: BLE001 - a bug or an exotic file must cost one row, not the job
        row.update(error_fields(f"unexpected failure while decoding: {type(error).__name__}: {error}"))
        return row
    row.update(
        width=decoded.width, height=decoded.height, mask_width=mask_width, mask_height=mask_height,
        pixels=decoded.pixels.tobytes(), pixel_width=width, pixel_height=height,
        image_bytes=record.data if keep_image_bytes else None,
    )
    return row


def input_size_key(record: dio.RawRecord, *, resolution: int, resize: str, stride: int,
                   max_image_pixels: int) -> tuple[int, int, int]:
    """Sort key of a raw record: its model input size (height, width), read
    from the image header without decoding; unreadable records sort last."""
    if record.error is None:
        try:
            width, height = dio.upright_size(record.data, max_image_pixels)
            model_width, model_height = dio.model_size(width, height, resolution, resize, stride)
            return (0, model_height, model_width)
        except Exception:  # noqa: BLE001 - decoding reports the error on the row
            pass
    return (1, 0, 0)


def decode_stage(units: pa.Table, *, image_column: str, resolution: int, resize: str, stride: int, mask_size: str,
                 max_image_pixels: int, keep_image_bytes: bool, chunk_rows: int, keep_metadata: bool = False,
                 sort_records: int | None = None) -> Iterator[pa.Table]:
    """Ray Data UDF of stage 1: read units -> decoded rows, ``chunk_rows`` at a time.

    The records of a batch (its image files, or a Parquet row group) are put
    in order of model input size before decoding, from their headers alone.
    Every model call holds ``batch_size`` images of one size, padded with
    blank ones when fewer are at hand (:class:`FeatureStage`); rows that
    arrive grouped by size fill those calls, where rows in file order would
    scatter over the buckets and leave most calls part blank
    (``benchmarks/padding.py``). A generator, so a Parquet row group of many
    images never exists decoded all at once (the encoded bytes of the batch
    are in memory anyway: they are fetched together). With ``sort_records``,
    records are read and ordered ``sort_records`` at a time instead of all of
    the batch's: a WebDataset shard is streamed, only that many of its
    encoded images are held at once.
    """
    spec = dio.MaskSize.parse(mask_size)
    records = dio.read_units(units.to_pylist(), image_column=image_column, keep_metadata=keep_metadata)
    rows: list[dict] = []
    for group in _groups(records, sort_records):
        if resize == "bucket":  # list.sort is stable: equal sizes keep their input order
            group.sort(key=lambda record: input_size_key(record, resolution=resolution, resize=resize, stride=stride,
                                                         max_image_pixels=max_image_pixels))
        for record in group:
            rows.append(decode_record(record, resolution=resolution, resize=resize, stride=stride, mask_size=spec,
                                      max_image_pixels=max_image_pixels, keep_image_bytes=keep_image_bytes))
            if len(rows) >= chunk_rows:
                yield pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
                rows = []
        group.clear()  # the encoded bytes go before the next group is read, not after
    if rows:
        yield pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def _groups(records: Iterator[dio.RawRecord], size: int | None) -> Iterator[list[dio.RawRecord]]:
    """Consecutive lists of ``size`` records (all of them in one list when ``size`` is None)."""
    group: list[dio.RawRecord] = []
    for record in records:
        group.append(record)
        if size is not None and len(group) >= size:
            yield group
            group = []
    if group:
        yield group


class FeatureStage(FeatureBatches):
    """Ray Data UDF of stage 2 (actor): diffusion features of every ok row.

    Loads the model once per actor; the batch work (grouping by input size,
    padded calls, one-by-one retries) is :class:`~diffcut.job.feature_batches.FeatureBatches`,
    which code without Ray runs too.
    """

    def __init__(self, model: str, device: str, dtype: str, timestep: int, batch_size: int | str,
                 speed: dict | None = None):
        from diffcut.method.features import FeatureExtractor

        extractor = FeatureExtractor.from_pretrained(model, device=device, dtype=dtype, timestep=timestep,
                                                     **(speed or {}))
        super().__init__(extractor, batch_size)


class SegmentStage:
    """Ray Data UDF of stage 3 (actor): NCut, assignment, optional PAMR -> output rows."""

    def __init__(self, tau: float, alpha: float, refine: bool, exact_search: bool, params: str,
                 max_image_pixels: int, keep_metadata: bool = False, carry_image: bool = False):
        self.tau, self.alpha, self.refine, self.exact_search = tau, alpha, refine, exact_search
        self.params = params
        self.max_image_pixels = max_image_pixels
        self.keep_metadata = keep_metadata
        self.schema = schema.labels_schema(keep_metadata)
        # The naming stage needs the image: hand its encoded bytes on in one extra column.
        self.carry_image = carry_image

    def label(self, row: dict) -> dict:
        """The output row of one image; never raises."""
        from diffcut.method.segmenter import segment_features

        if row["status"] != schema.STATUS_OK:
            return schema.error_row(row["image_id"], row["source"], row["error"], params=self.params,
                                    width=row["width"], height=row["height"])
        try:
            grid = np.frombuffer(row["features"], np.float16).reshape(
                row["feature_height"], row["feature_width"], row["feature_dim"])
            mask_size = (row["mask_height"], row["mask_width"])
            image = None
            if self.refine:
                image = dio.decode_image(row["image_bytes"], (row["mask_width"], row["mask_height"]),
                                         max_pixels=self.max_image_pixels).pixels
            result = segment_features(grid, mask_size, tau=self.tau, alpha=self.alpha, refine=self.refine,
                                      image=image, exact_search=self.exact_search)
            return schema.ok_row(
                image_id=row["image_id"], source=row["source"], width=row["width"], height=row["height"],
                mask=result.mask, latent_labels=result.latent_labels, descriptors=result.embeddings,
                tree=result.tree.to_dict(), params=self.params,
            )
        except Exception as error:  # noqa: BLE001 - one image's failure is one error row
            return schema.error_row(row["image_id"], row["source"],
                                    dio.redact(f"segmentation failed: {type(error).__name__}: {error}"),
                                    params=self.params, width=row["width"], height=row["height"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = [self.label(row) for row in rows]
        if self.keep_metadata:
            for row, result in zip(rows, out):
                result["metadata"] = row["metadata"]
        table = schema.rows_to_table(out, self.schema)
        if self.carry_image:
            table = table.append_column("image_bytes", pa.array([row.get("image_bytes") for row in rows], pa.binary()))
        return table


class NamingStage:
    """Ray Data UDF of the optional naming stage (actor): a class from the vocabulary for every segment.

    Loads the CLIP and computes the vocabulary's text embeddings once per actor
    (:class:`diffcut.method.naming.SegmentNamer`); a row whose naming fails becomes an
    error row.
    """

    def __init__(self, naming_model: str, vocabulary: str, device: str, params: str, max_image_pixels: int,
                 keep_metadata: bool = False):
        from diffcut.method.naming import SegmentNamer

        self.namer = SegmentNamer(naming_model, vocabulary, device=device)
        self.class_names = self.namer.vocabulary.class_names
        self.params = params
        self.max_image_pixels = max_image_pixels
        self.keep_metadata = keep_metadata
        self.schema = schema.labels_schema(keep_metadata, named=True)

    def name(self, row: dict) -> dict:
        """The named output row of one segmented row; never raises."""
        image_bytes = row.pop("image_bytes", None)
        if row["status"] != schema.STATUS_OK:
            return row
        try:
            size = (row["mask_width"], row["mask_height"])
            pixels = dio.decode_image(image_bytes, size, max_pixels=self.max_image_pixels).pixels
            mask = schema.decode_mask(row["mask"])
            return schema.named_row(row, self.namer.name(pixels, mask, row["num_segments"]), self.class_names)
        except Exception as error:  # noqa: BLE001 - one image's failure is one error row
            failed = schema.error_row(row["image_id"], row["source"],
                                      dio.redact(f"naming failed: {type(error).__name__}: {error}"),
                                      params=self.params, width=row["width"], height=row["height"])
            if self.keep_metadata:
                failed["metadata"] = row["metadata"]
            return failed

    def __call__(self, batch: pa.Table) -> pa.Table:
        return schema.rows_to_table([self.name(row) for row in batch.to_pylist()], self.schema)


class ShardNames(FilenameProvider):
    """``labels-<run id>-<write uuid>-<task>.parquet``: unique per run, recognisable by readers."""

    def __init__(self, run_id: str):
        super().__init__(file_format="parquet")
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{schema.SHARD_PREFIX}{self.run_id}-{write_uuid}-{task_index:06d}.parquet"


def run_stages(plan: dio.Plan, output: str, *, run_id: str, image_column: str, model: str, device: str,
                  dtype: str, timestep: int, tau: float, alpha: float, resolution: int, resize: str, stride: int,
                  mask_size: str, refine: bool, exact_search: bool, batch_size: int | str, speed: dict,
                  decode_batch_size: int,
                  decode_cpus: float, extractor_pool: tuple[int, int], extractor_gpus: float | None, extractor_cpus: float,
                  ncut_pool: tuple[int, int], ncut_cpus: float, shard_rows: int, max_image_pixels: int,
                  params_text: str, keep_metadata: bool = False, limit: int | None = None,
                  vocabulary: str | None = None, naming_model: str,
                  naming_pool: tuple[int, int] = (1, 1), naming_gpus: float | None = None,
                  naming_cpus: float = 1.0) -> None:
    """Build the Ray Data pipeline for ``plan`` (the stages above, in order) and run it to the end of the write."""
    import ray
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
