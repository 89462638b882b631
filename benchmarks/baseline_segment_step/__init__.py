"""FROZEN REFERENCE -- not library code; excluded from duplicate (twin) checks on purpose.

The segmentation step (recursive NCut with its split tree, concept assignment at
the mask size, descriptors, PNG masks, tree JSON) as it was at commit a58cb80,
before issue 11 made it faster: ``diffcut/ncut.py``, ``diffcut/assign.py``,
``diffcut/segmenter.py`` and ``diffcut/schema.py`` copied verbatim, only their
``from diffcut.X`` imports of each other made relative. It exists so that
``benchmarks/segment_step.py`` can time today's code against it in one run and
check that the labels stay the same. Never edit it to follow the library.
"""

from .schema import ok_row
from .segmenter import segment_features

__all__ = ["ok_row", "segment_features"]
