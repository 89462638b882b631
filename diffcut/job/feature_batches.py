"""The feature stage's batch work, without Ray: decoded rows in, float16 feature rows out.

:class:`FeatureBatches` is what the labeling job's feature actor
(:class:`diffcut.job.stages.FeatureStage`) does with each Arrow batch: group
the rows by input size, run them in padded calls of ``batch_size`` images
(uint8 from pinned host memory, non-blocking copies on CUDA), retry a failed
call one image at a time, and turn what still fails into error rows. It
lives apart from the Ray stages so that code without Ray runs the very same
work: ``benchmarks/gpu_stage.py --job-stage`` on the lent GPU machine, which
has no Ray (tests/test_feature_batches.py imports this module with Ray made
unimportable).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa

from diffcut.job import schema
from diffcut.job.storage import redact

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
    pa.field("unit", pa.string()),  # the output unit of the row (diffcut.job.units)
    pa.field("unit_rows", pa.int64()),  # its record count on the rows of a shard's last chunk, else -1
]
DECODED_SCHEMA = pa.schema(
    _CARRIED
    + [pa.field("pixels", pa.binary()), pa.field("pixel_width", pa.int32()), pa.field("pixel_height", pa.int32())]
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


def error_fields(message: str) -> dict:
    """The columns that make a row an error row, the message redacted."""
    return {"status": schema.STATUS_ERROR, "error": redact(message)}


def model_calls(sizes: list[tuple[int, int] | None], batch_size) -> list[list[int]]:
    """How :class:`FeatureBatches` runs one batch: the indices of each model call.

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
        calls += [indices[start : start + step] for start in range(0, len(indices), step)]
    return calls


class FeatureBatches:
    """Diffusion features of every ok row of a :data:`DECODED_SCHEMA` batch, on one extractor.

    Rows of a batch are grouped by input size (the bucket) and run in chunks
    of ``batch_size`` (an int, or ``"auto"``: the largest that fits the
    device, per size); if a chunk fails (e.g. out of memory) its rows are
    retried one by one, and a row that still fails becomes an error row.

    Every model call holds exactly ``batch_size`` images: a short chunk (the
    last of a bucket) is padded with blank images. The model's kernels are
    chosen by batch shape and round differently for different batch sizes, so
    without this an image's features -- and, at near-ties, its labels -- would
    depend on which images happened to share its Ray Data batch, i.e. on pool
    sizes and scheduling. With it, the output is a function of the inputs,
    the parameters and ``batch_size`` (docs/output-format.md, "Determinism").
    Only the one-by-one retry after a failed chunk runs unpadded.
    """

    def __init__(self, extractor, batch_size: int | str):
        import torch

        self.torch = torch
        self.extractor = extractor
        self.auto_batch = batch_size == "auto"
        self.batch_size = 1 if self.auto_batch else max(1, int(batch_size))
        self._on_cuda = extractor.device.type == "cuda"
        self._warm: set[tuple[int, int]] = set()

    def batch_for(self, size: tuple[int, int]) -> int:
        """Images per call for this input size; with auto, found (and warmed up) once per size."""
        size = (int(size[0]), int(size[1]))
        batch = self.extractor.auto_batch_size(*size) if self.auto_batch else self.batch_size
        if size not in self._warm and self.extractor.compiled:
            # Compile (or re-specialize) on blank images, not on the first real batch.
            self.extractor.warm_up([size], batch)
        self._warm.add(size)
        return batch

    def extract(self, pixels: list[np.ndarray], pad: bool = True) -> np.ndarray:
        """float16 features of same-size images; ``pad``: run them in a call of exactly the size's batch."""
        torch = self.torch
        count = len(pixels)
        target = self.batch_for(pixels[0].shape[:2]) if pad else count
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
        """A :data:`FEATURES_SCHEMA` table, one row per input row in order; error rows pass through."""
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
        for chunk in model_calls(sizes, self.batch_for):
            try:
                features.update(zip(chunk, self.extract([images[i] for i in chunk])))
            except Exception as error:  # noqa: BLE001 - retry alone, then record per row
                if len(chunk) == 1 and self.batch_for(sizes[chunk[0]]) == 1:
                    failures[chunk[0]] = f"feature extraction failed: {type(error).__name__}: {error}"
                    continue
                for i in chunk:
                    try:
                        features[i] = self.extract([images[i]], pad=False)[0]
                    except Exception as single:  # noqa: BLE001
                        failures[i] = f"feature extraction failed: {type(single).__name__}: {single}"
        out = []
        for index, row in enumerate(rows):
            result = {name: row.get(name) for name in FEATURES_SCHEMA.names}
            if index in failures:
                result.update(error_fields(failures[index]))
            elif index in features:
                grid = features[index]
                result.update(
                    features=grid.tobytes(),
                    feature_height=grid.shape[0],
                    feature_width=grid.shape[1],
                    feature_dim=grid.shape[2],
                )
            out.append(result)
        return pa.Table.from_pylist(out, schema=FEATURES_SCHEMA)
