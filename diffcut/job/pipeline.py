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

This is the only module of the package that imports Ray.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import threading
import time
import uuid
from collections import defaultdict
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray
from ray.data.datasource import FilenameProvider

from diffcut import __version__
from diffcut.job import io as dio
from diffcut.job import schema
from diffcut.job import webdataset

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

#: Parameters that change the labels; a resumed run must match the output's.
RESUME_KEYS = ("model", "tau", "alpha", "timestep", "noise_seed", "resolution", "resize", "mask_size", "refine",
               "exact_search", "dtype", "vae_dtype")
#: Value of a resume key in outputs written before the key was recorded.
RESUME_KEY_DEFAULTS = {"vae_dtype": "auto"}
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
            names = self.namer.name(pixels, mask, row["num_segments"])
            for segment, class_id, score in zip(row["segments"], names.class_id, names.class_score):
                segment.update(class_id=int(class_id), class_score=float(score),
                               class_name=self.class_names[class_id] if class_id >= 0 else None)
            row["semantic_mask"] = schema.encode_mask(names.semantic_mask)
            return row
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


# =========================================================================== preemption
class JobInterrupted(BaseException):
    """Raised in the driver's main thread by the first SIGTERM/SIGINT of a run.

    A BaseException (like KeyboardInterrupt), so that no ``except Exception``
    on the way up -- in Ray Data's executor or here -- mistakes it for a
    failure of one image or one task.
    """


class StopSignals:
    """SIGTERM and SIGINT end a run cleanly instead of killing the driver mid-write.

    Kubernetes (and Slurm, and spot-instance preemption) sends SIGTERM to the
    driver, waits a grace period, then SIGKILLs everything. The first signal
    raises :class:`JobInterrupted` in the main thread while the job plans or
    runs: Ray Data's executor stops, Ray shuts down (in-flight tasks die;
    their half-written shards have no Parquet footer, are skipped by
    :func:`diffcut.job.schema.read_labels` and deleted by the next run), and the
    job writes a ``_summary.json`` that says it was interrupted. Shards
    already written are complete files and stay valid. Later signals are
    only recorded: the cleanup continues until the orchestrator's SIGKILL.

    Only the main thread can receive signals; from any other thread (tests
    that run the job in a thread) this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self.armed = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        if first and self.armed:
            self.armed = False
            raise JobInterrupted(self.received)

    def install(self) -> None:
        """(Re)install the handlers; ``ray.init`` replaces the SIGTERM handler with its own."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)
        self.armed = self.received is None

    def restore(self) -> None:
        self.armed = False
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


