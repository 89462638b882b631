"""The labeling job on Ray Data: images in, Parquet label shards out (DESIGN.md §1).

Stages (one Ray Data operator each, streaming):

1. **read + decode** (CPU tasks): a read unit is one image file or the pending
   rows of one Parquet row group (:mod:`diffcut.io`); bytes are decoded,
   EXIF-rotated, converted to RGB and resized to the model's input size
   (``bucket`` or ``square``). A record that cannot be read or decoded
   becomes an error row here and passes every later stage untouched.
2. **features** (actor pool, one GPU per actor on GPU nodes, CPU actors with
   ``device="cpu"``): each actor loads :class:`~diffcut.features.FeatureExtractor`
   once; a batch is split by input size (bucket) and run in chunks of
   ``batch_size``. Features leave the stage as float16.
3. **segment** (CPU actor pool): recursive normalized cut with its split tree,
   concept assignment at the mask size, optional PAMR, descriptors, and the
   output row (:func:`diffcut.segmenter.segment_features`, :mod:`diffcut.schema`).
4. **write**: ``write_parquet`` shards named ``labels-<run id>-...`` directly
   under the output.

Every input record gives exactly one row. Re-runs resume: the sources of the
rows in complete shards are skipped, shards a killed run left half-written are
deleted first, and readers keep one row per source
(:func:`diffcut.schema.read_labels`). ``overwrite=True`` deletes the job's
shards and summary and starts over.

This is the only module of the package that imports Ray.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import uuid
from collections import defaultdict
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray
from ray.data.datasource import FilenameProvider

from diffcut import __version__
from diffcut import io as dio
from diffcut import schema

log = logging.getLogger(__name__)

DEFAULT_MODEL = "segmind/SSD-1B"
#: The published open-vocabulary extension's CLIP (diffcut.naming.DEFAULT_NAMING_MODEL; not imported: no CLIP
#: code is loaded without --vocabulary).
DEFAULT_NAMING_MODEL = "convnext_large_d_320:laion2b_s29b_b131k_ft_soup"

#: Memory reserved per read/decode task (bytes).
DECODE_TASK_MEMORY = 512 * 2**20

#: Parameters that change the labels; a resumed run must match the output's.
RESUME_KEYS = ("model", "tau", "alpha", "timestep", "noise_seed", "resolution", "resize", "mask_size", "refine",
               "exact_search", "dtype")

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
    row.update(image_id=record.image_id, source=record.source, status=schema.STATUS_OK)
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
                 max_image_pixels: int, keep_image_bytes: bool, chunk_rows: int) -> Iterator[pa.Table]:
    """Ray Data UDF of stage 1: read units -> decoded rows, ``chunk_rows`` at a time.

    The records of a batch (its image files, or a Parquet row group) are put
    in order of model input size before decoding, from their headers alone.
    Every model call holds ``batch_size`` images of one size, padded with
    blank ones when fewer are at hand (:class:`FeatureStage`); rows that
    arrive grouped by size fill those calls, where rows in file order would
    scatter over the buckets and leave most calls part blank
    (``benchmarks/padding.py``). A generator, so a Parquet row group of many
    images never exists decoded all at once (the encoded bytes of the batch
    are in memory anyway: they are fetched together).
    """
    spec = dio.MaskSize.parse(mask_size)
    records = list(dio.read_units(units.to_pylist(), image_column=image_column))
    if resize == "bucket":  # list.sort is stable: equal sizes keep their input order
        records.sort(key=lambda record: input_size_key(record, resolution=resolution, resize=resize, stride=stride,
                                                       max_image_pixels=max_image_pixels))
    rows: list[dict] = []
    for record in records:
        rows.append(decode_record(record, resolution=resolution, resize=resize, stride=stride, mask_size=spec,
                                  max_image_pixels=max_image_pixels, keep_image_bytes=keep_image_bytes))
        if len(rows) >= chunk_rows:
            yield pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def model_calls(sizes: list[tuple[int, int] | None], batch_size: int) -> list[list[int]]:
    """How :class:`FeatureStage` runs one batch: the indices of each model call.

    ``sizes`` are the rows' model input sizes (None: an error row, not run).
    Rows of one size run together in input order, ``batch_size`` per call;
    each call is padded to ``batch_size`` images, so ``len(calls) *
    batch_size`` images go through the model for ``sum(map(len, calls))``
    real ones.
    """
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, size in enumerate(sizes):
        if size is not None:
            groups[tuple(size)].append(index)
    return [indices[start:start + batch_size] for indices in groups.values()
            for start in range(0, len(indices), batch_size)]


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

    def __init__(self, model: str, device: str, dtype: str, timestep: int, batch_size: int):
        import torch

        from diffcut.features import FeatureExtractor

        self.torch = torch
        self.extractor = FeatureExtractor.from_pretrained(model, device=device, dtype=dtype, timestep=timestep)
        self.batch_size = max(1, int(batch_size))

    def _extract(self, pixels: list[np.ndarray], pad: bool = True) -> np.ndarray:
        """float16 features of same-size images; ``pad``: run them in a call of exactly ``batch_size``."""
        torch = self.torch
        count = len(pixels)
        if pad and count < self.batch_size:
            pixels = pixels + [np.zeros_like(pixels[0])] * (self.batch_size - count)
        batch = torch.from_numpy(np.stack(pixels)).to(self.extractor.device)
        batch = batch.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        features = self.extractor.extract(batch)[:count]
        return features.to(torch.float16).cpu().numpy()

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
        for chunk in model_calls(sizes, self.batch_size):
            try:
                features.update(zip(chunk, self._extract([images[i] for i in chunk])))
            except Exception as error:  # noqa: BLE001 - retry alone, then record per row
                if self.batch_size == 1:
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
                 max_image_pixels: int, carry_image: bool = False):
        self.tau, self.alpha, self.refine, self.exact_search = tau, alpha, refine, exact_search
        self.params = params
        self.max_image_pixels = max_image_pixels
        # The naming stage needs the image: hand its encoded bytes on in one extra column.
        self.carry_image = carry_image

    def label(self, row: dict) -> dict:
        """The output row of one image; never raises."""
        from diffcut.segmenter import segment_features

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
        table = schema.rows_to_table([self.label(row) for row in rows])
        if self.carry_image:
            table = table.append_column("image_bytes", pa.array([row.get("image_bytes") for row in rows], pa.binary()))
        return table


class NamingStage:
    """Ray Data UDF of the optional naming stage (actor): a class from the vocabulary for every segment.

    Loads the CLIP and computes the vocabulary's text embeddings once per actor
    (:class:`diffcut.naming.SegmentNamer`); a row whose naming fails becomes an
    error row.
    """

    def __init__(self, naming_model: str, vocabulary: str, device: str, params: str, max_image_pixels: int):
        from diffcut.naming import SegmentNamer

        self.namer = SegmentNamer(naming_model, vocabulary, device=device)
        self.class_names = self.namer.vocabulary.class_names
        self.params = params
        self.max_image_pixels = max_image_pixels

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
            return schema.error_row(row["image_id"], row["source"],
                                    dio.redact(f"naming failed: {type(error).__name__}: {error}"),
                                    params=self.params, width=row["width"], height=row["height"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        return schema.rows_to_table([self.name(row) for row in batch.to_pylist()], named=True)


class ShardNames(FilenameProvider):
    """``labels-<run id>-<write uuid>-<task>.parquet``: unique per run, recognisable by readers."""

    def __init__(self, run_id: str):
        super().__init__(file_format="parquet")
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{schema.SHARD_PREFIX}{self.run_id}-{write_uuid}-{task_index:06d}.parquet"


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


def _existing_output(output: str, params: dict) -> tuple[set[str], int]:
    """(sources already done, incomplete shards removed); refuses a mismatching output."""
    complete, incomplete = schema.list_shards(output)
    if incomplete:
        remove_job_files(output, [uri.rsplit("/", 1)[-1] for uri in incomplete])
        log.warning("removed %d incomplete shard(s) left by an interrupted run", len(incomplete))
    if not complete:
        return set(), len(incomplete)
    done = schema.read_labels(output, columns=["source", "params"])
    stored = next((p for p in done.column("params").to_pylist() if p), None)
    if stored is not None:
        previous = json.loads(stored)
        changed = {k: (previous.get(k), params.get(k)) for k in RESUME_KEYS if previous.get(k) != params.get(k)}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise dio.InputError(
                f"{output} holds labels made with other parameters ({details}); "
                "pass --overwrite to replace them or choose another --output"
            )
    return set(done.column("source").to_pylist()), len(incomplete)


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
    batch_size: int = 4,
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
        diffcut.io.InputError: bad flags, missing inputs, or an output made
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
    if batch_size < 1 or decode_batch_size < 1 or shard_rows < 1:
        raise dio.InputError("--batch-size, --decode-batch-size and --shard-rows must be at least 1")
    input = dio.check_uri(input)
    output = dio.check_uri(output)
    if vocabulary is not None:
        from diffcut.naming import load_vocabulary

        try:
            load_vocabulary(vocabulary)
        except (ValueError, OSError) as error:
            raise dio.InputError(str(error)) from None

    params = {
        "model": model, "tau": float(tau), "alpha": float(alpha), "timestep": int(timestep), "noise_seed": 42,
        "resolution": int(resolution), "resize": resize, "mask_size": str(mask_spec), "refine": bool(refine),
        "exact_search": bool(exact_search), "dtype": str(dtype), "stride": stride, "diffcut_version": __version__,
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
        done, incomplete = _existing_output(output, params)

    listing = dio.list_inputs(input, format, exclude=output)
    if listing.format == "parquet":
        plan = dio.plan_parquet(listing.files, image_column=image_column, id_column=id_column, done=done, limit=limit)
    else:
        plan = dio.plan_image_files(listing.files, done=done, limit=limit)
    plan.skipped_files = listing.skipped
    log.info("%d input records, %d already done, %d to label", plan.listed, plan.already_done, plan.planned)

    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    pipeline_seconds = 0.0
    started_ray = False
    if plan.planned:
        min_cpus = decode_cpus + extractor_pool_min * extractor_cpus + ncut_pool_min * ncut_cpus
        if vocabulary is not None:
            min_cpus += extractor_pool_min * extractor_cpus  # the naming pool
        started_ray = connect_ray(address, min_cpus)
        try:
            pipeline_started = time.time()
            _run_pipeline(
                plan, output, run_id=run_id, image_column=image_column, model=model, device=device, dtype=dtype,
                timestep=timestep, tau=tau, alpha=alpha, resolution=resolution, resize=resize, stride=stride,
                mask_size=str(mask_spec), refine=refine, exact_search=exact_search, batch_size=batch_size,
                decode_batch_size=decode_batch_size, decode_cpus=decode_cpus,
                extractor_pool=(extractor_pool_min, extractor_pool_max), extractor_gpus=extractor_gpus,
                extractor_cpus=extractor_cpus, ncut_pool=(ncut_pool_min, ncut_pool_max), ncut_cpus=ncut_cpus,
                shard_rows=shard_rows, max_image_pixels=max_image_pixels, params_text=params_text,
                vocabulary=vocabulary, naming_model=naming_model,
            )
            pipeline_seconds = time.time() - pipeline_started
        except ray.exceptions.ActorDiedError as error:
            # A model that cannot be loaded fails every feature actor the same way: one clear
            # job-level error (exit status 2), not a Ray traceback or an error row per image.
            reason = _model_load_failure(error)
            if reason is None:
                raise
            raise dio.InputError(f"the feature actors could not load --model {model!r}: {reason}") from None
        finally:
            if started_ray:
                ray.shutdown()

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
        "inputs_listed": plan.listed,
        "skipped_non_input_files": plan.skipped_files,
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
        "common_errors": [{"error": message, "count": count} for message, count in common_errors],
        "params": params,
    }
    if run_ok + run_error != plan.planned:
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
                  mask_size: str, refine: bool, exact_search: bool, batch_size: int, decode_batch_size: int,
                  decode_cpus: float, extractor_pool: tuple[int, int], extractor_gpus: float | None, extractor_cpus: float,
                  ncut_pool: tuple[int, int], ncut_cpus: float, shard_rows: int, max_image_pixels: int,
                  params_text: str, vocabulary: str | None = None,
                  naming_model: str = DEFAULT_NAMING_MODEL) -> None:
    """Build the Ray Data pipeline for ``plan`` and run it to the end of the write."""
    from ray.data import ActorPoolStrategy

    units = plan.units
    parquet_units = units.num_rows and units.column("kind")[0].as_py() == "parquet"
    # A Parquet unit is a whole row group; an image-file unit is one file.
    units_per_batch = 1 if parquet_units else decode_batch_size
    # Bucketed inputs vary in size: hand each feature actor a few model calls'
    # worth of rows at a time, so rows of one size can share a call; decoded
    # blocks of the same length arrive grouped by size (decode_stage).
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
                       mask_size=mask_size, max_image_pixels=max_image_pixels, keep_image_bytes=refine or vocabulary is not None,
                       chunk_rows=feature_batch),
    )
    actor_device, on_gpu = _actor_device(device)
    dataset = dataset.map_batches(
        FeatureStage,
        fn_constructor_kwargs=dict(model=model, device=actor_device, dtype=dtype, timestep=timestep,
                                   batch_size=batch_size),
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
                                   carry_image=vocabulary is not None),
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
                                       params=params_text, max_image_pixels=max_image_pixels),
            compute=ActorPoolStrategy(min_size=extractor_pool[0], max_size=extractor_pool[1]),
            batch_size=batch_size,
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
        schema=schema.labels_schema(vocabulary is not None),
    )
