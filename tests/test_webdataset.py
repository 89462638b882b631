"""Inputs where users' data already lives (issue 14): WebDataset tar shards (local and on a moto S3
server on loopback), img2dataset's Parquet layout, and a Hugging Face ``datasets`` round trip.

The shard reader, listing and planning are checked without Ray on hand-built tar files (broken ones
included); three runs of the job with the tiny model and a local Ray check the whole path: S3 shards
with ``keep_metadata`` labelled in two resumed runs, and a ``datasets`` Image dataset in, the labels
loaded back with ``datasets.load_dataset``. The S3 labels also go back into training through
``diffcut.tools.training`` (one machine and Ray Data) in the Ray session that made them.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffcut.job import inputs, schema
from diffcut.job import webdataset as wds
from diffcut.job.stages import decode_stage
from diffcut.job.writer import finish_unit, write_parts

TINY = dict(
    model="tiny-random",
    device="cpu",
    resolution=64,
    batch_size=2,
    decode_cpus=0.5,
    extractor_cpus=0.5,
    ncut_cpus=0.5,
    ncut_pool_max=1,
    mask_size="32",
)


def _jpeg(seed: int, size=(48, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = rng.integers(0, 256, 3)
    pixels[size[1] // 2 :, : size[0] // 2] = rng.integers(0, 256, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    wds.write_shard(path, members)
    return path


def img2dataset_members(keys: list[str], seed: int = 0) -> list[tuple[str, bytes]]:
    members = []
    for i, key in enumerate(keys):
        meta = {"key": key, "url": f"https://example.com/{key}.jpg", "caption": f"image {key}", "status": "success"}
        members += [
            (f"{key}.jpg", _jpeg(seed + i)),
            (f"{key}.json", json.dumps(meta).encode()),
            (f"{key}.txt", meta["caption"].encode()),
        ]
    return members


def records(path: Path, keep_metadata: bool = False) -> list[inputs.RawRecord]:
    unit = {"kind": wds.UNIT_KIND, "path": str(path), "unit": path.name}
    return list(wds.read_shard_unit(unit, keep_metadata=keep_metadata))


# --------------------------------------------------------------------------- reader, no Ray
def test_a_shard_gives_one_record_per_sample_with_key_source_and_json(tmp_path):
    shard = tmp_path / "00000.tar"
    members = img2dataset_members(["000000000", "000000001"])
    members += [("000000002.png", b"not a png at all"), ("000000002.json", b"{}")]  # broken image member
    members += [("000000003.json", b'{"only": "json"}')]  # a sample without an image
    members += [("sub/000000004.seg.png", b"x"), ("sub/000000004.webp", _jpeg(9))]  # key with a folder
    members += [("000000000.cls", b"7")]  # key 000000000 again, not next to its first members
    write_shard(shard, members)

    got = records(shard, keep_metadata=True)
    assert [r.image_id for r in got] == [
        "000000000",
        "000000001",
        "000000002",
        "000000003",
        "sub/000000004",
        "000000000",
    ]
    assert [r.source for r in got[:5]] == [f"{shard}#{r.image_id}" for r in got[:5]]
    assert len({r.source for r in got}) == len(got), "sources must be unique"
    assert got[0].data == members[0][1] and got[0].error is None
    assert json.loads(got[0].metadata)["url"] == "https://example.com/000000000.jpg"
    # The broken member becomes an error when decoded, like any bad image file.
    assert got[2].error is None and got[2].data == b"not a png at all"
    assert "no image member" in got[3].error and "json" in got[3].error and got[3].data is None
    assert got[4].data is not None and got[4].metadata is None
    assert "duplicate key" in got[5].error and got[5].source.startswith(f"{shard}#000000000@")
    chunks = list(
        decode_stage(
            wds.plan_shards([str(shard)], root=str(tmp_path)).units,
            image_column="image",
            resolution=64,
            resize="bucket",
            stride=32,
            mask_size="original",
            max_image_pixels=inputs.DEFAULT_MAX_IMAGE_PIXELS,
            keep_image_bytes=False,
            chunk_rows=2,
            keep_metadata=True,
            sort_records=2,
        )
    )
    decoded = pa.concat_tables(chunks)
    by_id = {row["source"]: row for row in decoded.to_pylist()}
    assert len(by_id) == 6
    assert by_id[f"{shard}#000000002"]["status"] == "error"
    assert "not an image" in by_id[f"{shard}#000000002"]["error"]
    assert by_id[f"{shard}#000000001"]["status"] == "ok"
    assert json.loads(by_id[f"{shard}#000000001"]["metadata"])["key"] == "000000001"
    # Every row names the shard's unit; the rows of the last chunk carry the shard's record count, so
    # the driver knows when the unit is whole (the others -1: the shard is still being read).
    assert set(decoded.column("unit").to_pylist()) == {"00000.tar"}
    assert [chunk.column("unit_rows").to_pylist() for chunk in chunks] == [[-1, -1], [-1, -1], [6, 6]]
    assert all(r.metadata is None for r in records(shard))  # not asked for


def test_truncated_and_corrupt_shards_lose_no_sample_silently(tmp_path):
    keys = [f"{i:09d}" for i in range(4)]
    whole = write_shard(tmp_path / "whole.tar", img2dataset_members(keys)).read_bytes()

    # Cut inside the third image: the first two samples, then one error row for the cut one.
    with tarfile.open(tmp_path / "whole.tar") as tar:
        third = next(m for m in tar.getmembers() if m.name == "000000002.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: third.offset_data + 100])
    got = records(cut)
    assert [r.image_id for r in got] == keys[:3]
    assert got[0].error is None and got[1].error is None
    assert "truncated or corrupt" in got[2].error

    # A header overwritten in the middle: tarfile stops there without a word; we report the rest.
    broken = bytearray(whole)
    broken[third.offset : third.offset + 512] = b"\x7f" * 512
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(bytes(broken))
    got = records(corrupt)
    assert [r.image_id for r in got[:2]] == keys[:2] and all(r.error is None for r in got[:2])
    assert [r.image_id for r in got[2:]] == [f"@{third.offset}"]
    assert "broken" in got[2].error and got[2].source == f"{corrupt}#@{third.offset}"

    # Cut inside a header: tarfile stops there without a word too.
    header_cut = tmp_path / "header_cut.tar"
    header_cut.write_bytes(whole[: third.offset + 200])
    got = records(header_cut)
    assert [r.image_id for r in got] == keys[:2] + [f"@{third.offset}"] and "broken" in got[2].error

    # Not a tar at all: one error row for the shard.
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x01" * 3000)
    got = records(junk)
    assert len(got) == 1 and got[0].error and got[0].source == f"{junk}#@0"


def test_listing_detects_shards_and_skips_img2dataset_sidecars(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    for stem in ("00000", "00001"):
        write_shard(folder / f"{stem}.tar", img2dataset_members([f"{stem}0000"]))
        (folder / f"{stem}.parquet").write_bytes(b"PAR1")
        (folder / f"{stem}_stats.json").write_text("{}")
    listing = inputs.list_inputs(str(folder))
    assert listing.format == "webdataset"
    assert listing.files == [str(folder / "00000.tar"), str(folder / "00001.tar")]
    assert listing.skipped == 4
    assert inputs.list_inputs(str(folder), "webdataset").files == listing.files

    # A shard is one unit, named after its path inside the input; a recorded one is not planned again.
    plan = wds.plan_shards(listing.files, root=listing.root)
    names = ["00000.tar", "00001.tar"]
    assert plan.units.to_pylist() == [
        {"kind": wds.UNIT_KIND, "path": path, "unit": name} for path, name in zip(listing.files, names)
    ]
    assert plan.expected == {"00000.tar": None, "00001.tar": None}  # known once read
    assert (plan.listed, plan.planned, plan.units_listed, plan.units_done) == (None, None, 2, 0)
    plan = wds.plan_shards(listing.files, root=listing.root, done=inputs.Done(units={"00001.tar"}, rows=1))
    assert plan.units.column("path").to_pylist() == [str(folder / "00000.tar")]
    assert plan.inputs == {"00000.tar": str(folder / "00000.tar")}
    assert (plan.already_done, plan.planned, plan.units_listed, plan.units_done) == (1, None, 2, 1)

    (folder / "other.parquet").write_bytes(b"PAR1")  # a Parquet file that is no shard's sidecar
    with pytest.raises(inputs.InputError, match="--format webdataset"):
        inputs.list_inputs(str(folder))


def img2dataset_parquet(path: Path) -> Path:
    """A file laid out like img2dataset's ``--output_format parquet``: failed rows have no image."""
    rows = [
        dict(
            key="000000000", url="https://a/0.jpg", caption="zero", status="success", error_message=None, jpg=_jpeg(0)
        ),
        dict(
            key="000000001",
            url="https://a/1.jpg",
            caption="one",
            status="failed_to_download",
            error_message="HTTP Error 404: Not Found",
            jpg=None,
        ),
        dict(key="000000002", url="https://a/2.jpg", caption="two", status="success", error_message=None, jpg=_jpeg(2)),
        dict(
            key="000000003",
            url="https://a/3.jpg",
            caption="three",
            status="failed_to_resize",
            error_message="image too small",
            jpg=None,
        ),
        dict(key="000000004", url="https://a/4.jpg", caption="four", status="success", error_message=None, jpg=None),
    ]
    fields = [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("jpg", pa.binary()),
    ]
    table = pa.table({name: [r[name] for r in rows] for name, _ in fields}, schema=pa.schema(fields))
    table = table.append_column("width", pa.array([48, None, 48, None, None], pa.int32()))
    pq.write_table(table, path, row_group_size=3)
    return path


