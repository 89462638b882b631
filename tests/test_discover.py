"""Dataset-level classes: spherical k-means on segment descriptors (numpy), and the Ray Data job end to end."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from test_webdataset import TINY

from diffcut.job import schema
from diffcut.method.kmeans import assign_classes, kmeans_plusplus, normalize_rows, spherical_kmeans
from diffcut.tools.discover_batches import (
    classify_batch,
    draw_sample,
    merge_samples,
    sample_arrays,
    sample_batch,
    sample_key_bound,
)

REPO = Path(__file__).resolve().parents[1]


def planted_clusters(seed: int, k: int = 5, per_cluster: int = 80, dim: int = 32, noise: float = 0.25):
    """Points around k random unit directions (cosine ~0.97 to their own), with their true cluster."""
    rng = np.random.default_rng(seed)
    directions = normalize_rows(rng.normal(size=(k, dim)))
    truth = np.repeat(np.arange(k), per_cluster)
    points = directions[truth] + noise / np.sqrt(dim) * rng.normal(size=(truth.size, dim))
    scale = rng.uniform(0.2, 3.0, size=(truth.size, 1))  # descriptors are not unit vectors: norms must not matter
    order = rng.permutation(truth.size)
    return (points * scale)[order], truth[order], directions


# ------------------------------------------------------------------------ the math
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_spherical_kmeans_recovers_planted_clusters(seed):
    points, truth, directions = planted_clusters(seed)
    fit = spherical_kmeans(points, 5, seed=seed)
    # One found cluster per planted one, every point where it belongs.
    pairs = set(zip(truth.tolist(), fit.labels.tolist()))
    assert len(pairs) == 5 and len({p[0] for p in pairs}) == 5 and len({p[1] for p in pairs}) == 5
    found_for = dict(pairs)
    for planted in range(5):
        assert float(fit.centroids[found_for[planted]] @ directions[planted]) > 0.995
    np.testing.assert_allclose(np.linalg.norm(fit.centroids, axis=1), 1.0, rtol=1e-5)
    assert fit.converged and fit.objective > 0.95
    ids, scores = assign_classes(points, fit.centroids)
    np.testing.assert_array_equal(ids, fit.labels)
    np.testing.assert_allclose(scores, np.sum(normalize_rows(points) * fit.centroids[ids], axis=1), atol=1e-6)


def test_seeded_runs_repeat_and_seeds_matter():
    points, _, _ = planted_clusters(7, k=8, noise=1.5)  # overlapping clusters: the seed changes the start
    first, again = spherical_kmeans(points, 8, seed=11), spherical_kmeans(points, 8, seed=11)
    np.testing.assert_array_equal(first.centroids, again.centroids)
    starts = {tuple(kmeans_plusplus(normalize_rows(points), 8, np.random.default_rng(s))) for s in range(5)}
    assert len(starts) > 1


def test_kmeans_plusplus_seeds_every_separated_cluster():
    points, truth, _ = planted_clusters(4, k=6, noise=0.05)
    for seed in range(5):
        chosen = kmeans_plusplus(normalize_rows(points), 6, np.random.default_rng(seed))
        assert sorted(truth[chosen].tolist()) == list(range(6))


def test_weights_act_as_repeated_points():
    points, _, _ = planted_clusters(5, k=3, per_cluster=30, noise=1.0)
    weights = np.random.default_rng(0).integers(1, 4, size=points.shape[0])
    init = normalize_rows(points[:3])
    weighted = spherical_kmeans(points, 3, weights=weights, init=init)
    repeated = spherical_kmeans(np.repeat(points, weights, axis=0), 3, init=init)
    np.testing.assert_allclose(weighted.centroids, repeated.centroids, atol=1e-6)
    np.testing.assert_array_equal(np.repeat(weighted.labels, weights), repeated.labels)
    assert weighted.objective == pytest.approx(repeated.objective)


def test_an_empty_cluster_is_reseeded():
    points, truth, directions = planted_clusters(6, k=3, noise=0.1)
    # Start with two centroids on one cluster and one pointing away from every point.
    init = np.stack([directions[0], directions[0] + 1e-3, -directions.sum(axis=0)])
    fit = spherical_kmeans(points, 3, init=init)
    assert np.bincount(fit.labels, minlength=3).min() > 0
    assert len(set(zip(truth.tolist(), fit.labels.tolist()))) == 3


def test_invalid_inputs():
    with pytest.raises(ValueError, match="at least k=4"):
        spherical_kmeans(np.eye(3), 4)
    with pytest.raises(ValueError, match="weights"):
        spherical_kmeans(np.eye(3), 2, weights=[1, -1, 1])


# ------------------------------------------------------------------------ per-batch work
def label_table(num_images: int = 9, dim: int = 6) -> pa.Table:
    """Label rows with known descriptors and areas (one segment with no pixel), and an error row."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(num_images):
        k = 2 + index % 3
        mask = rng.integers(0, k - 1, size=(6, 8)) if index == 4 else rng.integers(0, k, size=(6, 8))
        mask[0, : k - (index == 4)] = np.arange(k - (index == 4))
        rows.append(
            schema.ok_row(
                image_id=f"im{index}.png",
                source=f"src/im{index}.png",
                width=8,
                height=6,
                mask=mask,
                latent_labels=np.arange(k).reshape(1, k),
                descriptors=rng.normal(size=(k, dim)),
                tree={},
                params="{}",
            )
        )
    rows.insert(3, schema.error_row("bad.png", "src/bad.png", "cannot read the file"))
    return schema.rows_to_table(rows)


