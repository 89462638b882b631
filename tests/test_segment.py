"""The whole method on one machine: segment_features, DiffCutSegmenter, `diffcut segment`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffcut.cli import main
from diffcut.method.features import FeatureExtractor
from diffcut.method.segmenter import DiffCutSegmenter, segment_features


def planted_features(height=12, width=16, channels=32, seed=0):
    """Left half, right-top and right-bottom quadrants with distinct directions plus noise."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((height, width), dtype=np.int32)
    truth[: height // 2, width // 2 :] = 1
    truth[height // 2 :, width // 2 :] = 2
    centers = rng.normal(size=(3, channels))
    features = centers[truth] + 0.05 * rng.normal(size=(height, width, channels))
    return features.astype(np.float32), truth


def same_partition(a, b) -> bool:
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def test_segment_features_recovers_planted_regions_at_any_size():
    features, truth = planted_features()
    result = segment_features(features, (48, 64), tau=0.5, alpha=10)
    assert same_partition(result.latent_labels, truth)
    assert result.mask.shape == (48, 64)
    upsampled_truth = np.kron(truth, np.ones((4, 4), dtype=np.int32))
    assert same_partition(result.mask, upsampled_truth)
    assert result.num_segments == 3
    assert result.embeddings.shape == (3, 32)
    assert np.array_equal(result.tree.prune(0.5), result.latent_labels)


def test_segment_features_refine_needs_matching_image():
    features, _ = planted_features()
    with pytest.raises(ValueError, match="needs the image"):
        segment_features(features, (24, 32), refine=True)
    with pytest.raises(ValueError, match="mask size"):
        segment_features(features, (24, 32), refine=True, image=np.zeros((10, 10, 3), np.uint8))
    image = np.zeros((24, 32, 3), np.uint8)
    image[:, 16:] = 255
    refined = segment_features(features, (24, 32), refine=True, image=image)
    assert refined.mask.shape == (24, 32)
    assert set(np.unique(refined.mask)) <= set(np.unique(refined.latent_labels))


@pytest.fixture(scope="module")
def tiny_extractor():
    return FeatureExtractor.from_pretrained("tiny-random")


def test_segmenter_batch(tiny_extractor):
    segmenter = DiffCutSegmenter(tiny_extractor, tau=0.6, alpha=5)
    pixels = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    results = segmenter.segment(pixels, mask_sizes=[(30, 40), (96, 128)])
    assert [r.mask.shape for r in results] == [(30, 40), (96, 128)]
    for result in results:
        assert result.latent_labels.shape == (3, 4)
        assert result.embeddings.shape == (result.num_segments, tiny_extractor.feature_dim)
        assert set(np.unique(result.mask)) <= set(range(result.num_segments))
    # The same image alone gives the same segmentation (no cross-talk within a batch).
    alone = segmenter.segment(pixels[1:], mask_sizes=[(96, 128)])[0]
    assert np.array_equal(alone.mask, results[1].mask)


def test_segment_command_writes_masks_at_image_size(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(images / "wide.png")
    Image.fromarray(rng.integers(0, 255, (90, 50, 3), dtype=np.uint8)).save(images / "tall.jpg")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            str(images / "wide.png"),
            str(images / "tall.jpg"),
            str(images / "broken.jpg"),
            "--out",
            str(out),
            "--model",
            "tiny-random",
            "--device",
            "cpu",
            "--resolution",
            "64",
        ]
    )
    assert code == 1  # one image failed, the others were written
    wide = np.asarray(Image.open(out / "wide.png"))
    tall = np.asarray(Image.open(out / "tall.png"))
    assert wide.shape == (70, 100) and tall.shape == (90, 50)
    overlay = np.asarray(Image.open(out / "wide_overlay.png"))
    assert overlay.shape == (70, 100, 3)
    assert not (out / "broken.png").exists()