# =========================================================================== Ray session
def connect_ray(address: str | None, min_cpus: float) -> bool:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start an embedded one.

    The embedded instance listens on 127.0.0.1 only and has the machine's
    CPU count, raised to ``min_cpus`` (the smallest pools' reservation) so the
    default pools always fit: Ray's CPUs are scheduling slots, not cores.
    Returns whether this call started/joined Ray (and should shut it down).
    An already initialized Ray in this process is used as it is.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return True
    machine = os.cpu_count() or 1
    num_cpus = max(machine, math.ceil(min_cpus))
    if num_cpus > machine:
        log.warning("embedded Ray: %d CPU slots for %d cores, the minimum the pools reserve", num_cpus, machine)
    _use_loopback_node_address()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    return True


def _use_loopback_node_address() -> None:
    """Make the Ray started next in this process a loopback-only node.

    On Linux, Ray replaces ``_node_ip_address="127.0.0.1"`` by the machine's
    network address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; with a
    network address its servers (GCS, raylet, workers, agents) listen on every
    interface. Ray reads that variable once, when it is imported, which
    happens before any flag is parsed here; so the setting is applied to the
    imported constant as well. Only the embedded start calls this: a driver
    joining a cluster must keep the node's real address.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the processes Ray starts read it at their import
    ray_constants.ENABLE_RAY_CLUSTER = False


def _actor_device(device: str) -> tuple[str, bool]:
    """(device string for the actors, whether they need GPUs)."""
    if device == "auto":
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        return ("cuda" if has_gpu else "cpu"), has_gpu
    return device, device.startswith("cuda")


# =========================================================================== output
def remove_job_files(output: str, names: list[str] | None = None) -> int:
    """Delete the job's shards (or the given ones) and summary under ``output``; other files stay."""
    fs, root = dio.open_filesystem(output)
    fs.invalidate_cache()
    if not fs.exists(root):
        return 0
    if names is None:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        names = [n for n in names if schema.is_shard_name(n) or n == schema.SUMMARY_NAME]
    for name in names:
        fs.rm(root.rstrip("/") + "/" + name)
    return len(names)


def existing_output(output: str, params: dict) -> tuple[set[str], int]:
    """(sources already done, incomplete shards removed); refuses a mismatching output."""
    complete, incomplete = schema.list_shards(output)
    if incomplete:
        remove_job_files(output, [uri.rsplit("/", 1)[-1] for uri in incomplete])
        log.warning("removed %d incomplete shard(s) left by an interrupted run", len(incomplete))
    if not complete:
        return set(), len(incomplete)
    # One shard's parameters stand for the output's (every run checks them before writing), and
    # only the source column of the others is read: at a million rows the params strings alone
    # would be ~300 MB in the driver (benchmarks/resume_plan.py).
    stored = next((p for p in schema.read_shard(complete[0], ["params"]).column("params").to_pylist() if p), None)
    if stored is not None:
        previous = json.loads(stored)
        changed = {k: (previous.get(k, RESUME_KEY_DEFAULTS.get(k)), params.get(k)) for k in RESUME_KEYS
                   if previous.get(k, RESUME_KEY_DEFAULTS.get(k)) != params.get(k)}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise dio.InputError(
                f"{output} holds labels made with other parameters ({details}); "
                "pass --overwrite to replace them or choose another --output"
            )
    return schema.shard_sources(complete, threads=16 if dio.is_remote(output) else 2), len(incomplete)


def _write_summary(output: str, summary: dict) -> None:
    fs, root = dio.open_filesystem(output)
    fs.makedirs(root, exist_ok=True)
    fs.pipe(root.rstrip("/") + "/" + schema.SUMMARY_NAME, (json.dumps(summary, indent=2) + "\n").encode())


def _count(table: pa.Table) -> tuple[int, int]:
    status = table.column("status").to_pylist()
    ok = sum(s == schema.STATUS_OK for s in status)
    return ok, len(status) - ok


def _run_rows(output: str, run_id: str) -> pa.Table:
    tables = []
    for uri in schema.list_shards(output)[0]:
        if uri.rsplit("/", 1)[-1].startswith(f"{schema.SHARD_PREFIX}{run_id}-"):
            tables.append(schema.read_shard(uri, ["status", "error"]))
    if not tables:
        return pa.table({"status": pa.array([], pa.string()), "error": pa.array([], pa.string())})
    return pa.concat_tables(tables)


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
                            ("ncut-pool", ncut_pool_min, ncut_pool_max)):
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
            min_cpus += extractor_pool_min * extractor_cpus  # the naming pool
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
    totals = schema.read_labels(output, columns=["source", "status"])
    total_ok, total_error = _count(totals)
    error_rate = total_error / max(1, total_ok + total_error)
    error_counts: dict[str, int] = defaultdict(int)
    for status, message in zip(run_table.column("status").to_pylist(), run_table.column("error").to_pylist()):
        if status == schema.STATUS_ERROR:
            error_counts[message] += 1
    common_errors = sorted(error_counts.items(), key=lambda item: (-item[1], item[0]))[:10]
    summary = {
        "run_id": run_id,
        "input": input,
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
    if stop.received:
        planned = "" if plan.planned is None else f" of {plan.planned} planned"
        summary["warning"] = (f"interrupted by {stop.received} after {run_ok + run_error}{planned} "
                              "records; run the same command again to resume")
    elif plan.planned is not None and run_ok + run_error != plan.planned:
        summary["warning"] = f"planned {plan.planned} records but this run wrote {run_ok + run_error} rows"
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
                  vocabulary: str | None = None, naming_model: str = DEFAULT_NAMING_MODEL) -> None:
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
        # Its own pool, sized like the feature pool: on the GPU nodes when the model runs on CUDA.
        dataset = dataset.map_batches(
            NamingStage,
            fn_constructor_kwargs=dict(naming_model=naming_model, vocabulary=vocabulary, device=actor_device,
                                       params=params_text, max_image_pixels=max_image_pixels,
                                       keep_metadata=keep_metadata),
            compute=ActorPoolStrategy(min_size=extractor_pool[0], max_size=extractor_pool[1]),
            batch_size=1,  # rows are named one by one; batch_size may be "auto" (the feature actors')
            batch_format="pyarrow",
            num_cpus=extractor_cpus,
            num_gpus=1.0 if on_gpu else 0,
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
