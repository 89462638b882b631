"""The output format: mask codec, row builders, the Arrow schema, reading shards back."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffcut.job import schema, units


def test_mask_codec_is_lossless_and_picks_the_bit_depth():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(37, 53))
    png = schema.encode_mask(small)
    assert Image.open(__import__("io").BytesIO(png)).mode == "L"
    assert np.array_equal(schema.decode_mask(png), small)
    assert schema.decode_mask(png).dtype == np.int32

    large = rng.integers(0, 300, size=(20, 31))
    large[0, 0] = 256
    png16 = schema.encode_mask(large)
    assert Image.open(__import__("io").BytesIO(png16)).mode.startswith("I;16")
    assert np.array_equal(schema.decode_mask(png16), large)
    assert np.array_equal(schema.decode_mask(schema.encode_mask(np.full((3, 2), 65535))), np.full((3, 2), 65535))

    for bad in (np.zeros((0, 4), int), np.full((2, 2), -1), np.full((2, 2), 70000), np.zeros((2, 2, 2), int)):
        with pytest.raises(ValueError):
            schema.encode_mask(bad)
    with pytest.raises(TypeError):
        schema.encode_mask(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError):
        schema.decode_mask(b"")


def _ok_row(source="a.jpg", k=3, c=5, size=(6, 8)):
    rng = np.random.default_rng(len(source))
    mask = np.zeros(size, np.int32)
    mask[:, size[1] // 2 :] = 1  # label 2 gets no pixel: still listed, with area 0
    latent = np.array([[0, 1], [2, 1]])
    return schema.ok_row(
        image_id=source,
        source=source,
        width=80,
        height=60,
        mask=mask,
        latent_labels=latent,
        descriptors=rng.normal(size=(k, c)).astype(np.float32),
        tree={"nodes": []},
        params=schema.params_json({"tau": 0.5, "model": "m"}),
    )


def test_rows_and_table_follow_the_schema():
    ok = _ok_row()
    error = schema.error_row("b.jpg", "b.jpg", "empty file (0 bytes)", params="{}")
    table = schema.rows_to_table([ok, error])
    assert table.schema.equals(schema.LABELS_SCHEMA, check_metadata=True)
    rows = table.to_pylist()
    assert rows[0]["status"] == "ok" and rows[0]["error"] is None
    assert rows[0]["num_segments"] == 3 == len(rows[0]["segments"])
    segments = rows[0]["segments"]
    assert [s["segment_id"] for s in segments] == [0, 1, 2]
    assert [s["area"] for s in segments] == [24, 24, 0]
    assert segments[0]["bbox"] == [0, 0, 4, 6] and segments[1]["bbox"] == [4, 0, 8, 6]
    assert segments[2]["bbox"] == [0, 0, 0, 0]
    assert all(len(s["descriptor"]) == 5 for s in segments)
    assert (rows[0]["mask_width"], rows[0]["mask_height"]) == (8, 6)
    assert np.array_equal(schema.decode_mask(rows[0]["latent_labels"]), [[0, 1], [2, 1]])
    assert json.loads(rows[0]["params"]) == {"model": "m", "tau": 0.5}
    assert rows[1]["status"] == "error" and rows[1]["mask"] is None and rows[1]["segments"] is None
    with pytest.raises(ValueError, match="unknown output columns"):
        schema.rows_to_table([dict(ok, extra=1)])


def test_ok_row_refuses_a_mask_with_more_labels_than_segments():
    with pytest.raises(ValueError, match="only 2 segments"):
        schema.ok_row(
            image_id="x",
            source="x",
            width=2,
            height=2,
            mask=np.array([[0, 2]]),
            latent_labels=np.zeros((1, 1), int),
            descriptors=np.zeros((2, 3)),
            tree={},
            params="{}",
        )


def _write_unit(output: str, unit: str, rows: list[dict], record: bool = True) -> None:
    """A unit as the job leaves it: its label file, then (``record``) its done record."""
    table = schema.rows_to_table(rows)
    units.put_durably(units.label_file(output, unit), units.table_bytes(table))
    if record:
        ok = sum(row["status"] == "ok" for row in rows)
        record = units.UnitRecord(unit, rows=len(rows), ok=ok, error=len(rows) - ok, bytes=0, params="{}", run_id="r")
        units.write_record(output, record)


def test_read_labels_reads_the_recorded_units_only(tmp_path):
    output = str(tmp_path)
    _write_unit(output, "u2", [schema.error_row("c.jpg", "c.jpg", "broken")])
    _write_unit(output, "u1", [_ok_row("a.jpg"), _ok_row("b.jpg")])
    _write_unit(output, "u3", [_ok_row("d.jpg")], record=False)  # a run killed before recording it
    (tmp_path / "_parts" / "run" / "u4").mkdir(parents=True)  # rows staged by a run, never read
    pq.write_table(schema.rows_to_table([_ok_row("e.jpg")]), tmp_path / "_parts" / "run" / "u4" / "p.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "someone-elses.parquet")
    (tmp_path / schema.SUMMARY_NAME).write_text("{}")

    assert [uri.rsplit("/", 1)[-1] for uri in units.label_files(output)] == ["u1.parquet", "u2.parquet"]
    table = schema.read_labels(output)
    assert table.schema.equals(schema.LABELS_SCHEMA)
    assert table.column("source").to_pylist() == ["a.jpg", "b.jpg", "c.jpg"]  # in order of unit
    only = schema.read_labels(output, columns=["status"])
    assert only.column_names == ["status"] and only.column("status").to_pylist() == ["ok", "ok", "error"]
    empty = schema.read_labels(str(tmp_path / "nothing"), columns=["source", "status"])
    assert empty.num_rows == 0 and empty.column_names == ["source", "status"]
    with pytest.raises(ValueError, match="unknown columns"):
        schema.read_labels(output, columns=["nope"])


def test_plain_pyarrow_and_pandas_read_a_clean_output(tmp_path):
    _write_unit(str(tmp_path), "u", [_ok_row("a.jpg")])
    (tmp_path / schema.SUMMARY_NAME).write_text("{}")  # names starting with _ are ignored by readers
    frame = pq.read_table(tmp_path / units.LABELS_DIR).to_pandas()
    assert list(frame.columns) == list(schema.COLUMNS)
    assert frame.loc[0, "num_segments"] == 3
    # The whole output reads the same: the records (_units/) and the summary are ignored.
    assert pq.read_table(tmp_path).to_pylist() == pq.read_table(tmp_path / units.LABELS_DIR).to_pylist()
