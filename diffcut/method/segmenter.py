"""The whole DiffCut method on one machine: features, recursive NCut, assignment, refinement.

:func:`segment_features` is the CPU half (docs/method.md §2.2-2.5) and is what the
labeling job's CPU actors run; :class:`DiffCutSegmenter` adds the feature
extractor in front of it for ``diffcut segment``, the benchmarks and
notebooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffcut.method.assign import assign_concepts_and_embeddings
from diffcut.method.defaults import DEFAULT_ALPHA, DEFAULT_TAU
from diffcut.method.ncut import SplitTree, recursive_ncut


@dataclass
class SegmentationResult:
    """One image's segmentation.

    Attributes:
        latent_labels: (h, w) int32, one label per leaf of the split tree, at
            the feature grid's resolution.
        mask: (H', W') int32 label map at the requested output size, labels
            referring to the same segments as ``latent_labels``.
        tree: the split tree; ``tree.prune(tau')`` re-cuts for any tau' <= tau.
        embeddings: (K, c) float32 mean L2-normalized feature per segment.
    """

    latent_labels: np.ndarray
    mask: np.ndarray
    tree: SplitTree
    embeddings: np.ndarray

    @property
    def num_segments(self) -> int:
        return int(self.embeddings.shape[0])


def segment_features(
    features,
    mask_size: tuple[int, int] | None = None,
    *,
    tau: float = DEFAULT_TAU,
    alpha: float = DEFAULT_ALPHA,
    refine: bool = False,
    image: np.ndarray | None = None,
    exact_search: bool = False,
) -> SegmentationResult:
    """Segment one image from its diffusion features.

    Args:
        features: (h, w, c) feature map (numpy or torch, any float dtype).
        mask_size: (H', W') of the output label map; default the feature grid.
        tau: NCut threshold; a region is split while its best cut is < tau.
        alpha: exponent applied to the min-max scaled cosine affinity.
        refine: apply PAMR (docs/method.md §2.5) to the assigned mask; needs ``image``.
        image: (H', W', 3) RGB image at ``mask_size`` (uint8 or float in
            [0, 1]), used only by ``refine``.
        exact_search: search all sweep cuts of the Fiedler vector instead of
            the paper's 100 thresholds.
    """
    features = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features, dtype=np.float32)
    if features.ndim != 3:
        raise ValueError(f"features must be (h, w, c); got shape {features.shape}")
    latent_labels, tree = recursive_ncut(features, tau=tau, alpha=alpha, exact_search=exact_search, return_tree=True)
    size = tuple(mask_size) if mask_size is not None else features.shape[:2]
    mask, embeddings = assign_concepts_and_embeddings(features, latent_labels, size)
    if refine:
        if image is None:
            raise ValueError("refine=True needs the image at the mask size")
        if tuple(image.shape[:2]) != tuple(size):
            raise ValueError(f"image is {image.shape[:2]}, expected the mask size {size}")
        from diffcut.method.refine import refine_pamr

        mask = refine_pamr(image, mask)
    return SegmentationResult(
        latent_labels=np.asarray(latent_labels, dtype=np.int32),
        mask=np.asarray(mask, dtype=np.int32),
        tree=tree,
        embeddings=np.asarray(embeddings, dtype=np.float32),
    )


class DiffCutSegmenter:
    """Feature extraction plus :func:`segment_features`, for whole images.

    Example::

        extractor = FeatureExtractor.from_pretrained("segmind/SSD-1B", device="cuda", dtype=torch.float16)
        segmenter = DiffCutSegmenter(extractor, tau=0.5, alpha=10)
        results = segmenter.segment(pixels, mask_sizes=[(128, 128)] * len(pixels))
    """

    def __init__(
        self,
        extractor,
        tau: float = DEFAULT_TAU,
        alpha: float = DEFAULT_ALPHA,
        refine: bool = False,
        exact_search: bool = False,
    ):
        self.extractor = extractor
        self.tau = tau
        self.alpha = alpha
        self.refine = refine
        self.exact_search = exact_search

    def segment(
        self, pixels, mask_sizes: Sequence[tuple[int, int]] | None = None, images: Sequence[np.ndarray] | None = None
    ) -> list[SegmentationResult]:
        """Segment a batch.

        Args:
            pixels: float tensor (B, 3, H, W) in [0, 1], sides multiples of the
                extractor's stride.
            mask_sizes: output size per image; default (H, W) of ``pixels``.
            images: with ``refine``, the RGB image of each item at its mask
                size; default ``pixels`` resized to it.
        """
        features = self.extractor.extract(pixels).cpu().numpy()
        batch, _, height, width = pixels.shape
        sizes = list(mask_sizes) if mask_sizes is not None else [(height, width)] * batch
        if len(sizes) != batch:
            raise ValueError(f"{len(sizes)} mask sizes for a batch of {batch}")
        results = []
        for i in range(batch):
            image = None
            if self.refine:
                image = images[i] if images is not None else _resize_pixels(pixels[i], sizes[i])
            results.append(
                segment_features(
                    features[i],
                    sizes[i],
                    tau=self.tau,
                    alpha=self.alpha,
                    refine=self.refine,
                    image=image,
                    exact_search=self.exact_search,
                )
            )
        return results


def _resize_pixels(pixels, size: tuple[int, int]) -> np.ndarray:
    """(3, H, W) tensor in [0, 1] -> (H', W', 3) float32 array, bilinear."""
    import torch.nn.functional as F

    resized = F.interpolate(pixels[None].float().cpu(), size=tuple(size), mode="bilinear", align_corners=False)
    return resized[0].permute(1, 2, 0).clamp(0, 1).numpy()