def test_sample_does_not_depend_on_batching():
    table = label_table()
    whole = sample_batch(table, sample_size=10, seed=3, weighting="pixels")
    for size in (1, 2, 4):
        parts = [
            sample_batch(table.slice(i, size), sample_size=10, seed=3, weighting="pixels")
            for i in range(0, table.num_rows, size)
        ]
        assert merge_samples(reversed(parts), 10).equals(merge_samples([whole], 10))
    other_seed = sample_batch(table, sample_size=10, seed=4, weighting="pixels")
    assert not other_seed.column("key").equals(whole.column("key"))

    everything = sample_batch(table, sample_size=10**6, seed=3, weighting="pixels")
    descriptors, weights = sample_arrays(everything)
    segments = [s for row in table.to_pylist() if row["segments"] for s in row["segments"]]
    with_pixels = [s for s in segments if s["area"] > 0]
    assert len(with_pixels) == len(segments) - 1 == descriptors.shape[0]  # the empty segment is left out
    # pixel weighting: each segment weighs its share of its 6 x 8 mask
    assert sorted(weights.tolist()) == pytest.approx(sorted(s["area"] / 48 for s in with_pixels))
    stored = {tuple(np.float32(s["descriptor"])) for s in with_pixels}
    assert {tuple(d) for d in descriptors} == stored
    _, uniform = sample_arrays(sample_batch(table, sample_size=10**6, seed=3, weighting="segments"))
    assert set(uniform.tolist()) == {1.0}


@pytest.mark.parametrize("claimed_segments", [None, 10**9])
def test_draw_sample_bounds_the_keys_and_stays_exact(claimed_segments):
    """What the workers send is bounded by a key limit; the sample is still the S smallest keys of all segments,
    also when the limit turns out too tight (an overstated segment count) and the pass runs again unbounded."""
    table = label_table(num_images=400)
    segments = sum(table.column("num_segments").to_pylist()[i] or 0 for i in range(table.num_rows))
    bounds = []

    def local_pass(max_key):
        bounds.append(max_key)
        return [
            sample_batch(table.slice(i, 4), sample_size=5, seed=1, weighting="pixels", max_key=max_key)
            for i in range(0, table.num_rows, 4)
        ]

    exact = merge_samples([sample_batch(table, sample_size=5, seed=1, weighting="pixels")], 5)
    sample = draw_sample(local_pass, 5, claimed_segments or segments)
    assert sample.equals(exact) and sample.num_rows == 5
    assert bounds[0] == sample_key_bound(5, claimed_segments or segments) < 1.0
    if claimed_segments:
        assert bounds == [bounds[0], 1.0]  # too tight: read again without a bound
    else:
        assert len(bounds) == 1
        sent = sum(part.num_rows for part in local_pass(bounds[0]))
        assert sent < segments / 4  # the bound kept most descriptors on the workers


def test_classify_batch_maps_segments_through_the_mask():
    table = label_table()
    centroids = normalize_rows(np.random.default_rng(1).normal(size=(3, 6))).astype(np.float32)
    out = classify_batch(table, centroids=centroids)
    assert out.num_rows == table.num_rows
    for label, row in zip(table.to_pylist(), out.to_pylist()):
        assert (row["image_id"], row["source"], row["status"]) == (label["image_id"], label["source"], label["status"])
        if label["status"] != "ok":
            assert row["mask"] is None and row["class_ids"] is None and row["error"] == label["error"]
            continue
        ids, _ = assign_classes(np.array([s["descriptor"] for s in label["segments"]]), centroids)
        assert row["class_ids"] == ids.tolist()
        np.testing.assert_array_equal(schema.decode_mask(row["mask"]), ids[schema.decode_mask(label["mask"])])


# ------------------------------------------------------------------------ the job, on a local Ray
COLORS = np.array([(200, 40, 40), (40, 170, 60), (50, 70, 210)], dtype=np.float64)


