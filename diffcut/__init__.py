"""diffcut: zero-shot pseudo-labels for whole image datasets with DiffCut.

DiffCut (Couairon et al., "DiffCut: Catalyzing Zero-Shot Semantic Segmentation
with Diffusion Features and Recursive Normalized Cut", NeurIPS 2024,
arXiv:2406.02842) segments an image by a recursive normalized cut over the
self-attention features of a diffusion UNet.

The package is laid out by the parts of the system (docs/architecture.md):
``diffcut.method`` (DiffCut on arrays), ``diffcut.job`` (the Ray Data labeling
job and its output schema), ``diffcut.evaluation`` (mIoU protocol, benchmark
datasets), ``diffcut.tools`` (built on the job's output) and the CLI
(``diffcut.cli``, ``diffcut.commands``). Readers of the job's output use
``diffcut.schema`` (``read_labels``, ``decode_mask``, ``decode_tree``).

The public names below are imported lazily: ``import diffcut`` stays cheap and
does not pull torch, diffusers or Ray until a name that needs them is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "FeatureExtractor": "diffcut.method.features",
    "recursive_ncut": "diffcut.method.ncut",
    "SplitTree": "diffcut.method.ncut",
    "assign_concepts": "diffcut.method.assign",
    "segment_embeddings": "diffcut.method.assign",
    "refine_pamr": "diffcut.method.refine",
    "DiffCutSegmenter": "diffcut.method.segmenter",
    "SegmentationResult": "diffcut.method.segmenter",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'diffcut' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
