"""Tools built on the job's output: label shards in, something new out.

rethreshold (re-cut from the stored split trees), discover (dataset-level classes),
export (COCO / PNG), gallery (HTML pages), visualize (colours and overlays),
training (a loader for training a segmenter on the labels).

Dependency direction: uses ``diffcut.method``, ``diffcut.job`` (schema, io, Ray
helpers) and ``diffcut.evaluation``; nothing but the CLI imports it.
"""
