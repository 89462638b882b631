"""Memory of reading a WebDataset shard: streamed member by member, never the whole shard.

    python benchmarks/webdataset_memory.py [--members 400] [--member-kb 256]

Writes a shard of ``--members`` image members of ``--member-kb`` KB each (random bytes, so each
becomes an error row at its header check and decoding costs nothing) with a JSON member beside
each, then runs the job's read/decode stage on it (:func:`diffcut.job.stages.decode_stage`: the
shard streamed by :func:`diffcut.job.webdataset.read_shard_unit`, ``tarfile`` stream mode over the
fsspec file, records ordered ``--group`` at a time as ``--decode-batch-size`` sets it), and prints
the peak of Python-allocated memory (``tracemalloc``) during the stage, as a fraction of the
shard's size and in members, measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import tracemalloc
from pathlib import Path

from diffcut.job import inputs, webdataset
from diffcut.job.stages import decode_stage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=400)
    parser.add_argument("--member-kb", type=int, default=256)
    parser.add_argument("--group", type=int, default=32, help="records held together (--decode-batch-size)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        shard = Path(folder) / "00000.tar"

        def members():
            for i in range(args.members):
                yield f"{i:09d}.jpg", os.urandom(args.member_kb * 1024)
                yield f"{i:09d}.json", json.dumps({"key": f"{i:09d}"}).encode()

        webdataset.write_shard(shard, members())
        size = shard.stat().st_size
        units = webdataset.plan_shards([str(shard)]).units
        for group in (1, args.group):
            tracemalloc.start()
            count = 0
            for table in decode_stage(
                units,
                image_column="image",
                resolution=64,
                resize="bucket",
                stride=32,
                mask_size="original",
                max_image_pixels=inputs.DEFAULT_MAX_IMAGE_PIXELS,
                keep_image_bytes=False,
                chunk_rows=8,
                keep_metadata=True,
                sort_records=group,
            ):
                count += table.num_rows
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            print(
                f"records {group} at a time: {count} rows from a {size / 2**20:.1f} MiB shard, peak Python memory "
                f"{peak / 2**20:.1f} MiB = {peak / size:.3f} of the shard "
                f"({peak / (args.member_kb * 1024):.1f} members' worth)"
            )


if __name__ == "__main__":
    main()
