"""Cost of the PNG completeness check (issue 27): ``decode_image`` with and without
:func:`diffcut.job.images.check_png_complete`, on the photo-like PNGs of ``benchmarks/decode.py``.

The check verifies every chunk's CRC and the IEND chunk; it inflates the image data a second time
to count its bytes (PIL leaves missing rows at zero and reports nothing) only when the decoded
last row is all zeros or the PNG is interlaced. ``check_ms`` is the check with that inflate
(a PNG with a black last row), ``decode_ms`` the job's decode of these photo-like PNGs. Each case is timed
with and without the check, interleaved, ``--repeats`` times; the minimum of each is reported
(this machine is shared: the minimum is the least disturbed run).

    python benchmarks/png_check.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.decode import SOURCES, encode, photo_like
from diffcut.job import images


def _seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--resolution", type=int, default=1024)
    args = parser.parse_args(argv)
    checked = images.check_png_complete
    rows = []
    for width, height in SOURCES:
        data = encode(photo_like(width, height), "png")
        size = lambda w, h: images.model_size(w, h, args.resolution)  # noqa: E731
        times = {"check": [], "with": [], "without": []}
        for _ in range(args.repeats):
            times["check"].append(_seconds(lambda data=data: checked(data)))
            times["with"].append(_seconds(lambda data=data, size=size: images.decode_image(data, size)))
            images.check_png_complete = lambda data, **options: None
            try:
                times["without"].append(_seconds(lambda data=data, size=size: images.decode_image(data, size)))
            finally:
                images.check_png_complete = checked
        best = {name: min(values) for name, values in times.items()}
        rows.append(
            {
                "source": f"{width}x{height}",
                "bytes": len(data),
                "check_ms": round(best["check"] * 1e3, 1),
                "decode_ms": round(best["with"] * 1e3, 1),
                "decode_without_check_ms": round(best["without"] * 1e3, 1),
                "ratio": round(best["with"] / best["without"], 2),
            }
        )
        print(rows[-1], flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
