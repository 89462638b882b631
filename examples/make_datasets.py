"""The sample images in the layouts large datasets ship in, to try `diffcut label` on them.

    python examples/make_datasets.py --out out/datasets

writes, from ``samples/``:

* ``webdataset/00000.tar``, ``00001.tar``: WebDataset shards as img2dataset's
  ``--output_format webdataset`` writes them (``{key}.jpg|png``, ``{key}.json``,
  ``{key}.txt``), with its ``{shard}.parquet`` and ``{shard}_stats.json``
  sidecars beside them (not inputs of the job);
* ``img2dataset-parquet/00000.parquet``: img2dataset's ``--output_format
  parquet`` layout (``key``, ``url``, ``caption``, ``status``,
  ``error_message``, ``width``, ``height``, the image bytes in ``jpg``), with
  one failed download (a row with no image);
* ``hf/train.parquet``: a Hugging Face ``datasets`` dataset with an ``Image``
  feature, saved with ``Dataset.to_parquet``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffcut.job.webdataset import write_shard

REPO = Path(__file__).resolve().parents[1]


def sample_images() -> list[Path]:
    return sorted(p for p in (REPO / "samples").iterdir() if p.suffix in (".jpg", ".png"))


def img2dataset_rows(images: list[Path]) -> list[dict]:
    """One img2dataset-style row per image (key = shard number + index, 9 digits)."""
    from PIL import Image

    rows = []
    for index, path in enumerate(images):
        with Image.open(path) as image:
            width, height = image.size
        rows.append(
            {
                "key": f"{index:09d}",
                "url": f"https://example.com/{path.name}",
                "caption": path.stem,
                "status": "success",
                "error_message": None,
                "width": width,
                "height": height,
                "ext": path.suffix[1:],
                "data": path.read_bytes(),
            }
        )
    return rows


def make_webdataset(out: Path, rows: list[dict], per_shard: int = 4) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(rows), per_shard)):
        chunk = rows[start : start + per_shard]
        members = []
        for row in chunk:
            meta = {k: row[k] for k in ("key", "url", "caption", "status", "error_message", "width", "height")}
            members += [
                (f"{row['key']}.{row['ext']}", row["data"]),
                (f"{row['key']}.json", json.dumps(meta).encode()),
                (f"{row['key']}.txt", row["caption"].encode()),
            ]
        write_shard(out / f"{shard:05d}.tar", members)
        pq.write_table(
            pa.Table.from_pylist([{k: v for k, v in r.items() if k not in ("data", "ext")} for r in chunk]),
            out / f"{shard:05d}.parquet",
        )
        (out / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(chunk), "successes": len(chunk)}))


def make_img2dataset_parquet(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = [{**{k: v for k, v in r.items() if k not in ("data", "ext")}, "jpg": r["data"]} for r in rows]
    table.append(
        {
            "key": f"{len(rows):09d}",
            "url": "https://example.com/gone.jpg",
            "caption": "gone",
            "status": "failed_to_download",
            "error_message": "HTTP Error 404: Not Found",
            "width": None,
            "height": None,
            "jpg": None,
        }
    )
    pq.write_table(pa.Table.from_pylist(table), out / "00000.parquet")


def make_hf_dataset(out: Path, images: list[Path]) -> None:
    import datasets

    out.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")})
    # The encoded bytes, not file paths (or images opened from files): given those, to_parquet
    # stores only the path, which points back at this machine's files.
    data = {"image": [{"bytes": p.read_bytes(), "path": p.name} for p in images], "name": [p.stem for p in images]}
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(out / "train.parquet"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/datasets", help="folder to write the three datasets to")
    args = parser.parse_args(argv)
    out = Path(args.out)
    images = sample_images()
    rows = img2dataset_rows(images)
    make_webdataset(out / "webdataset", rows)
    make_img2dataset_parquet(out / "img2dataset-parquet", rows)
    make_hf_dataset(out / "hf", images)
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
