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

Error rows pass through unchanged. :func:`rethreshold_labels` reads a whole
output unit by unit, batch by batch: every recorded unit of the input gives the
unit of the same name and schema in the output, written in the job's layout
(:mod:`diffcut.job.units`: the label file, then its record), so that every
reader reads the new output as it reads the job's, and the same command again
resumes where a killed run stopped.

Named outputs (``--vocabulary``): merged segments need new names, and the old
ones cannot be combined into them (a class is not a mean of classes), so every
re-thresholded ok row is named again (:class:`~diffcut.tools.renaming.Renamer`): the image is read
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
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffcut.job import schema, units
from diffcut.job.storage import InputError, check_uri, describe_exception, open_filesystem
from diffcut.job.writer import record_unit
from diffcut.method.ncut import SplitTree
from diffcut.tools.renaming import Renamer

__all__ = [
    "prune_tree",
    "merge_map",
    "merge_descriptors",
    "rethreshold_row",
    "rethreshold_labels",
    "RethresholdSummary",
    "Renamer",
]

#: Rows read and converted at a time (bounds the memory of row dicts for large masks).
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


@dataclass
class RethresholdSummary:
    """What :func:`rethreshold_labels` did: units written and skipped, and this run's rows."""

    input: str
    output: str
    tau: float
    units: int = 0
    #: units an earlier run with the same settings had written already (skipped: the same command resumes).
    units_done_before: int = 0
    rows: int = 0
    ok: int = 0
    error: int = 0
    segments_before: int = 0
    segments_after: int = 0
    #: named output: ok rows named again, and rows that became error rows because naming them failed.
    named: bool = False
    renamed: int = 0
    renaming_failed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _run_taus(records: list[units.UnitRecord]) -> set[float]:
    """The distinct ``tau`` of the runs that labeled the units with an ok row (their records' ``params``)."""
    taus: set[float] = set()
    for record in records:
        params = json.loads(record.params) if record.params else {}
        if record.ok and "tau" in params:
            taus.add(float(params["tau"]))
    return taus


def unit_params(params: str | None, tau: float, vocabulary: str | None, naming_model: str | None) -> str:
    """The ``params`` of a unit re-thresholded from one labeled with ``params``: those of its ok rows
    (:func:`rethreshold_row`, then :class:`Renamer` when it is named: the job records a vocabulary exactly then)."""
    values = json.loads(params) if params else {}
    values["rethresholded_from"] = values.get("rethresholded_from", values.get("tau"))
    values["tau"] = tau
    if vocabulary is not None or values.get("vocabulary"):
        from diffcut.method.naming import DEFAULT_NAMING_MODEL

        values["vocabulary"] = vocabulary or values.get("vocabulary")
        values["naming_model"] = naming_model or values.get("naming_model") or DEFAULT_NAMING_MODEL
    return schema.params_json(values)


def _read_records(input: str) -> list[units.UnitRecord]:
    try:
        return units.read_records(input)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - storage errors name the input
        raise InputError(f"cannot read the labels under {input}: {describe_exception(error)}") from None


