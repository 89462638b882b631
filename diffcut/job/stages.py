"""The labeling job's Ray Data stages: read + decode, features, segment, naming.

Each stage is a plain function or callable class on Arrow/numpy batches that
Ray Data runs as one streaming operator (the order and the wiring are in
:func:`diffcut.job.pipeline.label_dataset`):

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
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Iterator

import numpy as np
import pyarrow as pa
from ray.data.datasource import FilenameProvider

from diffcut.job import io as dio
from diffcut.job import schema

log = logging.getLogger(__name__)

#: Rows handed to a feature actor at a time with ``batch_size="auto"`` (a few calls' worth).
AUTO_FEATURE_BATCH_ROWS = 64

# Columns every intermediate stage carries for every row, ok or error.
_CARRIED = [
    pa.field("image_id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("mask_width", pa.int32()),
    pa.field("mask_height", pa.int32()),
    pa.field("image_bytes", pa.binary()),  # only with refine: PAMR needs the image at the mask size
    pa.field("metadata", pa.string()),  # the sample's JSON (WebDataset), kept with keep_metadata
]
DECODED_SCHEMA = pa.schema(
    _CARRIED + [pa.field("pixels", pa.binary()), pa.field("pixel_width", pa.int32()), pa.field("pixel_height", pa.int32())]
)
FEATURES_SCHEMA = pa.schema(
    _CARRIED
    + [
        pa.field("features", pa.binary()),  # float16, (feature_height, feature_width, feature_dim), C order
        pa.field("feature_height", pa.int32()),
        pa.field("feature_width", pa.int32()),
        pa.field("feature_dim", pa.int32()),
    ]
)


# =========================================================================== stages
def _error_fields(message: str) -> dict:
    return {"status": schema.STATUS_ERROR, "error": dio.redact(message)}


def _carried(record: dio.RawRecord) -> dict:
    row = dict.fromkeys(DECODED_SCHEMA.names)
    row.update(image_id=record.image_id, source=record.source, status=schema.STATUS_OK, metadata=record.metadata)
    return row


def decode_record(record: dio.RawRecord, *, resolution: int, resize: str, stride: int, mask_size: dio.MaskSize,
                  max_image_pixels: int, keep_image_bytes: bool) -> dict:
    """One row of :data:`DECODED_SCHEMA` for a raw record; never raises."""
    row = _carried(record)
    if record.error is not None:
        row.update(_error_fields(record.error))
        return row
    try:
        decoded = dio.decode_image(
            record.data, lambda w, h: dio.model_size(w, h, resolution, resize, stride), max_pixels=max_image_pixels
        )
        height, width = decoded.pixels.shape[:2]
        mask_width, mask_height = mask_size.resolve((decoded.width, decoded.height), (width, height))
    except dio.ImageDecodeError as error:
        row.update(_error_fields(str(error)))
        return row
    except Exception as error:  # noqa: BLE001 - a bug or an exotic file must cost one row, not the job
        row.update(_error_fields(f"unexpected failure while decoding: {type(error).__name__}: {error}"))
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


def model_calls(sizes: list[tuple[int, int] | None], batch_size) -> list[list[int]]:
    """How :class:`FeatureStage` runs one batch: the indices of each model call.

    ``sizes`` are the rows' model input sizes (None: an error row, not run).
    ``batch_size`` is an int or a function of the size (``batch_size="auto"``).
    Rows of one size run together in input order, ``batch_size`` per call;
    each call is padded to ``batch_size`` images, so ``len(calls) *
    batch_size`` images go through the model for ``sum(map(len, calls))``
    real ones.
    """
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, size in enumerate(sizes):
        if size is not None:
            groups[tuple(size)].append(index)
    per_size = batch_size if callable(batch_size) else (lambda size: batch_size)
    calls = []
    for size, indices in groups.items():
        step = per_size(size)
        calls += [indices[start:start + step] for start in range(0, len(indices), step)]
    return calls


class FeatureStage:
    """Ray Data UDF of stage 2 (actor): diffusion features of every ok row.

    Loads the model once per actor. Rows of a batch are grouped by input size
    (the bucket) and run in chunks of ``batch_size``; if a chunk fails (e.g.
    out of memory) its rows are retried one by one, and a row that still fails
    becomes an error row.

    Every model call holds exactly ``batch_size`` images: a short chunk (the
    last of a bucket) is padded with blank images. The model's kernels are
    chosen by batch shape and round differently for different batch sizes, so
    without this an image's features -- and, at near-ties, its labels -- would
    depend on which images happened to share its Ray Data batch, i.e. on pool
    sizes and scheduling. With it, the output is a function of the inputs,
    the parameters and ``batch_size`` (docs/output-format.md, "Determinism").
    Only the one-by-one retry after a failed chunk runs unpadded.
    """

    def __init__(self, model: str, device: str, dtype: str, timestep: int, batch_size: int | str,
                 speed: dict | None = None):
        import torch

        from diffcut.method.features import FeatureExtractor

        self.torch = torch
        extractor = FeatureExtractor.from_pretrained(model, device=device, dtype=dtype, timestep=timestep,
                                                     **(speed or {}))
        self.__dict__.update(vars(FeatureStage.around(extractor, batch_size)))

    @classmethod
    def around(cls, extractor, batch_size: int | str) -> "FeatureStage":
        """The stage around an extractor built elsewhere (benchmarks/gpu_stage.py --job-stage)."""
        import torch

        stage = cls.__new__(cls)
        stage.torch = torch
        stage.extractor = extractor
        stage.auto_batch = batch_size == "auto"
        stage.batch_size = 1 if stage.auto_batch else max(1, int(batch_size))
        stage._on_cuda = extractor.device.type == "cuda"
        stage._warm = set()
        return stage

    def _batch_for(self, size: tuple[int, int]) -> int:
        """Images per call for this input size; with auto, found (and warmed up) once per size."""
        size = (int(size[0]), int(size[1]))
        batch = self.extractor.auto_batch_size(*size) if self.auto_batch else self.batch_size
        if size not in self._warm and self.extractor.compiled:
            # Compile (or re-specialize) on blank images, not on the first real batch.
            self.extractor.warm_up([size], batch)
        self._warm.add(size)
        return batch

    def _extract(self, pixels: list[np.ndarray], pad: bool = True) -> np.ndarray:
        """float16 features of same-size images; ``pad``: run them in a call of exactly the size's batch."""
        torch = self.torch
        count = len(pixels)
        target = self._batch_for(pixels[0].shape[:2]) if pad else count
        stacked = np.stack(pixels + [np.zeros_like(pixels[0])] * max(0, target - count))
        host = torch.from_numpy(stacked)
        if self._on_cuda:
            # uint8 crosses the bus (4x less than float32) from pinned memory, asynchronously; the
            # conversion to floats runs on the GPU.
            host = host.pin_memory()
        batch = host.to(self.extractor.device, non_blocking=True)
        batch = batch.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        features = self.extractor.extract(batch)[:count].to(torch.float16)
        if self._on_cuda:
            out = torch.empty(features.shape, dtype=torch.float16, pin_memory=True)
            out.copy_(features, non_blocking=True)
            torch.cuda.current_stream(self.extractor.device).synchronize()
            return out.numpy()
        return features.cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        images: dict[int, np.ndarray] = {}
        failures: dict[int, str] = {}
        for index, row in enumerate(rows):
            if row["status"] != schema.STATUS_OK:
                continue
            try:
                shape = (row["pixel_height"], row["pixel_width"], 3)
                images[index] = np.frombuffer(row["pixels"], np.uint8).reshape(shape)
            except Exception as error:  # noqa: BLE001
                failures[index] = f"feature extraction failed: bad decoded pixels: {error}"
        sizes = [images[i].shape[:2] if i in images else None for i in range(len(rows))]
        features: dict[int, np.ndarray] = {}
        for chunk in model_calls(sizes, self._batch_for):
            try:
                features.update(zip(chunk, self._extract([images[i] for i in chunk])))
            except Exception as error:  # noqa: BLE001 - retry alone, then record per row
                if len(chunk) == 1 and self._batch_for(sizes[chunk[0]]) == 1:
                    failures[chunk[0]] = f"feature extraction failed: {type(error).__name__}: {error}"
                    continue
                for i in chunk:
                    try:
                        features[i] = self._extract([images[i]], pad=False)[0]
                    except Exception as single:  # noqa: BLE001
                        failures[i] = f"feature extraction failed: {type(single).__name__}: {single}"
        out = []
        for index, row in enumerate(rows):
            result = {name: row.get(name) for name in FEATURES_SCHEMA.names}
            if index in failures:
                result.update(_error_fields(failures[index]))
            elif index in features:
                grid = features[index]
                result.update(features=grid.tobytes(), feature_height=grid.shape[0], feature_width=grid.shape[1],
                              feature_dim=grid.shape[2])
            out.append(result)
        return pa.Table.from_pylist(out, schema=FEATURES_SCHEMA)


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
