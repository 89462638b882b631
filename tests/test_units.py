"""The per-unit output layout (diffcut.job.units, writer, resume, plan), without Ray: unit names, the
driver's count of rows per unit, staging and finishing a unit on a local folder, what a resumed run finds
in an output, and how inputs are cut into units."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffcut.job import inputs, resume, schema, units, writer
from diffcut.job.settings import LabelSettings
from diffcut.job.storage import InputError


# =========================================================================== names
def test_unit_names_are_one_distinct_file_name_per_input_path():
    paths = ["a/b.tar", "a%2Fb.tar", "a_b.tar", "a/b/c.tar", "a%b.tar", "a%25b.tar", ".hidden.tar", "%2Ehidden.tar"]
    paths += ["_x.parquet", "%5Fx.parquet", "..", ".", "b.tar", "B.tar"]
    names = [units.unit_name(path) for path in paths]
    assert len(set(names)) == len(paths)
    for name in names:
        assert "/" not in name and name not in ("", ".", "..")
        # Neither hidden (the layout's listings skip those) nor skipped by pyarrow, pandas and HF datasets.
        assert not name.startswith((".", "_")), name
    assert units.unit_name("a/b.tar") == "a%2Fb.tar" and units.unit_name(".hidden.tar") == "%2Ehidden.tar"
    assert units.unit_name("b.tar") == "b.tar"  # a plain name stays readable
    assert units.unit_name("a/b.tar") == units.unit_name("a/b.tar")  # the same in every run


def test_long_unit_names_are_capped_and_stay_distinct():
    stem = "d/" * 100 + "shard"
    long = [f"{stem}-{i}.tar" for i in range(3)] + ["é" * 200 + ".tar", "é" * 200 + ".tgz"]
    names = [units.unit_name(path) for path in long]
    assert len(set(names)) == len(long)
    assert all(len(name.encode()) <= units.MAX_NAME_BYTES for name in names)
    assert all("/" not in name for name in names)
    for name in names:  # with the folder's suffix, still a valid file name (255 bytes)
        assert len(Path(units.label_file("/o", name)).name.encode()) <= 255
        name.encode().decode()  # whole UTF-8 characters only
    assert names[0].startswith("d%2Fd%2F")  # a readable prefix is kept
    short = "x" * units.MAX_NAME_BYTES
    assert units.unit_name(short) == short


# =========================================================================== the driver's count
_PART_NUMBERS = itertools.count()


def _parts(*rows: tuple) -> pa.Table:
    """PART_SCHEMA rows from (unit, rows, unit_rows), each its own part file (``<unit>-<n>``)."""
    return pa.Table.from_pylist(
        [
            {"unit": unit, "part": f"{unit}-{next(_PART_NUMBERS)}", "rows": n, "ok": n, "unit_rows": total}
            | {"errors": "{}"}
            for unit, n, total in rows
        ],
        schema=writer.PART_SCHEMA,
    )


def _record(unit: str, rows: int) -> units.UnitRecord:
    return units.UnitRecord(unit, rows=rows, ok=rows, error=0, bytes=1, params="{}", run_id="r")


def test_a_planned_unit_is_whole_when_its_expected_rows_arrived():
    progress = writer.UnitProgress({"a": 3, "b": 2})
    first = _parts(("a", 2, -1), ("b", 1, -1))
    assert progress.add(first) == []
    second = _parts(("a", 1, -1))
    assert progress.add(second) == ["a"]
    assert progress.target("a") == 3
    assert progress.parts("a") == [first.column("part")[0].as_py(), second.column("part")[0].as_py()]
    assert progress.add(_parts(("b", 1, -1), ("a", 1, -1))) == ["b"]  # a is being finished already
    progress.finished_unit("a", _record("a", 3))
    progress.finished_unit("b", _record("b", 2))
    assert (progress.counts.units, progress.counts.rows) == (2, 5)
    assert progress.at_end(cut=False) == []
    # A late copy of a recorded unit's rows starts nothing and counts nothing.
    assert progress.add(_parts(("a", 3, -1))) == [] and progress.at_end(cut=False) == []
    assert progress.counts.units == 2 and progress.flight == {}


def test_a_shard_is_whole_once_its_last_chunk_told_its_size_and_every_row_arrived():
    progress = writer.UnitProgress({"s": None, "t": None})
    assert progress.add(_parts(("s", 2, -1))) == []  # its size is not known yet
    assert progress.target("s") is None
    assert progress.add(_parts(("t", 2, 5))) == []  # the last chunk first: 3 rows still on their way
    assert progress.target("t") == 5
    assert progress.add(_parts(("s", 1, 3))) == ["s"]
    assert progress.add(_parts(("t", 3, -1))) == ["t"]


def test_a_short_finish_re_arms_the_unit():
    progress = writer.UnitProgress({"a": 2})
    assert progress.add(_parts(("a", 2, -1))) == ["a"]  # two rows, but the same source twice
    progress.finished_unit("a", None)  # the finish found 1 distinct row: nothing written
    assert progress.add(_parts(("a", 1, -1))) == ["a"]  # the missing row: whole again
    progress.finished_unit("a", _record("a", 2))
    assert progress.counts.units == 1 and progress.at_end(cut=False) == []


def test_at_end_finishes_empty_units_and_limit_cut_ones_as_partial():
    # A Parquet file with no rows (0), a shard without samples (None), a file a limit cut (partial),
    # and an image chunk one of whose rows never came.
    progress = writer.UnitProgress({"empty": 0, "shard": None, "cut": 2, "short": 3}, partial={"cut"})
    assert progress.add(_parts(("cut", 2, -1), ("short", 2, -1))) == ["cut"]
    assert sorted(progress.at_end(cut=False)) == [("empty", True), ("shard", True), ("short", False)]
    assert progress.at_end(cut=False) == []  # each is handed out once

    # A limit that stopped the stream: a shard no row reached is left for the next run, a shard it cut is partial.
    progress = writer.UnitProgress({"read": None, "unread": None, "whole": None})
    assert progress.add(_parts(("read", 2, -1), ("whole", 1, 1))) == ["whole"]
    assert progress.at_end(cut=True) == [("read", False)]

    progress = writer.UnitProgress({"cut": 5}, partial={"cut"})
    progress.add(_parts(("cut", 2, -1)))
    assert progress.at_end(cut=False) == [("cut", False)]

    # A unit a limit cut stays partial even with all its planned rows (its finish came back short once).
    progress = writer.UnitProgress({"cut": 2}, partial={"cut"})
    assert progress.add(_parts(("cut", 2, -1))) == ["cut"]
    progress.finished_unit("cut", None)
    assert progress.at_end(cut=False) == [("cut", False)]


# =========================================================================== staging and finishing
def _ok_row(source: str) -> dict:
    mask = np.array([[0, 0, 1], [0, 1, 1]])
    return schema.ok_row(
        image_id=source,
        source=source,
        width=3,
        height=2,
        mask=mask,
        latent_labels=mask,
        descriptors=np.eye(2, 4, dtype=np.float32),
        tree={},
        params="{}",
    )


def _batch(rows: list[dict], unit: list[str], unit_rows: int = -1) -> pa.Table:
    """What reaches the write stage: label rows and the unit columns."""
    table = schema.rows_to_table(rows)
    table = table.append_column(writer.UNIT_COLUMNS[0], pa.array(unit, pa.string()))
    return table.append_column(writer.UNIT_COLUMNS[1], pa.array([unit_rows] * len(rows), pa.int64()))


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _finish(output: str, unit: str, parts: list[str], expected: int | None, **options) -> units.UnitRecord | None:
    arguments = dict(complete=True, params="{}", run_id="r1", input=None, list_sources=True)
    arguments.update(options)
    return writer.finish_unit(output, unit, parts, expected=expected, label_schema=schema.LABELS_SCHEMA, **arguments)


def test_write_parts_stages_one_file_per_unit_and_a_retry_replaces_its_own(tmp_path):
    output = str(tmp_path / "out")
    batch = _batch([_ok_row("c.jpg"), schema.error_row("a.jpg", "a.jpg", "broken"), _ok_row("x.jpg")], ["u", "u", "v"])
    parts = writer.write_parts(batch, output=output, run_id="r1", label_schema=schema.LABELS_SCHEMA)
    assert parts.schema.equals(writer.PART_SCHEMA)
    rows = {row["unit"]: row for row in parts.to_pylist()}
    assert {u: (r["rows"], r["ok"], json.loads(r["errors"])) for u, r in rows.items()} == {
        "u": (2, 1, {"broken": 1}),
        "v": (1, 1, {}),
    }
    staged = _files(tmp_path / "out" / units.PARTS_DIR)
    assert len(staged) == 2 and all(name.startswith("r1/") for name in staged)
    assert pq.read_table(rows["u"]["part"]).column("source").to_pylist() == ["c.jpg", "a.jpg"]
    assert pq.read_table(rows["u"]["part"]).schema.names == schema.LABELS_SCHEMA.names  # no unit columns

    again = writer.write_parts(batch, output=output, run_id="r1", label_schema=schema.LABELS_SCHEMA)
    assert again.column("part").to_pylist() == parts.column("part").to_pylist()
    assert _files(tmp_path / "out" / units.PARTS_DIR) == staged  # replaced, nothing added
    # Another batch: u's other rows get their own file, v's same rows replace theirs.
    writer.write_parts(batch.slice(1), output=output, run_id="r1", label_schema=schema.LABELS_SCHEMA)
    assert len(_files(tmp_path / "out" / units.PARTS_DIR)) == 3


def test_finish_unit_writes_the_sorted_label_file_then_the_record_and_drops_the_parts(tmp_path):
    output = str(tmp_path / "out")

    def stage(rows, unit_rows=-1):
        batch = _batch(rows, ["u"] * len(rows), unit_rows)
        return writer.write_parts(batch, output=output, run_id="r1", label_schema=schema.LABELS_SCHEMA)

    first = stage([_ok_row("c.jpg"), _ok_row("a.jpg")])
    second = stage([_ok_row("a.jpg"), schema.error_row("b.jpg", "b.jpg", "broken")], unit_rows=3)
    parts = first.column("part").to_pylist() + second.column("part").to_pylist()

    # Four rows staged, three distinct: a unit of four is still short, and nothing is written.
    assert _finish(output, "u", parts, expected=4) is None
    assert not (tmp_path / "out" / units.LABELS_DIR).exists() and not (tmp_path / "out" / units.RECORDS_DIR).exists()
    assert all(Path(part).exists() for part in parts)

    record = _finish(output, "u", parts, expected=3)
    label = pq.read_table(units.label_file(output, "u"))
    assert label.column("source").to_pylist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert label.schema.equals(schema.LABELS_SCHEMA)
    assert (record.unit, record.rows, record.ok, record.error, record.complete) == ("u", 3, 2, 1, True)
    assert record.errors == {"broken": 1} and record.sources == ["a.jpg", "b.jpg", "c.jpg"]
    assert record.bytes == Path(units.label_file(output, "u")).stat().st_size
    assert units.read_records(output) == [record]
    assert not any(Path(part).exists() for part in parts)
    assert schema.read_labels(output).column("source").to_pylist() == ["a.jpg", "b.jpg", "c.jpg"]

    # A finish retried after it wrote its record (a worker lost before it returned, a transient error while
    # deleting parts): its record, even with its parts gone.
    label_bytes = Path(units.label_file(output, "u")).read_bytes()
    assert _finish(output, "u", parts, expected=3) == record
    assert _finish(output, "u", parts[:1], expected=None, complete=False) == record
    assert units.read_records(output) == [record]
    assert Path(units.label_file(output, "u")).read_bytes() == label_bytes
    # Another run's record of the unit is no finish of this run: the unit is written again.
    assert _finish(output, "u", [], expected=None, run_id="r2").rows == 0


def test_finish_unit_records_a_unit_only_once_its_label_file_is_written(tmp_path):
    output = tmp_path / "out"
    staged = writer.write_parts(
        _batch([_ok_row("a.jpg")], ["u"]), output=str(output), run_id="r1", label_schema=schema.LABELS_SCHEMA
    )
    parts = staged.column("part").to_pylist()

    # The label file cannot be written: no record either, the parts stay for the next try.
    (output / units.LABELS_DIR).write_text("in the way")
    with pytest.raises(OSError):
        _finish(str(output), "u", parts, expected=1)
    assert not (output / units.RECORDS_DIR).exists() and Path(parts[0]).exists()

    # The record cannot be written (a folder where its temporary file goes): the label file is, but no reader
    # sees it, and the next run sweeps it.
    (output / units.LABELS_DIR).unlink()
    record_path = Path(units.record_file(str(output), "u"))
    blocker = record_path.with_name(f".{record_path.name}.{os.getpid()}.tmp")
    blocker.mkdir(parents=True)
    with pytest.raises(OSError):
        _finish(str(output), "u", parts, expected=1)
    assert Path(units.label_file(str(output), "u")).exists() and Path(parts[0]).exists()
    assert not Path(units.record_file(str(output), "u")).exists()
    assert units.label_files(str(output)) == [] and schema.read_labels(str(output)).num_rows == 0

    blocker.rmdir()
    record = _finish(str(output), "u", parts, expected=1, complete=False, list_sources=False)
    assert (record.complete, record.sources) == (False, None)
    assert units.label_files(str(output)) == [units.label_file(str(output), "u")]


# =========================================================================== resume
def _unit(output: str, unit: str, sources: list[str], params: str, *, complete: bool = True, record: bool = True):
    table = schema.rows_to_table([dict(_ok_row(source), params=params) for source in sources])
    units.put_durably(units.label_file(output, unit), units.table_bytes(table))
    if record:
        units.write_record(
            output,
            units.UnitRecord(
                unit,
                rows=len(sources),
                ok=len(sources),
                error=0,
                bytes=0,
                params=params,
                run_id="r0",
                sources=sources,
                complete=complete,
            ),
        )


def test_output_state_keeps_whole_units_and_removes_what_a_killed_or_limited_run_left(tmp_path):
    params = LabelSettings().params()
    stored = schema.params_json(params)
    output = str(tmp_path / "out")
    _unit(output, "done", ["a.jpg", "b.jpg"], stored)
    _unit(output, "cut", ["c.jpg"], stored, complete=False)  # cut by --limit
    _unit(output, "lost", ["d.jpg"], stored, record=False)  # killed before its record
    staged = tmp_path / "out" / units.PARTS_DIR / "r0" / "x" / "p.parquet"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"rows")
    before = _files(tmp_path / "out")

    # Without cleaning (a dry run): the same answer, nothing deleted.
    done, redo = resume.output_state(output, params, clean=False)
    # To redo: the unit --limit cut, the one recorded nowhere, the one with rows staged ("x").
    assert (done.units, set(done.sources), done.partial, redo) == ({"done"}, {"a.jpg", "b.jpg"}, ["cut"], 3)
    assert (done.rows, done.ok, done.error) == (2, 2, 0)
    assert _files(tmp_path / "out") == before

    done, redo = resume.output_state(output, params)
    assert (done.units, done.partial, redo) == ({"done"}, ["cut"], 3)
    assert _files(tmp_path / "out") == sorted([f"{units.LABELS_DIR}/done.parquet", f"{units.RECORDS_DIR}/done.json"])
    assert schema.read_labels(output).column("source").to_pylist() == ["a.jpg", "b.jpg"]
    assert resume.output_state(output, params)[1] == 0


def test_output_state_refuses_other_label_settings_and_names_them(tmp_path):
    output = str(tmp_path / "out")
    old = LabelSettings(tau=0.5)
    _unit(output, "done", ["a.jpg"], schema.params_json(old.params()))
    _unit(output, "cut", ["c.jpg"], schema.params_json(old.params()), complete=False)
    before = _files(tmp_path / "out")
    with pytest.raises(InputError, match=r"other parameters \(tau: 0.5 -> 0.3\).*--overwrite"):
        resume.output_state(output, LabelSettings(tau=0.3).params())
    assert _files(tmp_path / "out") == before  # refused before anything is removed

    # Only the label settings count: another diffcut version that labels alike resumes the output.
    newer = dict(old.params(), diffcut_version="99.0")
    assert resume.output_state(output, newer)[0].units == {"done"}


def test_a_broken_record_is_an_input_error_naming_it(tmp_path):
    output = str(tmp_path / "out")
    _unit(output, "u", ["a.jpg"], "{}")
    Path(units.record_file(output, "u")).write_text('{"unit": "u", "rows":')
    with pytest.raises(InputError, match=r"_units/u.json is not a diffcut unit record .*delete it"):
        units.read_records(output)


# =========================================================================== the old layout
def test_an_output_in_the_old_layout_is_refused_in_one_clear_line(tmp_path):
    output = str(tmp_path / "out")
    (tmp_path / "out").mkdir()
    assert units.label_files(output) == []  # empty: nothing to refuse
    pq.write_table(schema.rows_to_table([_ok_row("a.jpg")]), tmp_path / "out" / "labels-20260101-0-000000.parquet")
    for read in (units.check_layout, units.label_files, schema.read_labels):
        with pytest.raises(units.OldLayoutError, match="layout of an earlier diffcut") as caught:
            read(output)
        assert "labels-20260101-0-000000.parquet" in str(caught.value) and "--overwrite" in str(caught.value)
        assert "\n" not in str(caught.value) and isinstance(caught.value, InputError)
    with pytest.raises(units.OldLayoutError):
        resume.output_state(output, LabelSettings().params())
    pq.write_table(pa.table({"x": [1]}), tmp_path / "out" / "labels-20260101-1-000000.parquet")
    with pytest.raises(units.OldLayoutError, match=r"000000.parquet and 1 more directly under it"):
        units.check_layout(output)

    # --overwrite removes the old shards along with the layout; files of others stay.
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert units.remove_layout(output) == 2
    assert _files(tmp_path / "out") == ["notes.txt"]
    units.check_layout(output)


# =========================================================================== planning
def _parquet(path: Path, rows: int, row_group_size: int = 2) -> str:
    pq.write_table(pa.table({"image": pa.array([b"x"] * rows, pa.binary())}), path, row_group_size=row_group_size)
    return str(path)


def test_a_limit_cuts_a_parquet_file_into_a_partial_unit(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    files = [_parquet(tmp_path / "in" / "a.parquet", 3), _parquet(tmp_path / "in" / "sub" / "b.parquet", 3)]
    root = str(tmp_path / "in")

    whole = inputs.plan_parquet(files, root=root)
    assert whole.expected == {"a.parquet": 3, "sub%2Fb.parquet": 3} and whole.partial == set()
    assert (whole.listed, whole.planned, whole.units_listed) == (6, 6, 2)

    plan = inputs.plan_parquet(files, root=root, limit=4)
    assert plan.expected == {"a.parquet": 3, "sub%2Fb.parquet": 1} and plan.partial == {"sub%2Fb.parquet"}
    assert (plan.listed, plan.planned) == (None, 4)  # the files past the limit are not read
    assert plan.inputs == {"a.parquet": files[0], "sub%2Fb.parquet": files[1]}
    assert [(u["unit"], u["rows"]) for u in plan.units.to_pylist()] == [
        ("a.parquet", [0, 1]),
        ("a.parquet", [0]),
        ("sub%2Fb.parquet", [0]),
    ]

    exact = inputs.plan_parquet(files, root=root, limit=3)  # the limit ends with a file: nothing is cut
    assert exact.expected == {"a.parquet": 3} and exact.partial == set()

    # A resumed run: the done file is skipped whole, the limit counts from the next one.
    done = inputs.Done(units={"a.parquet"}, rows=3)
    resumed = inputs.plan_parquet(files, root=root, done=done, limit=2)
    assert resumed.expected == {"sub%2Fb.parquet": 2} and resumed.partial == {"sub%2Fb.parquet"}
    assert (resumed.already_done, resumed.units_done, resumed.planned) == (3, 1, 2)


def test_image_files_are_planned_in_chunks_and_a_file_added_later_gets_a_new_one(tmp_path):
    files = [f"s3://b/{name}.jpg" for name in "acegi"]
    first = inputs.plan_image_files(files, unit_files=2, run_id="r1")
    names = [units.chunk_name("r1", i) for i in range(3)]
    assert first.units.column("unit").to_pylist() == [names[0]] * 2 + [names[1]] * 2 + [names[2]]
    assert first.expected == dict(zip(names, [2, 2, 1])) and first.inputs == dict.fromkeys(names)
    assert (first.units_listed, first.units_done, first.partial) == (3, 0, set())
    assert len(set(names)) == 3 and all("r1" in name for name in names)

    # The first two chunks were recorded (their records list their files); a file was added since.
    done = inputs.Done(units=set(names[:2]), sources=set(files[:4]), rows=4)
    again = inputs.plan_image_files(sorted([*files, "s3://b/b.jpg"]), done=done, unit_files=2, run_id="r2")
    assert again.units.column("path").to_pylist() == ["s3://b/b.jpg", "s3://b/i.jpg"]
    assert again.units.column("unit").to_pylist() == [units.chunk_name("r2", 0)] * 2
    assert again.expected == {units.chunk_name("r2", 0): 2}
    assert (again.listed, again.already_done, again.planned) == (6, 4, 2)
    assert (again.units_listed, again.units_done) == (3, 2)

    with pytest.raises(InputError, match="--unit-files"):
        inputs.plan_image_files(files, unit_files=0)


def test_done_files_are_skipped_by_a_merge_of_each_runs_sorted_chunks():
    from diffcut.job.plan import SortedSources, _not_in_sorted

    listing = pa.chunked_array([pa.array(["a/1.jpg", "a/2.jpg", "a/3.jpg"]), pa.array(["b/1.jpg", "b/2.jpg"])])
    runs = [lambda: iter(["a/1.jpg", "b/1.jpg"]), lambda: iter(["a/3.jpg", "gone.jpg"])]
    plan = inputs.plan_image_files(listing, inputs.Done(sources=SortedSources(runs, 4)), unit_files=10)
    assert plan.units.column("path").to_pylist() == ["a/2.jpg", "b/2.jpg"] and plan.already_done == 3
    assert _not_in_sorted(listing, SortedSources(runs, 4)).to_pylist() == [False, True, False, False, True]
    assert _not_in_sorted(listing, SortedSources([lambda: iter(["b/1.jpg", "a/1.jpg"])], 2)) is None
    # Files out of order (not as the job records them): detected, and still exactly the done ones skipped.
    shuffled = SortedSources([lambda: iter(["b/1.jpg", "a/1.jpg"])], 2)
    plan = inputs.plan_image_files(listing, inputs.Done(sources=shuffled), unit_files=10)
    assert plan.units.column("path").to_pylist() == ["a/2.jpg", "a/3.jpg", "b/2.jpg"]
