"""Benchmark: the segmentation actor's whole step per image, today's code against the frozen baseline.

The step is what ``diffcut.job.stages.SegmentStage`` does for one ok row:
``diffcut.method.segmenter.segment_features`` (recursive NCut with its split tree,
concept assignment at the mask size, descriptors) + ``diffcut.job.schema.ok_row``
(PNG masks, per-segment areas and boxes, tree JSON). The baseline is the same
step as it was before issue 11, at commit a58cb80, built from git history when
the benchmark starts: the ``diffcut/*.py`` files of that commit (``git show
a58cb80:diffcut/...``) are written into a temporary folder as the package
``diffcut_a58cb80``, their ``diffcut`` imports renamed to match, so the baseline
imports only its own modules and never the live package.
The benchmark needs a clone that holds that commit (not a shallow one).

Maps: SSD-1B-shaped 32x32x1280 features rounded through float16 (as they cross
the pipeline), built by ``infra/measure_ncut_time.py``'s rule: ``--regions``
areas with a random direction each plus noise, and i.i.d. normal features (the
pathological map: the cut goes down to single cells). Masks at ``--mask`` ² .
One thread (BLAS, OpenMP, torch). Both implementations run on every map in one
process, alternating; times are ``time.thread_time`` (CPU seconds of this
thread), medians per image. The labels are compared on every map: latent
segments must be identical; the mask must equal the baseline's and the
definition's (docs/method.md §2.4, float64) on every pixel that is not a tie (the
best two float64 scores within ``TIE``).

A per-part profile (same thread CPU clock) follows for both.

    python benchmarks/segment_step.py                    # 16 and 32 regions (10 maps each) + 2 noise maps
    python benchmarks/segment_step.py --quick            # smoke run: 2 maps of 16 regions, mask 256
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent / "infra"))

from measure_ncut_time import random_features, structured_features  # noqa: E402

from diffcut.job import schema  # noqa: E402
from diffcut.method import assign, ncut, segmenter  # noqa: E402

#: Two float64 scores closer than this count as a tie (float32 scores carry ~1e-7 rounding).
TIE = 1e-5

#: The commit before issue 11 made the step faster: the baseline, imported under its own package name.
BASELINE_COMMIT = "a58cb80"
BASELINE_PACKAGE = "diffcut_a58cb80"

CURRENT = dict(
    name="diffcut", step=segmenter.segment_features, ok_row=schema.ok_row, ncut=ncut, assign=assign, schema=schema
)


def baseline_impl(into: Path) -> dict:
    """The step at ``BASELINE_COMMIT``: its ``diffcut/*.py`` written from git into ``into`` as the package
    ``BASELINE_PACKAGE`` (``into`` is on ``sys.path``), every ``diffcut`` import in them renamed so that none
    reaches the live package."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(_HERE.parent), *args], check=True, capture_output=True, text=True
        ).stdout

    import_line = re.compile(r"^(\s*)(from|import) diffcut\b", re.M)
    for name in git("ls-tree", "-r", "--name-only", BASELINE_COMMIT, "--", "diffcut").split():
        if name.endswith(".py"):
            target = into / BASELINE_PACKAGE / Path(name).relative_to("diffcut")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(import_line.sub(rf"\1\2 {BASELINE_PACKAGE}", git("show", f"{BASELINE_COMMIT}:{name}")))
    modules = {
        name: importlib.import_module(f"{BASELINE_PACKAGE}.{name}")
        for name in ("segmenter", "schema", "ncut", "assign")
    }
    return dict(
        name="baseline",
        step=modules["segmenter"].segment_features,
        ok_row=modules["schema"].ok_row,
        ncut=modules["ncut"],
        assign=modules["assign"],
        schema=modules["schema"],
    )


def whole_step(impl: dict, features: np.ndarray, mask_size: tuple[int, int]) -> tuple[float, dict, object]:
    """(thread CPU seconds, the output row, the SegmentationResult) of one step."""
    start = time.thread_time()
    result = impl["step"](features, mask_size, tau=0.5, alpha=10.0)
    row = impl["ok_row"](
        image_id="x",
        source="x",
        width=mask_size[1],
        height=mask_size[0],
        mask=result.mask,
        latent_labels=result.latent_labels,
        descriptors=result.embeddings,
        tree=result.tree.to_dict(),
        params="{}",
    )
    return time.thread_time() - start, row, result


def profile_parts(impl: dict, features: np.ndarray, mask_size: tuple[int, int]) -> dict:
    """Thread CPU seconds of each part of the step, called one by one."""
    parts = {}

    def timed(name, call):
        start = time.thread_time()
        value = call()
        parts[name] = time.thread_time() - start
        return value

    cells = features.reshape(-1, features.shape[-1])
    timed("affinity", lambda: impl["ncut"].affinity_matrix(cells, 10.0))
    labels, tree = timed(
        "recursive_ncut (incl. affinity)", lambda: impl["ncut"].recursive_ncut(features, 0.5, 10.0, return_tree=True)
    )
    mask = timed("assign_concepts", lambda: impl["assign"].assign_concepts(features, labels, mask_size))
    embeddings = timed("descriptors", lambda: impl["assign"].segment_embeddings(features, labels))
    timed("mask PNG", lambda: impl["schema"].encode_mask(mask))
    timed("latent PNG", lambda: impl["schema"].encode_mask(labels))
    timed("areas + boxes", lambda: impl["schema"].segments_column(mask, embeddings))
    timed("tree JSON", lambda: json.dumps(tree.to_dict(), separators=(",", ":")))
    parts["recursion (ncut - affinity)"] = parts["recursive_ncut (incl. affinity)"] - parts["affinity"]
    return parts


def reference_disagreements(features: np.ndarray, latent: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
    """(pixels whose label is not a float64 argmax of §2.4, of those not a tie within TIE).

    Float64 scores ``<U(f)(p), e_k>``, computed (U being linear) as the bilinear
    resampling (``F.interpolate``, half-pixel centres) of the K latent similarity maps, in row tiles.
    """
    f = torch.from_numpy(features).double()
    f = f / f.norm(dim=-1, keepdim=True)
    flat = torch.from_numpy(latent.reshape(-1)).long()
    k = int(flat.max()) + 1
    sums = torch.zeros(k, f.shape[-1], dtype=torch.float64).index_add_(0, flat, f.reshape(-1, f.shape[-1]))
    embeddings = sums / torch.bincount(flat, minlength=k).double()[:, None]
    maps = torch.einsum("hwc,kc->khw", f, embeddings)[None]
    out_h, out_w = mask.shape
    wrong = not_tie = 0
    step = max(1, (1 << 24) // (k * out_w))
    for start in range(0, out_h, step):
        stop = min(out_h, start + step)
        scores = _rows_of_interpolation(maps[0], out_h, out_w, start, stop)
        top = scores.max(dim=0).values
        chosen = scores.gather(0, torch.from_numpy(mask[start:stop]).long()[None])[0]
        bad = chosen < top
        wrong += int(bad.sum())
        not_tie += int((bad & (chosen < top - TIE)).sum())
    return wrong, not_tie


def _rows_of_interpolation(maps: torch.Tensor, out_h: int, out_w: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of ``F.interpolate(maps, (out_h, out_w), bilinear, align_corners=False)``, float64."""
    h, w = maps.shape[1:]

    def index(out, size):
        src = ((torch.arange(out, dtype=torch.float64) + 0.5) * size / out - 0.5).clamp(min=0)
        i0 = src.floor().long().clamp(max=size - 1)
        return i0, (i0 + 1).clamp(max=size - 1), src - i0

    y0, y1, wy = index(out_h, h)
    x0, x1, wx = index(out_w, w)
    y0, y1, wy = y0[start:stop], y1[start:stop], wy[start:stop]
    top = maps[:, y0] * (1 - wy)[None, :, None] + maps[:, y1] * wy[None, :, None]
    return top[:, :, x0] * (1 - wx) + top[:, :, x1] * wx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", default="16,32", help="structured maps, comma-separated region counts")
    parser.add_argument("--repeats", type=int, default=10, help="maps per region count")
    parser.add_argument("--noise-maps", type=int, default=2, help="i.i.d. normal maps (pathological)")
    parser.add_argument("--mask", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 maps of 16 regions at mask 256, no noise map")
    parser.add_argument("--no-reference", action="store_true", help="skip the float64 check of the masks")
    args = parser.parse_args(argv)
    if args.quick:
        args.regions, args.repeats, args.noise_maps, args.mask = "16", 2, 0, 256
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="segment-step-baseline-") as folder:
        sys.path.insert(0, folder)
        try:
            return run(args, baseline_impl(Path(folder)))
        finally:  # the process (a test calls main) keeps no trace of the baseline
            sys.path.remove(folder)
            for name in [name for name in sys.modules if name.split(".")[0] == BASELINE_PACKAGE]:
                del sys.modules[name]


def run(args: argparse.Namespace, baseline: dict) -> int:
    rng = np.random.default_rng(args.seed)
    mask_size = (args.mask, args.mask)
    cases = [
        (f"{r} regions", [structured_features(rng, 32, 1280, int(r), 0.5) for _ in range(args.repeats)])
        for r in args.regions.split(",")
        if r
    ]
    if args.noise_maps:
        cases.append(("i.i.d. noise", [random_features(rng, 32, 1280) for _ in range(args.noise_maps)]))
    print(
        f"features 32x32x1280 (float16-rounded), mask {args.mask}x{args.mask}, one thread, "
        f"thread CPU seconds per image; torch {torch.__version__}, numpy {np.__version__}"
    )
    for impl in (baseline, CURRENT):  # warm-up (imports, first-call costs)
        whole_step(impl, cases[0][1][0], mask_size)

    failures = 0
    summary = []
    for name, maps in cases:
        times = {"baseline": [], "diffcut": []}
        parts = {"baseline": [], "diffcut": []}
        segments, same_latent, mask_diff, png_bytes = [], 0, 0, {"baseline": 0, "diffcut": 0}
        ref_wrong = ref_not_tie = 0
        for features in maps:
            outputs = {}
            for impl in (baseline, CURRENT):
                seconds, row, result = whole_step(impl, features, mask_size)
                times[impl["name"]].append(seconds)
                outputs[impl["name"]] = (row, result)
                png_bytes[impl["name"]] += len(row["mask"])
            for impl in (baseline, CURRENT):
                parts[impl["name"]].append(profile_parts(impl, features, mask_size))
            (_, old), (row, new) = outputs["baseline"], outputs["diffcut"]
            segments.append(new.num_segments)
            same = np.array_equal(old.latent_labels, new.latent_labels)
            same_latent += same
            if same:
                mask_diff += int((old.mask != new.mask).sum())
            if not args.no_reference:
                wrong, not_tie = reference_disagreements(features, new.latent_labels, new.mask)
                ref_wrong += wrong
                ref_not_tie += not_tie
            decoded = schema.decode_mask(row["mask"])
            if not np.array_equal(decoded, new.mask):
                failures += 1
                print(f"FAIL: {name}: the mask PNG does not decode to the mask", file=sys.stderr)
        old_median = statistics.median(times["baseline"])
        new_median = statistics.median(times["diffcut"])
        ratio = sum(times["baseline"]) / sum(times["diffcut"])
        print(
            f"\n== {name}: {len(maps)} maps, segments {min(segments)}-{max(segments)} "
            f"(median {statistics.median(segments):g})"
        )
        print(
            f"whole step: baseline {old_median:.4f} s, diffcut {new_median:.4f} s median per image; "
            f"ratio {ratio:.2f}x (sum over maps)"
        )
        print(
            f"labels: latent segments identical on {same_latent}/{len(maps)} maps; mask pixels differing "
            f"from the baseline: {mask_diff} of {len(maps) * args.mask**2}; "
            + (
                ""
                if args.no_reference
                else f"not a float64 argmax of §2.4: {ref_wrong} ({ref_not_tie} not ties within {TIE:g})"
            )
        )
        print(
            f"mask PNG bytes per image: baseline {png_bytes['baseline'] / len(maps):.0f}, "
            f"diffcut {png_bytes['diffcut'] / len(maps):.0f}"
        )
        print(f"{'part (median s)':<34}{'baseline':>10}{'diffcut':>10}")
        for part in parts["baseline"][0]:
            old_part = statistics.median(p[part] for p in parts["baseline"])
            new_part = statistics.median(p[part] for p in parts["diffcut"])
            print(f"{part:<34}{old_part:>10.4f}{new_part:>10.4f}")
        summary.append(f"{name}: {new_median:.4f} s vs {old_median:.4f} s, {ratio:.2f}x")
        failures += (same_latent != len(maps)) + (ref_not_tie > 0)
    print("\nsummary (diffcut vs baseline, whole step per image): " + "; ".join(summary))
    if failures:
        print("FAIL: labels differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
