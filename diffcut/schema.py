"""The readers' entry point to the labeling job's output (README, docs/output-format.md).

The format is defined in :mod:`diffcut.job.schema`; this module names what a reader of
labels uses, under a short path: ``from diffcut.schema import read_labels``.
"""

from diffcut.job.schema import (
    LABELS_SCHEMA,
    NAMED_LABELS_SCHEMA,
    SCHEMA_VERSION,
    STATUS_ERROR,
    STATUS_OK,
    decode_mask,
    decode_tree,
    iter_shard_batches,
    read_labels,
    read_shard,
)
from diffcut.job.units import label_files

__all__ = [
    "LABELS_SCHEMA",
    "NAMED_LABELS_SCHEMA",
    "SCHEMA_VERSION",
    "STATUS_ERROR",
    "STATUS_OK",
    "decode_mask",
    "decode_tree",
    "iter_shard_batches",
    "label_files",
    "read_labels",
    "read_shard",
]
