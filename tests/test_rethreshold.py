"""diffcut rethreshold: labels at a smaller tau from the stored split tree equal a fresh run at that tau."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffcut.cli import main as cli_main
from diffcut.job import schema, units
from diffcut.method.assign import segment_embeddings, segment_stats
from diffcut.method.ncut import recursive_ncut
from diffcut.method.segmenter import segment_features
from diffcut.tools.rethreshold import merge_map, prune_tree, rethreshold_labels, rethreshold_row

RUN_TAU = 0.5


def planted_features(seed: int, size: int = 12, channels: int = 16, groups: int = 6, noise: float = 0.8):
    """An (size, size, channels) map of `groups` noisy block patterns: trees with many levels of NCut values."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(groups, channels))
    yy, xx = np.mgrid[0:size, 0:size]
    group = ((yy // 4) * 3 + xx // 4) % groups
    return (centers[group] + noise * rng.normal(size=(size, size, channels))).astype(np.float32)


def taus_between_splits(tree) -> list[float]:
    """Thresholds that cut the tree at every level: midpoints between its distinct accepted NCut values, and ends."""
    values = np.unique(tree.ncut[~tree.is_leaf()])
    middles = ((values[1:] + values[:-1]) / 2).tolist()
    return sorted({0.0, float(values[0]) / 2 if values.size else 0.0, *middles, tree.tau})


def assert_same_tree(pruned, fresh):
    np.testing.assert_array_equal(pruned.labels, fresh.labels)
    np.testing.assert_array_equal(pruned.parent, fresh.parent)
    np.testing.assert_array_equal(pruned.ncut, fresh.ncut)
    np.testing.assert_array_equal(pruned.leaf_of_label, fresh.leaf_of_label)
    assert pruned.tau == fresh.tau


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_tree_equals_a_fresh_run_at_every_level(seed):
    features = planted_features(seed)
    _, tree = recursive_ncut(features, tau=RUN_TAU, return_tree=True)
    taus = taus_between_splits(tree)
    assert len(taus) > 10  # the planted map gives a deep tree: the test covers many cuts
    counts = []
    for tau in taus:
        pruned = prune_tree(tree, tau)
        _, fresh = recursive_ncut(features, tau=tau, return_tree=True)
        assert_same_tree(pruned, fresh)
        # A pruned tree is a valid tree at tau: pruning it again equals pruning the original.
        for smaller in (tau / 2, 0.0):
            np.testing.assert_array_equal(prune_tree(pruned, smaller).labels, tree.prune(smaller))
        counts.append(pruned.num_segments)
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] == tree.num_segments


def test_prune_tree_refuses_a_tau_the_tree_cannot_answer():
    _, tree = recursive_ncut(planted_features(0), tau=0.2, return_tree=True)
    # Up to the least NCut of a leaf nothing changes; above it a leaf would split into unknown parts.
    least_leaf = float(tree.ncut[tree.is_leaf()].min())
    assert_same_tree(
        prune_tree(tree, least_leaf), recursive_ncut(planted_features(0), tau=least_leaf, return_tree=True)[1]
    )
    with pytest.raises(ValueError, match="pruned only to"):
        prune_tree(tree, least_leaf + 0.01)


def test_merge_map_rejects_a_split():
    old = np.array([[0, 0, 1], [1, 2, 2]])
    assert merge_map(old, np.array([[0, 0, 0], [0, 1, 1]])).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="not a coarsening"):
        merge_map(old, np.array([[0, 1, 1], [1, 2, 2]]))


# ------------------------------------------------------------------------ rows from the tiny model
@pytest.fixture(scope="module")
def tiny_model_features(sample_dir):
    """Diffusion features of three sample images from the tiny random SDXL-architecture model.

    160 x 160 inputs give 5 x 5 feature maps whose trees have NCut values spread over (0, 0.5).
    """
    from PIL import Image

    from diffcut.method.features import FeatureExtractor

    extractor = FeatureExtractor.from_pretrained("tiny-random", device="cpu")
    names = ["landscape.jpg", "tiles.png", "portrait.jpg"]
    images = [np.asarray(Image.open(sample_dir / n).convert("RGB").resize((160, 160)), np.float32) / 255 for n in names]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        features = extractor.extract(pixels).cpu().numpy()
    return {f"images/{name}": features[i] for i, name in enumerate(names)}


