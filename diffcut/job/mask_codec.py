"""The label-map codec of the output format: (H, W) integer arrays to PNG bytes and back.

Part of the format defined in :mod:`diffcut.job.schema` (which re-exports these
names): ``mask`` and ``latent_labels`` are PNGs written by :func:`encode_mask`;
:func:`decode_tree` rebuilds a row's split tree from its ``tree`` and
``latent_labels`` columns. Arrays in, bytes out (no Ray, no filesystem).
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np

#: The largest label a 16-bit PNG can hold.
MAX_LABEL = 2**16 - 1


# Rows per zlib call of encode_mask (bounds the filtered copy it makes).
_PNG_STRIP_ROWS = 256


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_mask(labels: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) integer label map.

    8-bit grayscale when every label is < 256 (at most 256 labels), 16-bit
    grayscale otherwise. Lossless: :func:`decode_mask` returns the same array.

    Written directly (PNG 1.2 spec: IHDR, IDAT, IEND) with the "Up" filter on
    every row and zlib's run-length strategy: rows of a label map mostly repeat
    the row above, so the filtered bytes are long runs of zeros. On 1024x1024
    masks of 16 segments that is 4.8x faster than Pillow's default (level 6,
    adaptive filters) and about 20 % smaller (benchmarks/RESULTS.md).
    """
    import zlib

    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] < 1 or labels.shape[1] < 1:
        raise ValueError(f"a label map must be a non-empty (H, W) array; got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"a label map must hold integers; got {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > MAX_LABEL:
        raise ValueError(f"labels must be in 0..{MAX_LABEL} to fit a PNG; got {low}..{high}")
    height, width = labels.shape
    depth = 8 if high < 256 else 16
    # memLevel 6: the run-length strategy uses no hash chains, and smaller
    # buffers are set up faster (1024x1024 masks: 2.2 ms against 3.4 ms at 9,
    # 1 % smaller).
    compressor = zlib.compressobj(6, zlib.DEFLATED, 15, 6, zlib.Z_RLE)
    stream = []
    previous = np.zeros((1, width * depth // 8), dtype=np.uint8)
    for start in range(0, height, _PNG_STRIP_ROWS):
        rows = labels[start : start + _PNG_STRIP_ROWS].astype(">u1" if depth == 8 else ">u2")
        rows = rows.view(np.uint8).reshape(rows.shape[0], -1)
        filtered = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
        filtered[:, 0] = 2  # filter type Up: each byte minus the byte above (mod 256)
        np.subtract(rows[:1], previous, out=filtered[:1, 1:])
        np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
        previous = rows[-1:]
        stream.append(compressor.compress(filtered.tobytes()))
    stream.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)  # grayscale, no interlace
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", b"".join(stream)),
            _png_chunk(b"IEND", b""),
        )
    )


def decode_mask(png: bytes) -> np.ndarray:
    """(H, W) int32 label map from :func:`encode_mask`'s PNG bytes."""
    from PIL import Image

    if not png:
        raise ValueError("no mask bytes (the row is probably an error row)")
    with Image.open(io.BytesIO(png)) as image:
        if image.format != "PNG" or image.mode not in ("L", "I;16", "I;16B", "I;16L", "I"):
            raise ValueError(f"not a diffcut label map: {image.format} image in mode {image.mode}")
        return np.asarray(image).astype(np.int32)


def decode_tree(tree_json: str, latent_labels: bytes | np.ndarray):
    """The :class:`diffcut.method.ncut.SplitTree` of a row, from its ``tree`` and ``latent_labels`` columns.

    The stored tree leaves out the label map (it is the ``latent_labels``
    column), so both are needed. ``tree.prune(tau')`` then gives the
    segmentation for any ``tau' <= tau`` without the model.
    """
    from diffcut.method.ncut import SplitTree

    labels = decode_mask(latent_labels) if isinstance(latent_labels, (bytes, bytearray)) else latent_labels
    return SplitTree.from_dict(json.loads(tree_json), labels=labels)
