"""Re-threshold stored labels at a smaller tau, from the split tree, without the model.

DiffCut (Couairon et al., NeurIPS 2024, arXiv:2406.02842, Sec. 3.2) splits a
region while the NCut of its best cut is below ``tau``. The best cut of a
region does not depend on ``tau``, so the recursion run at any ``tau' <= tau``
visits a prefix of the tree built at ``tau``: its segments are that tree pruned
at the first node on every root-to-leaf path whose NCut is ``>= tau'``
(docs/method.md §2.3). The labeling job stores the tree beside the latent labels,
so every output row can be re-cut exactly, on a CPU, in milliseconds.

For one row (:func:`rethreshold_row`):

* ``latent_labels``: ``SplitTree.prune(tau')``, equal to a fresh run at ``tau'``;
* the ``mask`` (the high-resolution assignment, docs/method.md §2.4): every old
  segment id replaced by the id of the merged segment that contains it, i.e.
  the union of the merged segments' pixels. This is *not* a fresh assignment
  (which would take the argmax against the merged descriptors and can move
  pixels near boundaries); it needs no features and never moves a pixel
  across the boundary between two segments that stay apart;
* ``segments``: area and box recomputed from the new mask; the descriptor of a
  merged segment is the mean of the normalized features over its latent cells,
  which is the cell-count-weighted mean of its parts' descriptors (exact, up to
  float32 rounding); cell counts come from ``latent_labels``;
* ``tree``: the pruned tree (a valid tree at ``tau'``: it can be re-thresholded
  again), ``num_segments``, and ``params`` (``tau`` set to ``tau'``,
  ``rethresholded_from`` the tau the labels were first computed with).

Error rows pass through unchanged. :func:`rethreshold_labels` streams a whole
output shard by shard, batch by batch: one input shard gives one output shard
of the same name and schema.

Named outputs (``--vocabulary``): merged segments need new names, and the old
ones cannot be combined into them (a class is not a mean of classes), so every
re-thresholded ok row is named again (:class:`Renamer`): the image is read
again from the row's ``source`` (local path, ``s3://`` URI or
``file.parquet#row=N``; :class:`diffcut.tools.gallery.SourceReader`), decoded at the
mask size as the job's naming stage does, and named with the vocabulary and
CLIP recorded in the row's ``params`` (or the ones passed instead, which then
go into ``params``). A row whose image cannot be read or named becomes an
error row saying why: one row per input, always. Passing a vocabulary for an
output made without one names it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffcut.job import schema
from diffcut.method.ncut import SplitTree

__all__ = [
    "prune_tree",
    "merge_map",
    "merge_descriptors",
    "rethreshold_row",
    "rethreshold_labels",
    "RethresholdSummary",
]

#: Rows read, converted and written at a time (bounds memory for large masks).
DEFAULT_BATCH_ROWS = 64


def prune_tree(tree: SplitTree, tau_prime: float) -> SplitTree:
    """The split tree of the recursion run at ``tau' <= tree.tau`` (any ``tau'`` ``tree.prune`` accepts).

    Keeps the nodes whose every ancestor is split at ``tau'`` (split at
    ``tree.tau`` with NCut < ``tau'``), in their original order, so parents
    still precede children. A node that was internal and is no longer split
    becomes a leaf whose ``ncut`` is its best cut's NCut (now ``>= tau'``, a
    rejected cut, as the leaves of a fresh run record). Its labels are
    ``tree.prune(tau')``.
    """
    labels = tree.prune(tau_prime)
    leaf = tree.is_leaf()
    split = ~leaf & (tree.ncut < float(tau_prime))
    kept = np.zeros(tree.num_nodes, dtype=bool)
    kept[0] = True
    # A parent precedes its children: one pass in index order decides every node.
    for node, parent in enumerate(tree.parent[1:].tolist(), start=1):
        kept[node] = kept[parent] and split[parent]
    new_index = np.full(tree.num_nodes, -1, dtype=np.int64)
    new_index[kept] = np.arange(int(kept.sum()))
    parent = np.where(tree.parent[kept] >= 0, new_index[np.maximum(tree.parent[kept], 0)], -1)
    # The new segment of each old label is the kept, unsplit ancestor of its leaf.
    segment_node = np.arange(tree.num_nodes)
    for node, parent_node in enumerate(tree.parent[1:].tolist(), start=1):
        if not kept[node]:
            segment_node[node] = segment_node[parent_node]
    old_to_new = merge_map(tree.labels, labels)
    leaf_of_label = np.empty(int(labels.max()) + 1, dtype=np.int64)
    leaf_of_label[old_to_new] = new_index[segment_node[tree.leaf_of_label]]
    return SplitTree(
        parent=parent,
        ncut=tree.ncut[kept],
        leaf_of_label=leaf_of_label,
        labels=labels,
        tau=float(tau_prime),
        alpha=tree.alpha,
        exact_search=tree.exact_search,
    )


def merge_map(old_labels: np.ndarray, new_labels: np.ndarray) -> np.ndarray:
    """(K_old,) int32 array: the new segment id of every old segment id.

    ``new_labels`` must be a coarsening of ``old_labels`` (every old segment
    lies inside one new segment), as a pruned tree's labels are; anything else
    raises. Old ids with no cell map to 0 (they cannot occur: every latent
    label has cells).
    """
    old = np.asarray(old_labels).reshape(-1)
    new = np.asarray(new_labels).reshape(-1)
    if old.shape != new.shape:
        raise ValueError(f"label maps differ in size: {old.shape} and {new.shape}")
    mapping = np.zeros(int(old.max()) + 1, dtype=np.int32)
    mapping[old] = new
    if not np.array_equal(mapping[old], new):
        raise ValueError("the new labels split an old segment: not a coarsening")
    return mapping


def merge_descriptors(descriptors: np.ndarray, cell_counts: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Descriptors of merged segments from their parts' descriptors.

    A descriptor is the mean of the L2-normalized features over the segment's
    latent cells (docs/method.md §2.4), so the merged one is the cell-count-weighted
    mean of the parts' descriptors. Accumulated in float64.

    Args:
        descriptors: (K_old, c) descriptors of the old segments.
        cell_counts: (K_old,) latent cells per old segment.
        mapping: (K_old,) new id of each old segment (:func:`merge_map`).

    Returns:
        (K_new, c) float32, K_new = mapping.max() + 1.
    """
    descriptors = np.asarray(descriptors, dtype=np.float64)
    counts = np.asarray(cell_counts, dtype=np.float64)
    mapping = np.asarray(mapping, dtype=np.int64)
    num_new = int(mapping.max()) + 1
    sums = np.zeros((num_new, descriptors.shape[1]), dtype=np.float64)
    np.add.at(sums, mapping, descriptors * counts[:, None])
    totals = np.bincount(mapping, weights=counts, minlength=num_new)
    return (sums / np.maximum(totals, 1.0)[:, None]).astype(np.float32)


def _check_tau(tau_prime: float) -> float:
    tau_prime = float(tau_prime)
    if math.isnan(tau_prime):
        raise ValueError("tau must be a number, got NaN")
    return tau_prime


def rethreshold_row(row: Mapping[str, Any], tau_prime: float) -> dict:
    """One output row re-cut at ``tau'``; error rows come back unchanged.

    Raises:
        ValueError: ``tau'`` is larger than the tau the row was computed with
            (a split tree cannot tell how rejected regions would be cut).
    """
    tau_prime = _check_tau(tau_prime)
    if row.get("status") != schema.STATUS_OK:
        return dict(row)
    latent = schema.decode_mask(row["latent_labels"])
    tree = schema.decode_tree(row["tree"], latent)
    if tau_prime > tree.tau:
        raise ValueError(
            f"{row['image_id']}: labels computed at tau={tree.tau:g} can only be re-thresholded to "
            f"tau <= {tree.tau:g}; got {tau_prime:g} (run the labeling job again for a larger tau)"
        )
    pruned = prune_tree(tree, tau_prime)
    mapping = merge_map(latent, pruned.labels)
    descriptors = np.asarray([s["descriptor"] for s in row["segments"]], dtype=np.float32)
    cell_counts = np.bincount(latent.reshape(-1), minlength=descriptors.shape[0])
    mask = mapping[schema.decode_mask(row["mask"])]
    params = json.loads(row["params"]) if row.get("params") else {}
    params["rethresholded_from"] = params.get("rethresholded_from", tree.tau)
    params["tau"] = tau_prime
    return schema.ok_row(
        image_id=row["image_id"],
        source=row["source"],
        width=row["width"],
        height=row["height"],
        mask=mask,
        latent_labels=pruned.labels,
        descriptors=merge_descriptors(descriptors, cell_counts, mapping),
        tree=pruned.to_dict(),
        params=schema.params_json(params),
    )


class Renamer:
    """Names re-thresholded rows again, reading each image from its ``source``.

    ``vocabulary`` / ``naming_model``: None takes what the row's ``params``
    recorded. One :class:`diffcut.method.naming.SegmentNamer` per (model, vocabulary)
    met, loaded on first use (the text classifier is computed once for each).
    """

    def __init__(
        self,
        vocabulary: str | None = None,
        naming_model: str | None = None,
        *,
        device: str = "cpu",
        images_root: str | None = None,
        image_column: str = "image",
        max_image_pixels: int | None = None,
    ):
        from diffcut.job.inputs import DEFAULT_MAX_IMAGE_PIXELS
        from diffcut.tools.gallery import SourceReader

        self.vocabulary, self.naming_model, self.device = vocabulary, naming_model, device
        self.reader = SourceReader(images_root, image_column=image_column)
        self.max_image_pixels = max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
        self._namers: dict[tuple[str, str], Any] = {}
        self.renamed = 0
        self.failed = 0

    def _namer(self, naming_model: str, vocabulary: str):
        key = (naming_model, vocabulary)
        if key not in self._namers:
            from diffcut.method.naming import SegmentNamer

            self._namers[key] = SegmentNamer(naming_model, vocabulary, device=self.device)
        return self._namers[key]

    def _image_bytes(self, source: str) -> bytes:
        from diffcut.job.webdataset import split_source

        if split_source(source) is not None:
            raise ValueError("WebDataset sources (shard.tar#key) are not read back one sample at a time")
        return self.reader.read(source)

    def __call__(self, row: dict) -> dict:
        """The named version of a re-thresholded ok ``row``, or an error row saying why not; never raises."""
        from diffcut.job.inputs import decode_image, redact
        from diffcut.method.naming import DEFAULT_NAMING_MODEL

        params = json.loads(row["params"]) if row.get("params") else {}
        vocabulary = self.vocabulary or params.get("vocabulary")
        naming_model = self.naming_model or params.get("naming_model") or DEFAULT_NAMING_MODEL
        params.update(vocabulary=vocabulary, naming_model=naming_model)
        row["params"] = schema.params_json(params)
        try:
            if vocabulary is None:
                raise ValueError("its params record no vocabulary; pass --vocabulary")
            try:
                data = self._image_bytes(row["source"])
            except Exception as error:  # noqa: BLE001 - moved, deleted, no credentials...
                raise ValueError(
                    f"the image could not be read from its source {row['source']!r}: {type(error).__name__}: {error}"
                ) from None
            size = (row["mask_width"], row["mask_height"])
            pixels = decode_image(data, size, max_pixels=self.max_image_pixels).pixels
            namer = self._namer(naming_model, vocabulary)
            names = namer.name(pixels, schema.decode_mask(row["mask"]), row["num_segments"])
            self.renamed += 1
            return schema.named_row(row, names, namer.vocabulary.class_names)
        except Exception as error:  # noqa: BLE001 - one image's failure is one error row
            self.failed += 1
            return schema.error_row(
                row["image_id"],
                row["source"],
                redact(f"re-naming failed: {type(error).__name__}: {error}"),
                params=row["params"],
                width=row["width"],
                height=row["height"],
            )


@dataclass
class RethresholdSummary:
    """What :func:`rethreshold_labels` did."""

    input: str
    output: str
    tau: float
    shards: int = 0
    rows: int = 0
    ok: int = 0
    error: int = 0
    segments_before: int = 0
    segments_after: int = 0
    skipped_incomplete_shards: list[str] = field(default_factory=list)
    #: named output: ok rows named again, and rows that became error rows because naming them failed.
    named: bool = False
    renamed: int = 0
    renaming_failed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _run_taus(shards: list[str]) -> set[float]:
    """The distinct ``tau`` values in the ``params`` of the ok rows of some shards (reads one column)."""
    taus: set[float] = set()
    for uri in shards:
        table = schema.read_shard(uri, columns=["status", "params"])
        for status, params in zip(table.column("status").to_pylist(), table.column("params").to_pylist()):
            if status == schema.STATUS_OK and params:
                taus.add(float(json.loads(params)["tau"]))
    return taus


def rethreshold_labels(
    input: str,
    output: str,
    tau: float,
    *,
    overwrite: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    vocabulary: str | None = None,
    naming_model: str | None = None,
    device: str = "cpu",
    images_root: str | None = None,
    image_column: str = "image",
) -> RethresholdSummary:
    """Re-threshold every row of the labeling job's output ``input`` at ``tau``; write to ``output``.

    Checks every run tau first (the ``params`` column only), so a ``tau``
    above any of them fails before anything is written. Then reads one shard
    at a time in batches of ``batch_rows`` rows and writes a shard of the same
    name under ``output``; shards a killed run left half-written are skipped.

    Args:
        input: a labeling job output (local directory or ``s3://`` prefix).
        output: where to write; must differ from ``input``.
        tau: the new threshold, at most the tau of every labeled row.
        overwrite: replace shards already under ``output`` (else refuse).
        vocabulary, naming_model: name the new segments with these instead of
            what a named output's ``params`` recorded (a vocabulary also names
            an output made without one). See :class:`Renamer`.
        device, images_root, image_column: where the naming CLIP runs; what
            relative ``source`` paths are resolved against; the image column of
            ``file.parquet#row=N`` sources.

    Raises:
        ValueError: ``tau`` too large, ``output == input``, or ``output``
            already holds shards (without ``overwrite``).
    """
    import pyarrow.parquet as pq

    from diffcut.job.inputs import check_uri, join_uri, open_filesystem

    tau = _check_tau(tau)
    input, output = check_uri(input), check_uri(output)
    if input == output:
        raise ValueError("--output must differ from --input (shards are rewritten, not edited in place)")
    shards, incomplete = schema.list_shards(input)
    if not shards:
        raise ValueError(f"no label shards ({schema.SHARD_PREFIX}*.parquet) under {input}")
    taus = _run_taus(shards)
    if taus and tau > min(taus):
        raise ValueError(
            f"the labels were computed at tau={min(taus):g}; re-thresholding only works for tau <= "
            f"{min(taus):g} (got {tau:g}): the split tree does not record how rejected regions would split"
        )
    existing, half_written = schema.list_shards(output)
    if existing or half_written:
        if not overwrite:
            raise ValueError(
                f"{output} already holds {len(existing) + len(half_written)} label shard(s); "
                "pass --overwrite to replace them"
            )
        out_fs, _ = open_filesystem(output)
        for uri in existing + half_written:
            out_fs.rm(open_filesystem(uri)[1])

    if vocabulary is not None:
        from diffcut.method.naming import load_vocabulary

        load_vocabulary(vocabulary)  # a bad vocabulary fails before anything is written
    summary = RethresholdSummary(input=input, output=output, tau=tau, skipped_incomplete_shards=incomplete)
    renamer = Renamer(vocabulary, naming_model, device=device, images_root=images_root, image_column=image_column)
    out_fs, out_root = open_filesystem(output)
    out_fs.makedirs(out_root, exist_ok=True)
    for uri in shards:
        in_fs, in_path = open_filesystem(uri)
        target = join_uri(output, uri.rsplit("/", 1)[-1])
        with in_fs.open(in_path, "rb") as source, out_fs.open(open_filesystem(target)[1], "wb") as sink:
            # A shard written with keep_metadata keeps its metadata column.
            columns = pq.ParquetFile(source, pre_buffer=False).schema_arrow.names
            keep_metadata = schema.METADATA_FIELD.name in columns
            named_input = schema.SEMANTIC_MASK_FIELD.name in columns
            named = named_input or vocabulary is not None
            summary.named = summary.named or named
            shard_schema = schema.labels_schema(keep_metadata=keep_metadata, named=named)
            read_columns = schema.labels_schema(keep_metadata=keep_metadata, named=named_input).names
            with pq.ParquetWriter(sink, shard_schema) as writer:
                for batch in schema.iter_shard_batches(source, batch_rows, read_columns):
                    rows = []
                    for row in batch.to_pylist():
                        new_row = rethreshold_row(row, tau)
                        if named and new_row["status"] == schema.STATUS_OK:
                            new_row = renamer(new_row)
                        if keep_metadata:
                            new_row[schema.METADATA_FIELD.name] = row[schema.METADATA_FIELD.name]
                        summary.rows += 1
                        if new_row["status"] == schema.STATUS_OK:
                            summary.ok += 1
                            summary.segments_before += int(row["num_segments"])
                            summary.segments_after += int(new_row["num_segments"])
                        else:
                            summary.error += 1
                        rows.append(new_row)
                    writer.write_table(schema.rows_to_table(rows, shard_schema))
        summary.shards += 1
    summary.renamed, summary.renaming_failed = renamer.renamed, renamer.failed
    return summary
