"""The labeling job's Ray Data stages: read + decode, features, segment, naming.

Each stage is a plain function or callable class on Arrow/numpy batches that
Ray Data runs as one streaming operator, chained by
:func:`diffcut.job.dataflow.run_stages`:

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
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from diffcut.job import inputs, schema
from diffcut.job.feature_batches import DECODED_SCHEMA, FeatureBatches, error_fields
from diffcut.job.settings import FEATURES, SEGMENT, LabelSettings, SpeedSettings
from diffcut.job.writer import UNIT_COLUMNS

log = logging.getLogger(__name__)

#: Rows handed to a feature actor at a time with ``batch_size="auto"`` (a few calls' worth).
AUTO_FEATURE_BATCH_ROWS = 64


# =========================================================================== stages
def _carried(record: inputs.RawRecord) -> dict:
    row = dict.fromkeys(DECODED_SCHEMA.names)
    row.update(
        image_id=record.image_id,
        source=record.source,
        status=schema.STATUS_OK,
        metadata=record.metadata,
        unit=record.unit,
        unit_rows=-1,
    )
    return row


def decode_record(
    record: inputs.RawRecord,
    *,
    resolution: int,
    resize: str,
    stride: int,
    mask_size: inputs.MaskSize,
    max_image_pixels: int,
    keep_image_bytes: bool,
) -> dict:
    """One row of :data:`DECODED_SCHEMA` for a raw record; never raises."""
    row = _carried(record)
    if record.error is not None:
        row.update(error_fields(record.error))
        return row
    try:
        decoded = inputs.decode_image(
            record.data, lambda w, h: inputs.model_size(w, h, resolution, resize, stride), max_pixels=max_image_pixels
        )
        height, width = decoded.pixels.shape[:2]
        mask_width, mask_height = mask_size.resolve((decoded.width, decoded.height), (width, height))
    except inputs.ImageDecodeError as error:
        row.update(error_fields(str(error)))
        return row
    except Exception as error:  # noqa: BLE001 - a bug or an exotic file must cost one row, not the job
        row.update(error_fields(f"unexpected failure while decoding: {type(error).__name__}: {error}"))
        return row
    row.update(
        width=decoded.width,
        height=decoded.height,
        mask_width=mask_width,
        mask_height=mask_height,
        pixels=decoded.pixels.tobytes(),
        pixel_width=width,
        pixel_height=height,
        image_bytes=record.data if keep_image_bytes else None,
    )
    return row


def input_size_key(
    record: inputs.RawRecord, *, resolution: int, resize: str, stride: int, max_image_pixels: int
) -> tuple[int, int, int]:
    """Sort key of a raw record: its model input size (height, width), read
    from the image header without decoding; unreadable records sort last."""
    if record.error is None:
        try:
            width, height = inputs.upright_size(record.data, max_image_pixels)
            model_width, model_height = inputs.model_size(width, height, resolution, resize, stride)
            return (0, model_height, model_width)
        except Exception:  # noqa: BLE001 - decoding reports the error on the row
            pass
    return (1, 0, 0)


def decode_stage(
    units: pa.Table,
    *,
    image_column: str,
    resolution: int,
    resize: str,
    stride: int,
    mask_size: str,
    max_image_pixels: int,
    keep_image_bytes: bool,
    chunk_rows: int,
    keep_metadata: bool = False,
    sort_records: int | None = None,
) -> Iterator[pa.Table]:
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
    encoded images are held at once; the rows of the last chunk carry the number of records read from the
    shard (``unit_rows``), how the driver knows when a shard's unit is whole (:mod:`diffcut.job.writer`).
    """
    spec = inputs.MaskSize.parse(mask_size)
    records = inputs.read_units(units.to_pylist(), image_column=image_column, keep_metadata=keep_metadata)
    rows: list[dict] = []
    count = 0
    for group in _groups(records, sort_records):
        if resize == "bucket":  # list.sort is stable: equal sizes keep their input order
            group.sort(
                key=lambda record: input_size_key(
                    record, resolution=resolution, resize=resize, stride=stride, max_image_pixels=max_image_pixels
                )
            )
        for record in group:
            if len(rows) >= chunk_rows:  # yielded once the next record exists: the last chunk is known as such
                yield pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
                rows = []
            count += 1
            rows.append(
                decode_record(
                    record,
                    resolution=resolution,
                    resize=resize,
                    stride=stride,
                    mask_size=spec,
                    max_image_pixels=max_image_pixels,
                    keep_image_bytes=keep_image_bytes,
                )
            )
        group.clear()  # the encoded bytes go before the next group is read, not after
    if rows:
        if units.num_rows == 1 and units.column("kind")[0].as_py() == "webdataset":  # a batch is one whole shard
            for row in rows:
                row["unit_rows"] = count
        yield pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def _groups(records: Iterator[inputs.RawRecord], size: int | None) -> Iterator[list[inputs.RawRecord]]:
    """Consecutive lists of ``size`` records (all of them in one list when ``size`` is None)."""
    group: list[inputs.RawRecord] = []
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

    def __init__(self, label: LabelSettings, speed: SpeedSettings, device: str):
        from diffcut.method.features import FeatureExtractor

        extractor = FeatureExtractor.from_pretrained(
            device=device, **label.options(FEATURES), **speed.extractor_options()
        )
        super().__init__(extractor, speed.batch_size)


