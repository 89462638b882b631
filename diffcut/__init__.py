"""diffcut: zero-shot pseudo-labels for whole image datasets with DiffCut.

DiffCut (Couairon et al., "DiffCut: Catalyzing Zero-Shot Semantic Segmentation
with Diffusion Features and Recursive Normalized Cut", NeurIPS 2024,
arXiv:2406.02842) segments an image by a recursive normalized cut over the
self-attention features of a diffusion UNet.

The public names below are imported lazily: ``import diffcut`` stays cheap and
does not pull torch, diffusers or Ray until a name that needs them is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "FeatureExtractor": "diffcut.features",
    "recursive_ncut": "diffcut.ncut",
    "SplitTree": "diffcut.ncut",
    "assign_concepts": "diffcut.assign",
    "segment_embeddings": "diffcut.assign",
    "refine_pamr": "diffcut.refine",
    "DiffCutSegmenter": "diffcut.segmenter",
    "SegmentationResult": "diffcut.segmenter",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'diffcut' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