def _units_done(output: str, wanted: dict[str, str], inputs: dict[str, units.UnitRecord], overwrite: bool) -> set[str]:
    """The units ``output`` holds already re-thresholded from the input units ``inputs`` with the params
    ``wanted`` (unit -> params): they are skipped. Refuses an output holding other labels, unless
    ``overwrite``, which deletes what the job's layout holds there (other files stay)."""
    if overwrite:
        units.remove_layout(output)
        return set()
    existing = units.read_records(output)  # refuses an earlier diffcut's layout
    other = sorted(record.unit for record in existing if wanted.get(record.unit) != record.params)
    if other:
        raise InputError(
            f"{output} already holds {len(other)} unit(s) of labels from another input or made with other "
            f"settings ({other[0]}{', ...' if len(other) > 1 else ''}); pass --overwrite to replace them "
            "or choose another --output"
        )
    # A unit the labeling job redid after it was re-thresholded (a --limit run completed since) is done again.
    return {
        record.unit
        for record in existing
        if (record.rows, record.complete) == (inputs[record.unit].rows, inputs[record.unit].complete)
        and record.written >= inputs[record.unit].written
    }


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

    Checks every run tau first (the unit records' ``params``), so a ``tau`` above any of them fails
    before anything is written. Then, for every recorded unit of ``input``, reads its label file in
    batches of ``batch_rows`` rows and writes the unit of the same name under ``output``, in the job's
    layout (:mod:`diffcut.job.units`): its label file, then its record. The same command again resumes:
    units ``output`` has recorded with the same settings are skipped, the others (cut off by a killed
    run, never recorded) are written whole.

    Args:
        input: a labeling job output (local directory or ``s3://`` prefix).
        output: where to write; must differ from ``input``.
        tau: the new threshold, at most the tau of every labeled row.
        overwrite: replace the labels already under ``output`` (else an output holding units of other
            labels or settings is refused).
        vocabulary, naming_model: name the new segments with these instead of
            what a named output's ``params`` recorded (a vocabulary also names
            an output made without one). See :class:`Renamer`.
        device, images_root, image_column: where the naming CLIP runs; what
            relative ``source`` paths are resolved against; the image column of
            ``file.parquet#row=N`` sources.

    Raises:
        ValueError: ``tau`` too large, ``output == input``, no labels under ``input``, ``input`` or
            ``output`` in the layout of an earlier diffcut (:class:`diffcut.job.units.OldLayoutError`),
            or ``output`` holding other labels (without ``overwrite``).
    """
    from diffcut.job.pipeline import new_run_id

    tau = _check_tau(tau)
    input, output = check_uri(input), check_uri(output)
    if input == output:
        raise ValueError("--output must differ from --input (units are rewritten, not edited in place)")
    records = _read_records(input)
    if not records:
        raise InputError(f"no labels under {input}: not the output of `diffcut label` (or it recorded no unit yet)")
    taus = _run_taus(records)
    if taus and tau > min(taus):
        raise ValueError(
            f"the labels were computed at tau={min(taus):g}; re-thresholding only works for tau <= "
            f"{min(taus):g} (got {tau:g}): the split tree does not record how rejected regions would split"
        )
    if vocabulary is not None:
        from diffcut.method.naming import load_vocabulary

        load_vocabulary(vocabulary)  # a bad vocabulary fails before anything is written or deleted
    wanted = {record.unit: unit_params(record.params, tau, vocabulary, naming_model) for record in records}
    done = _units_done(output, wanted, {record.unit: record for record in records}, overwrite)
    summary = RethresholdSummary(input=input, output=output, tau=tau)
    renamer = Renamer(vocabulary, naming_model, device=device, images_root=images_root, image_column=image_column)
    run_id = new_run_id()
    for record in records:
        if record.unit in done:
            summary.units_done_before += 1
            continue
        table = _rethreshold_file(units.label_file(input, record.unit), tau, vocabulary, renamer, summary, batch_rows)
        record_unit(
            output,
            record.unit,
            table,
            params=wanted[record.unit],
            run_id=run_id,
            input=record.input,
            sources=record.sources,
            complete=record.complete,
        )
        summary.units += 1
    summary.renamed, summary.renaming_failed = renamer.renamed, renamer.failed
    return summary


def _rethreshold_file(
    uri: str, tau: float, vocabulary: str | None, renamer: Renamer, summary: RethresholdSummary, batch_rows: int
):
    """The rows of one label file re-thresholded (named again when named), as one table of its schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = open_filesystem(uri)
    tables = []
    with fs.open(path, "rb") as source:
        # A file written with keep_metadata keeps its metadata column.
        columns = pq.ParquetFile(source, pre_buffer=False).schema_arrow.names
        keep_metadata = schema.METADATA_FIELD.name in columns
        named_input = schema.SEMANTIC_MASK_FIELD.name in columns
        named = named_input or vocabulary is not None
        summary.named = summary.named or named
        file_schema = schema.labels_schema(keep_metadata=keep_metadata, named=named)
        read_columns = schema.labels_schema(keep_metadata=keep_metadata, named=named_input).names
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
            tables.append(schema.rows_to_table(rows, file_schema))
    return pa.concat_tables(tables) if tables else file_schema.empty_table()