def _error_row(row: dict, message: str, params: str) -> dict:
    """The output row of an image that failed, from its stage row (ids and size carried)."""
    return schema.error_row(
        row["image_id"], row["source"], message, params=params, width=row["width"], height=row["height"]
    )


class SegmentStage:
    """Ray Data UDF of stage 3 (actor): NCut, assignment, optional PAMR -> output rows."""

    def __init__(self, label: LabelSettings, params: str, max_image_pixels: int, keep_metadata: bool = False):
        self.options, self.refine = label.options(SEGMENT), label.refine
        self.params = params
        self.max_image_pixels = max_image_pixels
        self.keep_metadata = keep_metadata
        self.schema = schema.labels_schema(keep_metadata)
        # The naming stage needs the image: hand its encoded bytes on in one extra column.
        self.carry_image = label.vocabulary is not None

    def label(self, row: dict) -> dict:
        """The output row of one image; never raises."""
        from diffcut.method.segmenter import segment_features

        if row["status"] != schema.STATUS_OK:
            return _error_row(row, row["error"], self.params)
        try:
            grid = np.frombuffer(row["features"], np.float16).reshape(
                row["feature_height"], row["feature_width"], row["feature_dim"]
            )
            mask_size = (row["mask_height"], row["mask_width"])
            image = None
            if self.refine:
                image = inputs.decode_image(
                    row["image_bytes"], (row["mask_width"], row["mask_height"]), max_pixels=self.max_image_pixels
                ).pixels
            result = segment_features(grid, mask_size, image=image, **self.options)
            return schema.ok_row(
                image_id=row["image_id"],
                source=row["source"],
                width=row["width"],
                height=row["height"],
                mask=result.mask,
                latent_labels=result.latent_labels,
                descriptors=result.embeddings,
                tree=result.tree.to_dict(),
                params=self.params,
            )
        except Exception as error:  # noqa: BLE001 - one image's failure is one error row
            return _error_row(row, inputs.redact(f"segmentation failed: {type(error).__name__}: {error}"), self.params)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = [self.label(row) for row in rows]
        if self.keep_metadata:
            for row, result in zip(rows, out):
                result["metadata"] = row["metadata"]
        table = schema.rows_to_table(out, self.schema)
        if self.carry_image:
            table = table.append_column("image_bytes", pa.array([row.get("image_bytes") for row in rows], pa.binary()))
        return with_unit_columns(table, batch)


class NamingStage:
    """Ray Data UDF of the optional naming stage (actor): a class from the vocabulary for every segment.

    Loads the CLIP and computes the vocabulary's text embeddings once per actor
    (:class:`diffcut.method.naming.SegmentNamer`); a row whose naming fails becomes an
    error row.
    """

    def __init__(
        self, label: LabelSettings, device: str, params: str, max_image_pixels: int, keep_metadata: bool = False
    ):
        from diffcut.method.naming import SegmentNamer

        self.namer = SegmentNamer(label.naming_model, label.vocabulary, device=device)
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
            pixels = inputs.decode_image(image_bytes, size, max_pixels=self.max_image_pixels).pixels
            mask = schema.decode_mask(row["mask"])
            return schema.named_row(row, self.namer.name(pixels, mask, row["num_segments"]), self.class_names)
        except Exception as error:  # noqa: BLE001 - one image's failure is one error row
            failed = _error_row(row, inputs.redact(f"naming failed: {type(error).__name__}: {error}"), self.params)
            if self.keep_metadata:
                failed["metadata"] = row["metadata"]
            return failed

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.drop_columns([f.name for f in UNIT_COLUMNS]).to_pylist()
        return with_unit_columns(schema.rows_to_table([self.name(row) for row in rows], self.schema), batch)


def with_unit_columns(table: pa.Table, batch: pa.Table) -> pa.Table:
    """A stage's output rows with the unit columns of its input rows (same order) appended."""
    for field in UNIT_COLUMNS:
        table = table.append_column(field, batch.column(field.name))
    return table
