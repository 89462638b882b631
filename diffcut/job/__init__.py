"""The labeling job: a dataset of images in, one Parquet label file per input unit out, on Ray Data.

inputs (URIs, filesystems, listing and decoding inputs), webdataset (tar-shard
input), schema (the output format, defined once; ``read_labels``), settings (a
run's settings as frozen dataclasses), preflight (what is checked before a run
starts), lease (one run per output), units and writer (the output's layout: one
label file and one done record per input unit), pipeline (the Ray Data stages,
resume, ``label_dataset``).

Dependency direction: uses ``diffcut.method``; never imports ``diffcut.tools``,
``diffcut.evaluation`` or the CLI. Ray begins and ends here (``pipeline``).
"""