def labeled_rows(features_by_id, mask_size=(70, 90)):
    """Output rows as the labeling job builds them (segment_features + schema.ok_row), plus an error row."""
    params = schema.params_json({"model": "tiny-random", "tau": RUN_TAU, "alpha": 10.0})
    rows = []
    for image_id, features in features_by_id.items():
        result = segment_features(features, mask_size, tau=RUN_TAU, alpha=10.0)
        rows.append(
            schema.ok_row(
                image_id=image_id,
                source=image_id,
                width=300,
                height=200,
                mask=result.mask,
                latent_labels=result.latent_labels,
                descriptors=result.embeddings,
                tree=result.tree.to_dict(),
                params=params,
            )
        )
    rows.append(schema.error_row("images/broken.jpg", "images/broken.jpg", "not an image", params=params))
    return rows


def write_units(write_unit, directory, rows, count=2):
    """The rows split over `count` units, written as the job writes them (label file, then record)."""
    params = rows[0]["params"]
    for index, part in enumerate(np.array_split(np.arange(len(rows)), count)):
        table = schema.rows_to_table([rows[i] for i in part])
        write_unit(directory, f"part-{index}.tar", table, params, input=f"/data/part-{index}.tar")


def test_rethresholded_output_equals_a_fresh_run(tmp_path, tiny_model_features, write_unit):
    rows = labeled_rows(tiny_model_features)
    write_units(write_unit, tmp_path / "labels", rows)
    originals = {row["source"]: row for row in rows}
    trees = [schema.decode_tree(r["tree"], r["latent_labels"]) for r in rows if r["status"] == "ok"]
    assert min(t.num_segments for t in trees) >= 5
    # Thresholds between the trees' own NCut values, so every one of them merges something somewhere.
    all_values = np.unique(np.concatenate([t.ncut[~t.is_leaf()] for t in trees]))
    taus = [float(np.quantile(all_values, q)) for q in (0.2, 0.5, 0.8)]

    for tau in taus:
        out = tmp_path / f"tau-{tau:.6f}"
        summary = rethreshold_labels(str(tmp_path / "labels"), str(out), tau)
        assert (summary.rows, summary.ok, summary.error, summary.units) == (4, 3, 1, 2)
        # The job's layout, unit for unit: records tell readers and a resumed run what the output holds.
        assert units.recorded_units(str(out)) == units.recorded_units(str(tmp_path / "labels"))
        for before, after in zip(units.read_records(str(tmp_path / "labels")), units.read_records(str(out))):
            assert (after.input, after.sources, after.complete, after.rows, after.error) == (
                before.input,
                before.sources,
                before.complete,
                before.rows,
                before.error,
            )
            assert json.loads(after.params) == dict(json.loads(before.params), tau=tau, rethresholded_from=RUN_TAU)
            assert after.bytes == (out / "labels" / f"{after.unit}.parquet").stat().st_size
        table = schema.read_labels(str(out))
        assert table.schema.equals(schema.LABELS_SCHEMA, check_metadata=False)
        merged_somewhere = False
        for row in table.to_pylist():
            original = originals[row["source"]]
            if row["status"] != "ok":
                assert row == original  # error rows pass through unchanged
                continue
            features = tiny_model_features[row["source"]]
            fresh_labels, fresh_tree = recursive_ncut(features, tau=tau, alpha=10.0, return_tree=True)
            latent = schema.decode_mask(row["latent_labels"])
            np.testing.assert_array_equal(latent, fresh_labels)
            assert_same_tree(schema.decode_tree(row["tree"], latent), fresh_tree)
            # The mask is the union of the merged segments: the old mask with every old id replaced by
            # the new id of that segment's latent cells.
            old_latent = schema.decode_mask(original["latent_labels"])
            old_mask = schema.decode_mask(original["mask"])
            new_id = np.array([latent[old_latent == k][0] for k in range(original["num_segments"])])
            mask = schema.decode_mask(row["mask"])
            np.testing.assert_array_equal(mask, new_id[old_mask])
            merged_somewhere |= row["num_segments"] < original["num_segments"]
            # Segments: areas and boxes of the new mask, descriptors equal to a fresh computation.
            assert row["num_segments"] == len(row["segments"]) == int(latent.max()) + 1
            stats = segment_stats(mask, num_segments=row["num_segments"])
            assert [s["area"] for s in row["segments"]] == stats.area.tolist()
            assert [s["bbox"] for s in row["segments"]] == stats.bbox.tolist()
            descriptors = np.array([s["descriptor"] for s in row["segments"]])
            np.testing.assert_allclose(descriptors, segment_embeddings(features, fresh_labels), atol=2e-6)
            params = json.loads(row["params"])
            assert params["tau"] == tau and params["rethresholded_from"] == RUN_TAU
            assert params["model"] == "tiny-random"
        assert merged_somewhere