def test_img2dataset_parquet_failed_rows_are_error_rows(tmp_path):
    path = img2dataset_parquet(tmp_path / "00000.parquet")
    listing = inputs.list_inputs(str(tmp_path))
    assert listing.format == "parquet"
    plan = inputs.plan_parquet(listing.files, image_column="jpg", id_column="key")
    assert plan.listed == plan.planned == 5
    decoded = pa.concat_tables(
        decode_stage(
            plan.units,
            image_column="jpg",
            resolution=64,
            resize="bucket",
            stride=32,
            mask_size="original",
            max_image_pixels=inputs.DEFAULT_MAX_IMAGE_PIXELS,
            keep_image_bytes=False,
            chunk_rows=8,
        )
    )
    rows = {row["image_id"]: row for row in decoded.to_pylist()}
    assert sorted(rows) == [f"00000000{i}" for i in range(5)]
    assert rows["000000000"]["status"] == rows["000000002"]["status"] == "ok"
    assert rows["000000001"]["status"] == "error"
    assert rows["000000001"]["error"] == "img2dataset status 'failed_to_download': HTTP Error 404: Not Found"
    assert rows["000000003"]["error"] == "img2dataset status 'failed_to_resize': image too small"
    assert "is null" in rows["000000004"]["error"]  # status says success but there is no image
    assert rows["000000002"]["source"] == f"{path}#row=2"


