"""High-resolution concept assignment (docs/method.md §2.4) against straightforward versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffcut.method import assign
from diffcut.method.assign import assign_concepts, bilinear_source_index, segment_embeddings, segment_stats


def random_case(seed: int, h: int, w: int, c: int, k: int):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(h, w, c)).astype(np.float32)
    labels = rng.integers(0, k, size=(h, w))
    labels[0, :k] = np.arange(k)  # every label occurs
    return features, labels


def loop_embeddings(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    normalized = features.astype(np.float64) / np.linalg.norm(features.astype(np.float64), axis=-1, keepdims=True)
    return np.stack([normalized[labels == k].mean(axis=0) for k in range(labels.max() + 1)])


def naive_scores(features: np.ndarray, labels: np.ndarray, size) -> np.ndarray:
    """Upsample all c normalized channels (as the published nn.Upsample does), then dot products."""
    normalized = F.normalize(torch.from_numpy(features).double().permute(2, 0, 1)[None], dim=1)
    upsampled = F.interpolate(normalized, size=size, mode="bilinear", align_corners=False)[0]
    embeddings = torch.from_numpy(loop_embeddings(features, labels))
    return torch.einsum("chw,kc->khw", upsampled, embeddings).numpy()


def test_segment_embeddings_equal_loop_version():
    features, labels = random_case(0, 7, 9, 16, 5)
    got = segment_embeddings(features, labels)
    assert got.dtype == np.float32 and got.shape == (5, 16)
    np.testing.assert_allclose(got, loop_embeddings(features, labels), rtol=1e-5, atol=1e-6)


def test_segment_embeddings_are_not_renormalized():
    features = np.zeros((1, 2, 2), np.float32)
    features[0, 0] = [3.0, 0.0]
    features[0, 1] = [0.0, 0.5]
    got = segment_embeddings(features, np.zeros((1, 2), np.int64))
    np.testing.assert_allclose(got, [[0.5, 0.5]], atol=1e-7)


@pytest.mark.parametrize(
    "latent, size",
    [
        ((8, 8), (64, 64)),  # integer ratio, up
        ((6, 9), (50, 37)),  # non-integer ratios, up
        ((12, 10), (7, 5)),  # smaller than latent
        ((5, 7), (5, 7)),  # same size
        ((4, 6), (13, 3)),  # up in y, down in x
    ],
)
def test_assign_concepts_equals_naive_upsampling(latent, size):
    h, w = latent
    features, labels = random_case(hash(latent + size) % 1000, h, w, 24, 6)
    got = assign_concepts(features, labels, size)
    assert got.shape == size and got.dtype == np.int32
    scores = naive_scores(features, labels, size)
    best = scores.max(axis=0)
    chosen = np.take_along_axis(scores, got[None].astype(np.int64), axis=0)[0]
    # Where the naive argmax differs, it may only be a floating-point tie.
    assert np.all(chosen >= best - 1e-5)
    assert np.mean(got == scores.argmax(axis=0)) > 0.999


def test_resampled_similarity_maps_match_torch_interpolate():
    features, labels = random_case(3, 5, 7, 8, 4)
    maps, ids = assign.similarity_maps(features, labels)
    assert ids.tolist() == [0, 1, 2, 3]
    for out_h, out_w in [(23, 11), (3, 4)]:
        y0, y1, wy = bilinear_source_index(out_h, 5)
        x0, x1, wx = bilinear_source_index(out_w, 7)
        rows = maps[:, :, x0] * (1 - wx) + maps[:, :, x1] * wx
        ours = rows[:, y0] * (1 - wy[:, None]) + rows[:, y1] * wy[:, None]
        reference = F.interpolate(maps[None], size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_planted_halves_give_expected_labels():
    features = np.zeros((4, 4, 3), np.float32)
    features[:, :2] = [1.0, 0.2, 0.0]
    features[:, 2:] = [0.0, 0.2, 1.0]
    labels = np.zeros((4, 4), np.int64)
    labels[:, 2:] = 1
    got = assign_concepts(features, labels, (8, 8))
    expected = np.zeros((8, 8), np.int32)
    expected[:, 4:] = 1
    np.testing.assert_array_equal(got, expected)
    # A 3x-larger output: the edge sits at the same place, between columns 5 and 6.
    got3 = assign_concepts(features, labels, (12, 12))
    expected3 = np.zeros((12, 12), np.int32)
    expected3[:, 6:] = 1
    np.testing.assert_array_equal(got3, expected3)


def test_tiled_equals_untiled():
    features, labels = random_case(11, 6, 8, 16, 7)
    untiled = assign_concepts(features, labels, (97, 131), max_tile_elements=1 << 30)
    one_row = assign_concepts(features, labels, (97, 131), max_tile_elements=1)
    some_rows = assign_concepts(features, labels, (97, 131), max_tile_elements=7 * 131 * 10)
    np.testing.assert_array_equal(untiled, one_row)
    np.testing.assert_array_equal(untiled, some_rows)


def test_ties_go_to_lowest_label():
    features = np.ones((2, 2, 4), np.float32)
    labels = np.array([[0, 1], [2, 1]])
    got = assign_concepts(features, labels, (5, 3))
    np.testing.assert_array_equal(got, np.zeros((5, 3), np.int32))


def test_absent_label_never_wins():
    # Cell (0, 0) scores -1/3 with its own segment and -1 with segment 2; the
    # all-zero embedding of the absent label 1 would score 0 and win if it took part.
    x = np.array([1.0, 0.0], np.float32)
    features = np.stack([np.stack([x, -x]), np.stack([-x, -x])])
    labels = np.array([[0, 0], [0, 2]])
    embeddings = segment_embeddings(features, labels)
    np.testing.assert_array_equal(embeddings[1], [0.0, 0.0])
    got = assign_concepts(features, labels, (2, 2))
    assert got[0, 0] == 0
    assert set(np.unique(got)) <= {0, 2}


def test_array_conventions():
    features, labels = random_case(5, 4, 4, 8, 3)
    from_half = assign_concepts(features.astype(np.float16), labels.astype(np.int32), (9, 9))
    assert isinstance(from_half, np.ndarray) and from_half.dtype == np.int32
    from_torch = assign_concepts(torch.from_numpy(features), torch.from_numpy(labels), (9, 9))
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.int32
    np.testing.assert_array_equal(from_torch.numpy(), assign_concepts(features, labels, (9, 9)))
    assert isinstance(segment_embeddings(torch.from_numpy(features), labels), torch.Tensor)


def test_bad_inputs_raise():
    features, labels = random_case(6, 4, 4, 8, 3)
    bad = features.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        assign_concepts(bad, labels, (8, 8))
    with pytest.raises(ValueError, match="shape"):
        assign_concepts(features, labels[:3], (8, 8))
    with pytest.raises(ValueError):
        assign_concepts(features[0], labels, (8, 8))
    with pytest.raises(ValueError):
        assign_concepts(features, -labels - 1, (8, 8))
    with pytest.raises(TypeError):
        assign_concepts(features, labels.astype(np.float32), (8, 8))
    with pytest.raises(ValueError):
        assign_concepts(features, labels, (0, 8))


def loop_stats(mask: np.ndarray, k: int):
    area = np.zeros(k, np.int64)
    bbox = np.zeros((k, 4), np.int64)
    for label in range(k):
        ys, xs = np.nonzero(mask == label)
        area[label] = len(ys)
        if len(ys):
            bbox[label] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return area, bbox


@pytest.mark.parametrize("chunk_pixels", [1 << 22, 50, 1])
def test_segment_stats_equal_loop_version(monkeypatch, chunk_pixels):
    monkeypatch.setattr(assign, "_STATS_CHUNK_PIXELS", chunk_pixels)
    rng = np.random.default_rng(2)
    mask = np.zeros((31, 23), np.uint16)
    for label in range(1, 9):  # random rectangles, so boxes are not the whole image
        y, x = rng.integers(0, 25), rng.integers(0, 18)
        mask[y : y + rng.integers(1, 7), x : x + rng.integers(1, 6)] = label
    stats = segment_stats(mask, num_segments=11)  # labels 9 and 10 absent
    area, bbox = loop_stats(mask, 11)
    np.testing.assert_array_equal(stats.area, area)
    np.testing.assert_array_equal(stats.bbox, bbox)
    for label in range(11):
        if area[label]:
            x0, y0, x1, y1 = stats.bbox[label]
            crop = mask[y0:y1, x0:x1]
            assert (crop == label).sum() == area[label]  # exclusive x1, y1 crop holds the whole segment
    # label noise: a run of equal labels per pixel
    noise = rng.integers(0, 6, size=(17, 13))
    stats = segment_stats(noise, num_segments=7)
    area, bbox = loop_stats(noise, 7)
    np.testing.assert_array_equal(stats.area, area)
    np.testing.assert_array_equal(stats.bbox, bbox)


def test_segment_stats_default_k_and_errors():
    stats = segment_stats(np.array([[2, 2], [0, 2]]))
    np.testing.assert_array_equal(stats.area, [1, 0, 3])
    np.testing.assert_array_equal(stats.bbox, [[0, 1, 1, 2], [0, 0, 0, 0], [0, 0, 2, 2]])
    with pytest.raises(ValueError):
        segment_stats(np.array([[3]]), num_segments=2)
    with pytest.raises(TypeError):
        segment_stats(np.zeros((2, 2), np.float32))


@pytest.mark.parametrize("size", [(61, 47), (256, 256), (9, 5)])
def test_piecewise_constant_segments_equal_naive_upsampling(size):
    # Segments as regions (most output blocks lie inside one segment and are
    # filled without scoring), features with noise: the label of every pixel
    # must still be a naive argmax.
    rng = np.random.default_rng(size[0])
    h, w, c = 8, 8, 32
    labels = np.zeros((h, w), np.int64)
    labels[:, 4:] = 1
    labels[5:, 2:6] = 2
    features = rng.normal(size=(3, c))[labels] + 0.4 * rng.normal(size=(h, w, c))
    got = assign_concepts(features.astype(np.float32), labels, size)
    scores = naive_scores(features.astype(np.float32), labels, size)
    chosen = np.take_along_axis(scores, got[None].astype(np.int64), axis=0)[0]
    assert np.all(chosen >= scores.max(axis=0) - 1e-5)
    assert len(np.unique(got)) == 3


def test_segment_step_benchmark_smoke():
    # benchmarks/segment_step.py --quick: today's step against the frozen
    # baseline on two maps; it fails if the latent segments or the masks differ.
    import importlib.util
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = root / "benchmarks" / "segment_step.py"
    spec = importlib.util.spec_from_file_location("segment_step_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = subprocess.run(["git", "-C", str(root), "cat-file", "-e", f"{module.BASELINE_COMMIT}^{{commit}}"])
    if found.returncode != 0:
        pytest.skip(f"the baseline is built from git history: this checkout lacks commit {module.BASELINE_COMMIT}")
    assert module.main(["--quick"]) == 0