def scene(index: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A 128 x 96 picture of three flat colour regions in one of several layouts, and its class map."""
    height, width = 96, 128
    yy, xx = np.mgrid[0:height, 0:width]
    layouts = [
        xx * 3 // width,
        yy * 3 // height,
        (xx > width // 2) + (yy > height // 2),
        np.where((xx - 64) ** 2 + (yy - 48) ** 2 < 900, 2, (xx > 64).astype(int)),
    ]
    classes = np.asarray(layouts[index % len(layouts)], dtype=np.int64) % 3
    classes = (classes + index) % 3
    pixels = COLORS[classes] + rng.normal(0, 6, size=(height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), classes.astype(np.uint8)


@pytest.fixture(scope="module")
def labeled_dataset(ray_local, tmp_path_factory):
    """Eight generated scenes (and a broken file) labeled by the real job on the local Ray; ground truth PNGs."""
    from diffcut.job.pipeline import label_dataset
    from diffcut.job.settings import job_arguments

    root = tmp_path_factory.mktemp("discover")
    images, truth = root / "images", root / "truth"
    images.mkdir()
    truth.mkdir()
    rng = np.random.default_rng(0)
    for index in range(8):
        pixels, classes = scene(index, rng)
        Image.fromarray(pixels).save(images / f"scene{index}.png")
        Image.fromarray(classes).save(truth / f"scene{index}.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    summary = label_dataset(
        str(images),
        str(root / "labels"),
        **job_arguments(dict(TINY, resolution=128, mask_size="original", batch_size=4, ncut_pool_max=2)),
    )
    assert (summary["ok"], summary["error"]) == (8, 1)
    return root


def test_ray_data_reads_the_label_file_of_every_unit(ray_local, tmp_path, write_unit):
    """Unit names come from the input's file names: Ray Data reads the label file of each, whatever the name."""
    from diffcut.job import units
    from diffcut.tools.discover import arrow_paths

    names = [units.unit_name(n) for n in ("a/b.tar", "odd?name.tar", "x#y z%.tar", "plain.parquet")]
    for name in names:
        write_unit(tmp_path, name, pa.table({"source": [name], "status": ["ok"]}))
    filesystem, paths = arrow_paths(str(tmp_path), units.label_files(str(tmp_path)))
    rows = ray_local.data.read_parquet(paths, filesystem=filesystem).take_all()
    assert sorted(row["source"] for row in rows) == sorted(names)


@pytest.mark.slow
def test_discover_job_writes_classes_that_evaluate_scores(labeled_dataset, capsys):
    from diffcut.cli import main as cli_main
    from diffcut.tools.discover import discover_classes, read_centroids, read_centroids_info, read_classes

    labels, output = labeled_dataset / "labels", labeled_dataset / "classes"
    info = discover_classes(str(labels), str(output), 3, sample_size=1000, seed=0, batch_rows=2, cpus_per_task=0.5)
    assert (info["rows"], info["ok"], info["error"]) == (9, 8, 1)
    centroids = read_centroids(str(output))
    assert centroids.shape == (3, info["feature_dim"]) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    stored = read_centroids_info(str(output))
    assert stored["num_classes"] == 3 and np.array_equal(np.float32(stored["centroids"]), centroids)

    label_rows = {r["source"]: r for r in schema.read_labels(str(labels)).to_pylist()}
    class_rows = read_classes(str(output)).to_pylist()
    assert sorted(r["source"] for r in class_rows) == sorted(label_rows)  # one row per input
    total_segments = 0
    for row in class_rows:
        label = label_rows[row["source"]]
        if label["status"] != "ok":
            assert row["status"] == "error" and row["error"] == label["error"] and row["mask"] is None
            continue
        ids, scores = assign_classes(np.array([s["descriptor"] for s in label["segments"]]), centroids)
        assert row["class_ids"] == ids.tolist() and len(ids) == label["num_segments"]
        np.testing.assert_allclose(row["class_scores"], scores, atol=1e-6)
        np.testing.assert_array_equal(schema.decode_mask(row["mask"]), ids[schema.decode_mask(label["mask"])])
        total_segments += len(ids)
    # The sample was every segment with pixels (1000 > their count).
    areas = [s["area"] for r in label_rows.values() if r["segments"] for s in r["segments"]]
    assert info["sampled_segments"] == sum(a > 0 for a in areas) <= total_segments

    # `diffcut evaluate --matching dataset` reads the output as Parquet predictions and scores every image.
    assert (
        cli_main(
            [
                "evaluate",
                "-p",
                str(output),
                "-g",
                str(labeled_dataset / "truth"),
                "-n",
                "3",
                "--matching",
                "dataset",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == 8 and result["matching"] == "dataset"
    assert 0.0 <= result["miou"] <= 1.0

    # The same fit whatever the batching (the sample is a function of the data and the seed), through the
    # job's entry point; an existing output needs --overwrite.
    job = runpy.run_path(str(REPO / "jobs" / "discover.py"), run_name="discover_job")
    flags = [
        "--input",
        str(labels),
        "--output",
        str(output),
        "-k",
        "3",
        "--sample-size",
        "1000",
        "--batch-rows",
        "3",
        "--cpus-per-task",
        "0.5",
    ]
    assert job["main"](flags) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert job["main"]([*flags, "--overwrite"]) == 0
    np.testing.assert_array_equal(read_centroids(str(output)), centroids)
    assert len(list(output.glob("classes-*.parquet"))) >= 1 and len(read_classes(str(output))) == 9