# --------------------------------------------------------------------------- the job, with Ray
@pytest.mark.slow
def test_webdataset_on_s3_with_metadata_resumes_per_key(ray_local, s3_bucket, tmp_path):
    import fsspec

    from diffcut.job.pipeline import label_dataset
    from diffcut.job.settings import job_arguments
    from diffcut.tools.training import LabeledImages, ray_dataset

    fs = fsspec.filesystem("s3")
    keys = {"00000": ["000000000", "000000001", "000000002"], "00001": ["000010000", "000010001"]}
    for stem, shard_keys in keys.items():
        members = img2dataset_members(shard_keys, seed=int(stem))
        if stem == "00001":
            members[0] = ("000010000.jpg", b"\xff\xd8 a broken jpeg")
        fs.pipe(f"{s3_bucket}/wds/{stem}.tar", write_shard(tmp_path / f"{stem}.tar", members).read_bytes())
        fs.pipe(f"{s3_bucket}/wds/{stem}_stats.json", b"{}")
    source = f"s3://{s3_bucket}/wds"
    output = f"s3://{s3_bucket}/labels"

    first = label_dataset(source, output, **job_arguments(dict(keep_metadata=True, limit=2, **TINY)))
    assert first["format"] == "webdataset" and first["processed"] == 2 and first["skipped_non_input_files"] == 2
    second = label_dataset(source, output, **job_arguments(dict(keep_metadata=True, **TINY)))
    assert first["units_recorded"] == 1  # 00000.tar, cut by the limit: recorded partial
    assert second["removed_incomplete_units"] == 1 and second["already_done"] == 0 and second["processed"] == 5
    assert second["inputs_listed"] == 5 and second["output_rows"] == 5

    rows = {row["image_id"]: row for row in schema.read_labels(output).to_pylist()}
    assert sorted(rows) == sorted(k for shard_keys in keys.values() for k in shard_keys)
    for stem, shard_keys in keys.items():
        for key in shard_keys:
            assert rows[key]["source"] == f"{source}/{stem}.tar#{key}"
            assert json.loads(rows[key]["metadata"])["key"] == key
    assert rows["000010000"]["status"] == "error" and "image" in rows["000010000"]["error"]
    ok = [row for row in rows.values() if row["status"] == "ok"]
    assert len(ok) == 4
    for row in ok:
        assert schema.decode_mask(row["mask"]).shape == (row["mask_height"], row["mask_width"]) == (21, 32)

    # Back into training: each shard paired with its unit's labels by source (shard.tar#key), on one
    # machine (LabeledImages) and with Ray Data (ray_dataset, one map task per unit): the same pairs.
    local = LabeledImages(source, output, size=(24, 16))
    pairs = list(local)
    assert dict(local.counts) == {"pairs": 4, "error_rows": 1}
    assert all(image.shape == (3, 16, 24) and target["masks"].shape[1:] == (16, 24) for image, target in pairs)
    built = ray_dataset(source, output, size=(24, 16), cpus_per_task=0.5)
    assert (built.units, built.labeled, built.error_rows) == (2, 4, 1)
    batches = list(built.dataset.iter_torch_batches(batch_size=3))
    images = torch.cat([batch["image"] for batch in batches])
    targets = torch.cat([batch["target"] for batch in batches])
    assert images.shape == (4, 3, 16, 24) and targets.shape == (4, 16, 24) and targets.dtype == torch.int64
    by_image = {image.numpy().tobytes(): target for image, target in pairs}
    for image, target in zip(images, targets):
        wanted = by_image[image.numpy().tobytes()]  # the same image, resized alike, and its masks
        assert torch.equal(wanted["masks"], target[None] == wanted["segment_ids"][:, None, None])


