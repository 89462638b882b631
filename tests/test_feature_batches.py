"""The feature stage's batch work runs without Ray (the lent GPU machine has none): in a process
where ``import ray`` fails, on the tiny model, as the Ray stage and benchmarks/gpu_stage.py run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NO_RAY_SCRIPT = r"""
import json, sys
sys.modules["ray"] = None  # any `import ray` (ray.data too) now raises ImportError
sys.path.insert(0, sys.argv[1] + "/benchmarks")

import numpy as np
import pyarrow as pa
import torch

from diffcut.job.feature_batches import DECODED_SCHEMA, FeatureBatches
from diffcut.method.features import FeatureExtractor

try:
    import diffcut.job.dataflow  # noqa: F401
    guard = "ray importable"
except ImportError:
    guard = "ray blocked"

extractor = FeatureExtractor.from_pretrained("tiny-random")
batches = FeatureBatches(extractor, 2)
calls = []
extract = extractor.extract
extractor.extract = lambda pixels: calls.append(tuple(pixels.shape)) or extract(pixels)
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(64, 96, 3), (96, 64, 3), (64, 96, 3), (64, 96, 3)]]
rows = [dict(dict.fromkeys(DECODED_SCHEMA.names), image_id=str(i), source=str(i), status="ok", pixels=image.tobytes(),
             pixel_height=image.shape[0], pixel_width=image.shape[1]) for i, image in enumerate(images)]
rows.insert(1, dict(dict.fromkeys(DECODED_SCHEMA.names), image_id="bad", source="bad", status="error",
                   error="unreadable"))
out = batches(pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)).to_pylist()
extractor.extract = extract
errors = []
for row, image in zip([out[0]] + out[2:], images):
    got = np.frombuffer(row["features"], np.float16).reshape(row["feature_height"], row["feature_width"], -1)
    alone = extract(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0].to(torch.float16).numpy()
    errors.append(float(np.abs(got.astype(np.float32) - alone.astype(np.float32)).max()))

import gpu_stage
assert gpu_stage.main(["--smoke", "--job-stage", "0.3", "--batch-size", "auto", "--json", sys.argv[2]]) == 0
print(json.dumps({"guard": guard, "ray": sys.modules["ray"] is None, "calls": calls, "errors": errors,
                  "error_row": [out[1]["status"], out[1]["error"], out[1]["features"]]}))
"""


def test_feature_batches_and_the_gpu_benchmark_run_with_ray_unimportable(tmp_path):
    job_json = tmp_path / "job_stage.json"
    done = subprocess.run(
        [sys.executable, "-c", NO_RAY_SCRIPT, str(ROOT), str(job_json)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["guard"] == "ray blocked" and result["ray"]  # the Ray dataflow cannot import there; this can
    # Three 64x96 images in two calls of 2 (the second padded), the 96x64 one in a padded call of its own.
    assert sorted(map(tuple, result["calls"])) == [(2, 3, 64, 96), (2, 3, 64, 96), (2, 3, 96, 64)]
    assert max(result["errors"]) < 1e-2  # the same features as the extractor alone, to float16 rounding
    assert result["error_row"] == ["error", "unreadable", None]
    job = json.loads(job_json.read_text())
    assert job["images"] > 0 and job["errors"] == 0 and set(job["auto_batch_sizes"].values()) == {1}