def test_a_tau_above_the_run_tau_fails_before_writing(tmp_path, tiny_model_features, write_unit):
    write_units(write_unit, tmp_path / "labels", labeled_rows(tiny_model_features))
    with pytest.raises(ValueError, match=r"computed at tau=0\.5.*tau <= 0\.5"):
        rethreshold_labels(str(tmp_path / "labels"), str(tmp_path / "out"), 0.6)
    assert not (tmp_path / "out").exists()
    row = labeled_rows(dict(list(tiny_model_features.items())[:1]))[0]
    with pytest.raises(ValueError, match="can only be re-thresholded"):
        rethreshold_row(row, 0.75)


def test_command_line(tmp_path, tiny_model_features, write_unit, capsys):
    labels, out = tmp_path / "labels", tmp_path / "out"
    write_units(write_unit, labels, labeled_rows(tiny_model_features), count=1)
    assert cli_main(["rethreshold", "--input", str(labels), "--tau", "0.05", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 ok, 1 error" in printed and "tau=0.05" in printed
    before = schema.read_labels(str(labels), columns=["num_segments"]).column("num_segments").to_pylist()
    after = schema.read_labels(str(out), columns=["num_segments"]).column("num_segments").to_pylist()
    assert sum(a for a in after if a) < sum(b for b in before if b)
    # The same command again finds its unit done.
    assert cli_main(["rethreshold", "--input", str(labels), "--tau", "0.05", "--output", str(out)]) == 0
    assert "re-thresholded 0 rows" in (printed := capsys.readouterr().out) and "1 unit(s) were done already" in printed

    # An existing output is not overwritten by accident; --overwrite replaces it.
    assert cli_main(["rethreshold", "-i", str(labels), "-t", "0.01", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["rethreshold", "-i", str(labels), "-t", "0.0", "-o", str(out), "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["segments_after"] == 3  # tau 0: one segment per image
    assert cli_main(["rethreshold", "-i", str(labels), "-t", "0.9", "-o", str(tmp_path / "x")]) == 2
    assert "tau <= 0.5" in capsys.readouterr().err
    assert cli_main(["rethreshold", "-i", str(labels), "-t", "0.1", "-o", str(labels)]) == 2


def test_reads_and_writes_s3(tmp_path, tiny_model_features, write_unit, s3_bucket):
    import boto3

    write_units(write_unit, tmp_path / "labels", labeled_rows(tiny_model_features))
    client = boto3.client("s3")
    for path in (tmp_path / "labels").rglob("*"):
        if path.is_file():
            client.upload_file(str(path), s3_bucket, f"runs/v1/{path.relative_to(tmp_path / 'labels').as_posix()}")
    summary = rethreshold_labels(f"s3://{s3_bucket}/runs/v1", f"s3://{s3_bucket}/runs/v1-tau0.05", 0.05)
    assert (summary.units, summary.ok, summary.error) == (2, 3, 1)
    again = rethreshold_labels(f"s3://{s3_bucket}/runs/v1", f"s3://{s3_bucket}/runs/v1-tau0.05", 0.05)
    assert (again.units, again.units_done_before, again.rows) == (0, 2, 0)
    rethreshold_labels(str(tmp_path / "labels"), str(tmp_path / "local"), 0.05)
    remote = schema.read_labels(f"s3://{s3_bucket}/runs/v1-tau0.05")
    assert remote.equals(schema.read_labels(str(tmp_path / "local")))


def test_the_same_command_resumes_a_killed_run(tmp_path, tiny_model_features, write_unit):
    labels, out = tmp_path / "labels", tmp_path / "out"
    write_units(write_unit, labels, labeled_rows(tiny_model_features))
    rethreshold_labels(str(labels), str(tmp_path / "whole"), 0.05)
    # A run killed while writing its second unit: the first recorded, the second's label file cut off, no record.
    rethreshold_labels(str(labels), str(out), 0.05)
    (out / "_units" / "part-1.tar.json").unlink()
    cut = out / "labels" / "part-1.tar.parquet"
    cut.write_bytes(cut.read_bytes()[:40])
    first = (out / "labels" / "part-0.tar.parquet").stat().st_mtime_ns
    summary = rethreshold_labels(str(labels), str(out), 0.05)
    assert (summary.units, summary.units_done_before, summary.rows) == (1, 1, 2)
    assert (out / "labels" / "part-0.tar.parquet").stat().st_mtime_ns == first
    assert schema.read_labels(str(out)).equals(schema.read_labels(str(tmp_path / "whole")))
    # A unit the labeling job wrote again since (a --limit run completed it) is re-thresholded again.
    (record,) = units.read_records(str(labels), ["part-0.tar"])
    write_unit(labels, "part-0.tar", schema.read_shard(units.label_file(str(labels), "part-0.tar")), record.params)
    summary = rethreshold_labels(str(labels), str(out), 0.05)
    assert (summary.units, summary.units_done_before) == (1, 1)

    # Labels of other settings are refused, an earlier diffcut's layout too; --overwrite replaces either.
    with pytest.raises(ValueError, match=r"other settings \(part-0\.tar, \.\.\.\); pass --overwrite"):
        rethreshold_labels(str(labels), str(out), 0.01)
    (out / "labels-x.parquet").write_bytes(cut.read_bytes())
    with pytest.raises(units.OldLayoutError, match="layout of an earlier diffcut"):
        rethreshold_labels(str(labels), str(out), 0.05)
    summary = rethreshold_labels(str(labels), str(out), 0.01, overwrite=True)
    assert (summary.units, summary.units_done_before) == (2, 0) and not (out / "labels-x.parquet").exists()
    assert {json.loads(r.params)["tau"] for r in units.read_records(str(out))} == {0.01}


# ------------------------------------------------------------------------ named outputs
def named_units(tmp_path, tiny_model_features, sample_dir, write_unit):
    """A named output as the job's naming stage writes it (the real NamingStage, tiny CLIP, VOC vocabulary),
    with sources pointing at copies of the sample images (so that one can be deleted)."""
    import shutil

    import pyarrow as pa

    from diffcut.job.settings import LabelSettings
    from diffcut.job.stages import NamingStage

    images = tmp_path / "images"
    images.mkdir()
    params = schema.params_json(
        {"model": "tiny-random", "tau": RUN_TAU, "alpha": 10.0, "vocabulary": "voc", "naming_model": "tiny-random"}
    )
    rows = labeled_rows(tiny_model_features)
    for row in rows:
        name = row["source"].rsplit("/", 1)[-1]
        if row["status"] == "ok":
            shutil.copy(sample_dir / name, images / name)
        row["source"], row["params"] = str(images / name), params
    table = schema.rows_to_table(rows)
    data = [(images / r["source"].rsplit("/", 1)[-1]).read_bytes() if r["status"] == "ok" else None for r in rows]
    stage = NamingStage(
        LabelSettings(vocabulary="voc", naming_model="tiny-random"), "cpu", params=params, max_image_pixels=10**8
    )
    batch = table.append_column("image_bytes", pa.array(data, pa.binary()))
    # The unit columns every row carries through the job's stages (diffcut.job.writer.UNIT_COLUMNS).
    batch = batch.append_column("unit", pa.array(["named"] * len(rows))).append_column(
        "unit_rows", pa.array([len(rows)] * len(rows), pa.int64())
    )
    named = stage(batch).drop_columns(["unit", "unit_rows"]).to_pylist()
    assert all(r["semantic_mask"] for r in named if r["status"] == "ok")
    write_unit(tmp_path / "labels", "named", schema.rows_to_table(named, schema.NAMED_LABELS_SCHEMA), params)
    return named, images


def test_a_named_output_is_named_again_from_the_recorded_vocabulary_and_clip(
    tmp_path, tiny_model_features, write_unit, sample_dir
):
    from diffcut.job.inputs import decode_image
    from diffcut.method.naming import SegmentNamer

    torch.set_num_threads(1)
    named, images = named_units(tmp_path, tiny_model_features, sample_dir, write_unit)
    originals = {row["source"]: row for row in named}
    namer = SegmentNamer("tiny-random", "voc", device="cpu")
    # At the run's own tau nothing changes: naming again gives the job's names back.
    same = rethreshold_labels(str(tmp_path / "labels"), str(tmp_path / "same"), RUN_TAU)
    assert (same.rows, same.ok, same.error, same.renamed, same.renaming_failed) == (4, 3, 1, 3, 0)
    for row in schema.read_labels(str(tmp_path / "same")).to_pylist():
        original = originals[row["source"]]
        assert row["semantic_mask"] == original["semantic_mask"] and row["status"] == original["status"]
        if row["status"] == "ok":
            assert [s["class_id"] for s in row["segments"]] == [s["class_id"] for s in original["segments"]]
            assert [s["class_score"] for s in row["segments"]] == [s["class_score"] for s in original["segments"]]

    # Below it segments merge; their names are those of the merged masks, not the old ones.
    (images / "tiles.png").unlink()  # this row's image is gone: it becomes an error row
    summary = rethreshold_labels(str(tmp_path / "labels"), str(tmp_path / "out"), 0.05)
    assert (summary.rows, summary.ok, summary.error, summary.renamed, summary.renaming_failed) == (4, 2, 2, 2, 1)
    table = schema.read_labels(str(tmp_path / "out"))
    assert table.schema.equals(schema.NAMED_LABELS_SCHEMA, check_metadata=False)
    # The unit's record holds the params of its ok rows: a resumed run compares them.
    ok_params = {r["params"] for r in table.to_pylist() if r["status"] == "ok"}
    assert [r.params for r in units.read_records(str(tmp_path / "out"))] == list(ok_params)
    merged = False
    for row in table.to_pylist():
        params = json.loads(row["params"])
        if row["source"].endswith("tiles.png"):
            assert row["status"] == "error" and row["semantic_mask"] is None
            assert row["error"].startswith("re-naming failed") and "could not be read from its source" in row["error"]
            assert params["tau"] == 0.05 and params["vocabulary"] == "voc"
            continue
        if row["status"] != "ok":
            assert row["error"] == "not an image"
            continue
        assert params["vocabulary"] == "voc" and params["naming_model"] == "tiny-random" and params["tau"] == 0.05
        mask = schema.decode_mask(row["mask"])
        pixels = decode_image(open(row["source"], "rb").read(), (row["mask_width"], row["mask_height"])).pixels
        expected = namer.name(pixels, mask, row["num_segments"])
        assert [s["class_id"] for s in row["segments"]] == expected.class_id.tolist()
        assert [s["class_name"] for s in row["segments"]] == [
            namer.vocabulary.class_names[c] for c in expected.class_id
        ]
        np.testing.assert_allclose([s["class_score"] for s in row["segments"]], expected.class_score, rtol=1e-5)
        np.testing.assert_array_equal(schema.decode_mask(row["semantic_mask"]), expected.semantic_mask)
        merged |= row["num_segments"] < originals[row["source"]]["num_segments"]
    assert merged


def test_command_line_names_with_the_vocabulary_given(tmp_path, tiny_model_features, write_unit, sample_dir, capsys):
    """--vocabulary FILE replaces the recorded vocabulary; it also names an output made without one."""
    rows = labeled_rows(tiny_model_features)
    for row in rows:  # the plain job's rows, sources relative to the images root
        row["source"] = row["source"].rsplit("/", 1)[-1]
    write_units(write_unit, tmp_path / "labels", rows, count=1)
    vocabulary = tmp_path / "classes.txt"
    vocabulary.write_text("sky, clouds\ntree\nroad\n")
    argv = [
        "rethreshold",
        "-i",
        str(tmp_path / "labels"),
        "-t",
        "0.1",
        "-o",
        str(tmp_path / "out"),
        "--vocabulary",
        str(vocabulary),
        "--naming-model",
        "tiny-random",
        "--images-root",
        str(sample_dir),
    ]
    assert cli_main(argv) == 0
    assert "named the new segments again: 3 rows; 0 rows could not be named" in capsys.readouterr().out
    table = schema.read_labels(str(tmp_path / "out"))
    assert table.schema.equals(schema.NAMED_LABELS_SCHEMA, check_metadata=False)
    ok = [r for r in table.to_pylist() if r["status"] == "ok"]
    assert len(ok) == 3 and all(s["class_name"] in ("sky", "tree", "road") for r in ok for s in r["segments"])
    assert {json.loads(r["params"])["vocabulary"] for r in ok} == {str(vocabulary)}
    assert [r.params for r in units.read_records(str(tmp_path / "out"))] == [ok[0]["params"]]
    assert cli_main(argv[:-2] + ["--overwrite"]) == 0  # without the images root the sources are not found
    assert "0 rows; 3 rows could not be named" in capsys.readouterr().out
    assert cli_main(argv + ["--overwrite", "--vocabulary", str(tmp_path / "missing.txt")]) == 2
    assert "neither" in capsys.readouterr().err