def test_hugging_face_datasets_round_trip(tmp_path):
    """A ``datasets`` Image dataset saved with ``to_parquet`` goes through the job's stages (in this
    process: the Ray runs of this module cover the stages' plumbing) and the labels, written as a
    shard, load back with ``datasets.load_dataset`` and their masks decode."""
    import datasets

    from diffcut.job.settings import LabelSettings, SpeedSettings
    from diffcut.job.stages import FeatureStage, SegmentStage

    images = [Image.open(io.BytesIO(_jpeg(seed, size))) for seed, size in enumerate([(48, 32), (40, 40), (32, 56)])]
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"image": images, "name": ["a", "b", "c"]}, features=features)
    (tmp_path / "hf").mkdir()
    dataset.to_parquet(str(tmp_path / "hf" / "train.parquet"))

    listing = inputs.list_inputs(str(tmp_path / "hf"))
    plan = inputs.plan_parquet(listing.files, root=listing.root, image_column="image", id_column="name")
    decoded = pa.concat_tables(
        decode_stage(
            plan.units,
            image_column="image",
            resolution=64,
            resize="bucket",
            stride=32,
            mask_size="32",
            max_image_pixels=inputs.DEFAULT_MAX_IMAGE_PIXELS,
            keep_image_bytes=False,
            chunk_rows=8,
        )
    )
    features_table = FeatureStage(
        LabelSettings(model="tiny-random", dtype="float32"), SpeedSettings(batch_size=2), "cpu"
    )(decoded)
    labels = SegmentStage(LabelSettings(), params="{}", max_image_pixels=inputs.DEFAULT_MAX_IMAGE_PIXELS)(
        features_table
    )
    # Written as the job's write stage writes a unit: staged, then the unit's label file and its record.
    output = str(tmp_path / "labels")
    assert labels.column("unit").to_pylist() == [plan.units.column("unit")[0].as_py()] * 3
    parts = write_parts(labels, output=output, run_id="hf", label_schema=schema.LABELS_SCHEMA)
    record = finish_unit(
        output,
        "train.parquet",
        parts.column("part").to_pylist(),
        expected=plan.expected["train.parquet"],
        complete=True,
        params="{}",
        run_id="hf",
        input=listing.files[0],
        list_sources=False,
        label_schema=schema.LABELS_SCHEMA,
    )
    assert (record.rows, record.ok) == (3, 3)

    loaded = datasets.load_dataset(
        "parquet", data_files=f"{output}/labels/*.parquet", split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert loaded.num_rows == 3 and list(loaded.column_names) == list(schema.COLUMNS)
    by_name = {row["image_id"]: row for row in loaded}
    for name, image in zip(["a", "b", "c"], images):
        row = by_name[name]
        assert row["status"] == "ok", row["error"]
        assert (row["width"], row["height"]) == image.size
        assert row["source"].endswith("train.parquet#row=" + str("abc".index(name)))
        mask = schema.decode_mask(row["mask"])
        assert mask.shape == (row["mask_height"], row["mask_width"]) and max(mask.shape) == 32
        assert mask.max() < row["num_segments"] == len(row["segments"])


def _metadata_output(tmp_path: Path) -> tuple[str, dict]:
    """An output of two units, one written with the optional ``metadata`` column, one without; and its row."""
    from diffcut.job import units
    from diffcut.method.segmenter import segment_features

    grid = np.random.default_rng(0).normal(size=(6, 6, 8)).astype(np.float32)
    result = segment_features(grid, (12, 12), tau=0.9, alpha=10.0)
    params = schema.params_json({"tau": 0.9})
    row = schema.ok_row(
        image_id="k",
        source="s.tar#k",
        width=12,
        height=12,
        mask=result.mask,
        latent_labels=result.latent_labels,
        descriptors=result.embeddings,
        tree=result.tree.to_dict(),
        params=params,
    )
    output = str(tmp_path / "labels")
    tables = {
        "a.tar": schema.rows_to_table([dict(row, metadata='{"url": "u"}')], schema.labels_schema(True)),
        "b.tar": schema.rows_to_table([dict(row, source="s.tar#j", image_id="j")]),
    }
    for unit, table in tables.items():
        units.put_durably(units.label_file(output, unit), units.table_bytes(table))
        units.write_record(output, units.UnitRecord(unit, rows=1, ok=1, error=0, bytes=0, params=params, run_id="r"))
    return output, row


def test_metadata_column_reads_back_with_nulls_for_units_without_it(tmp_path):
    """The optional column: read back with read_labels, nulls for label files written without it."""
    output, _ = _metadata_output(tmp_path)
    read = {r["source"]: r["metadata"] for r in schema.read_labels(output).to_pylist()}
    assert read == {"s.tar#k": '{"url": "u"}', "s.tar#j": None}
    assert schema.read_labels(output, columns=["metadata"]).column("metadata").to_pylist() == ['{"url": "u"}', None]


def test_metadata_column_survives_rethresholding(tmp_path):
    """diffcut rethreshold keeps the optional column."""
    from diffcut.tools.rethreshold import rethreshold_labels

    output, row = _metadata_output(tmp_path)
    read = {r["source"]: r["metadata"] for r in schema.read_labels(output).to_pylist()}
    rethreshold_labels(output, str(tmp_path / "cut"), 0.3)
    cut = schema.read_labels(str(tmp_path / "cut"), columns=["source", "metadata", "num_segments"]).to_pylist()
    assert {r["source"]: r["metadata"] for r in cut} == read
    assert all(r["num_segments"] <= row["num_segments"] for r in cut)
