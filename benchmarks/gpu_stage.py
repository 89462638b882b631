"""The GPU stage alone: feature extraction throughput of SSD-1B and SDXL, per part, per setting.

Builds the SSD-1B and SDXL-base UNets and the SDXL VAE from their published
configs (``benchmarks/architectures.py``, sources there) with random weights
directly on the device (no download), wraps them in the job's own
:class:`diffcut.method.features.FeatureExtractor` (truncated forward, modules after
the feature released) and times, for every model x dtype x compile x input
size x batch size:

- host->device copy of the uint8 batch (pinned memory, as the feature actor),
- VAE encoder, UNet to the feature, device->host copy of the float16 features,

with CUDA events, and reports images/s, ms per part per call, achieved
TFLOP/s from the FLOPs counted on the meta device (``torch.utils.flop_counter``,
as benchmarks/flops.py), its share of the device's dense peak, and the peak
GPU memory. Sizes: 1024x1024 and three aspect buckets (4:3, 3:4, 16:9 at about
1024^2 pixels, ``diffcut.job.inputs.bucket_size``). Batch sizes 1, 2, 4, ... 32 (stops
at the first out-of-memory). The sweep runs in priority order and stops
starting new settings once ``--time-limit`` seconds are spent (skipped ones
are listed), so one command fits a device session.

    python benchmarks/gpu_stage.py --json out/gpu_stage.json          # on a GPU, ~7 min
    python benchmarks/gpu_stage.py --smoke --json /tmp/smoke.json     # tiny model on CPU, seconds
    python benchmarks/gpu_stage.py --meta-check                       # the published architectures, no weights

Timings on CPU (``--smoke``) only prove the script runs; they say nothing
about a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from architectures import SDXL_UNET, SDXL_VAE, SSD1B_UNET

from diffcut.job.inputs import bucket_size
from diffcut.method.features import ExtractorConfig, FeatureExtractor
from diffcut.method.unet import set_attention_kernel

ARCHITECTURES = {"ssd-1b": SSD1B_UNET, "sdxl": SDXL_UNET}

#: Dense tensor-core peak (TFLOP/s, float16 / bfloat16, no sparsity), NVIDIA datasheets.
DENSE_PEAK_TFLOPS = {
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
}


def device_peak_tflops(name: str) -> float | None:
    for key in sorted(DENSE_PEAK_TFLOPS, key=len, reverse=True):
        if all(part in name for part in key.split()):
            return DENSE_PEAK_TFLOPS[key]
    if "H100" in name:
        return DENSE_PEAK_TFLOPS["H100 SXM"]
    return None


def input_sizes(resolution: int) -> list[tuple[str, int, int]]:
    """(name, height, width): the square paper size and three aspect buckets."""
    sizes = [("square", resolution, resolution)]
    for name, (w, h) in (("4:3", (4, 3)), ("3:4", (3, 4)), ("16:9", (16, 9))):
        width, height = bucket_size(w * 1000, h * 1000, resolution)
        sizes.append((name, height, width))
    return sizes


def build_extractor(architecture: str, device: torch.device, dtype: torch.dtype, compile: bool) -> FeatureExtractor:
    """Random-weight extractor of a published architecture, built on ``device``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    config = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel(**config).to(dtype).eval()
        vae_dtype = torch.float32 if dtype == torch.float16 and SDXL_VAE["force_upcast"] else dtype
        vae = AutoencoderKL(**SDXL_VAE).to(vae_dtype).eval()
        pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        prompt = torch.randn(1, 77, config["cross_attention_dim"], dtype=dtype)
        pooled = torch.randn(1, pooled_dim, dtype=dtype)
    set_attention_kernel([unet, vae], "sdpa")
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing"
    )
    extractor = FeatureExtractor(
        vae,
        unet,
        scheduler,
        prompt,
        pooled,
        ExtractorConfig(model=architecture, vae_dtype=str(vae_dtype)),
        device,
        dtype,
        compile=compile,
    )
    extractor._release_modules_after_feature()
    return extractor


def flops_per_image(unet_config: dict, vae_config: dict, height: int, width: int) -> dict:
    """FLOPs of one image: VAE encoder and UNet to the feature, counted on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        prompt = torch.empty(1, 77, unet_config["cross_attention_dim"])
        pooled = (
            torch.empty(
                1, unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
            )
            if unet_config.get("addition_embed_type") == "text_time"
            else None
        )
    family = "sdxl" if pooled is not None else "sd"
    extractor = FeatureExtractor(
        vae, unet, None, prompt, pooled, ExtractorConfig(model="meta", family=family), meta, torch.float32
    )
    latent = torch.empty(1, 4, height // 8, width // 8, device=meta)
    timesteps = torch.full((1,), 50, dtype=torch.long, device=meta)
    pixels = torch.empty(1, 3, height, width, device=meta)
    counts = {}
    for name, fn in (
        ("vae_encoder", lambda: extractor.encode(pixels)),
        ("unet_to_feature", lambda: extractor.unet_features(latent, timesteps, height, width)),
    ):
        with FlopCounterMode(display=False) as counter:
            fn()
        counts[name] = counter.get_total_flops()
    return counts


class PartTimer:
    """Milliseconds per named part: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def parts(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        result = {}
        for (_, start), (name, end) in zip(self.marks, self.marks[1:]):
            result[name] = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
        return result


def timed_call(extractor: FeatureExtractor, host_batch: torch.Tensor) -> dict:
    """One feature call as the job's feature actor makes it, ms per part."""
    timer = PartTimer(extractor.device)
    timer.mark("start")
    pixels = host_batch.to(extractor.device, non_blocking=True)
    timer.mark("copy_in_ms")
    with torch.inference_mode():
        pixels = pixels.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        latent = extractor.encode(pixels).float()
        timer.mark("vae_ms")
        batch, _, height, width = pixels.shape
        noise = extractor.noise(latent.shape[-2], latent.shape[-1]).expand_as(latent)
        timesteps = torch.full((batch,), extractor.config.timestep, dtype=torch.long, device=extractor.device)
        noisy = extractor.scheduler.add_noise(latent, noise, timesteps).to(extractor.dtype)
        features = extractor.unet_features(noisy, timesteps, height, width).to(torch.float16)
        timer.mark("unet_ms")
    out = torch.empty(features.shape, dtype=torch.float16, pin_memory=extractor.device.type == "cuda")
    out.copy_(features, non_blocking=True)
    timer.mark("copy_out_ms")
    return timer.parts()


def measure(
    extractor, height: int, width: int, batch: int, *, repeats: int, min_seconds: float, warmups: int = 2
) -> dict:
    """Median ms per part over ``repeats`` calls (more while under ``min_seconds``), after ``warmups`` calls
    (the first compiles with ``compile``; its time is reported as ``warmup_s``)."""
    cuda = extractor.device.type == "cuda"
    host = torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8)
    if cuda:
        host = host.pin_memory()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(warmups):
        timed_call(extractor, host)
    warm_seconds = time.perf_counter() - started
    samples = []
    started = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - started < min_seconds and len(samples) < 50):
        samples.append(timed_call(extractor, host))
    parts = {name: sorted(s[name] for s in samples)[len(samples) // 2] for name in samples[0]}
    total_ms = sum(parts.values())
    return {
        **{k: round(v, 3) for k, v in parts.items()},
        "call_ms": round(total_ms, 3),
        "images_per_s": round(batch / total_ms * 1e3, 3),
        "calls_timed": len(samples),
        "warmup_s": round(warm_seconds, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
    }


def sweep(
    settings,
    *,
    device,
    resolution,
    batches,
    time_limit,
    repeats,
    min_seconds,
    warmups=2,
    log=print,
    compile_batches=None,
    on_row=None,
):
    """Run ``settings`` [(architecture, dtype name, compile)] in order; returns (rows, skipped).

    A setting that fails (say, no compiler for ``compile``) is one error row; the next one runs.
    """
    started = time.perf_counter()
    rows, skipped = [], []
    peak = device_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    flop_cache: dict = {}

    def run_setting(architecture, dtype_name, compile):
        dtype = getattr(torch, dtype_name)
        torch._dynamo.reset()
        extractor = (
            build_extractor(architecture, device, dtype, compile)
            if architecture in ARCHITECTURES
            else FeatureExtractor.from_pretrained(architecture, device=device, dtype=dtype, compile=compile)
        )
        unet_config = dict(extractor.unet.config)
        for size_name, height, width in input_sizes(resolution):
            key = (architecture, height, width)
            if key not in flop_cache:
                vae_config = dict(extractor.vae.config)
                flop_cache[key] = flops_per_image(
                    _constructor_args(unet_config), _constructor_args(vae_config), height, width
                )
            flops = flop_cache[key]
            # Batch is a static dimension (the job pads every call to its batch size): each
            # batch size compiles once, so compiled settings time a few batch sizes only.
            for batch in (compile_batches or batches) if compile else batches:
                if time.perf_counter() - started > time_limit:
                    skipped.append(
                        {
                            "model": architecture,
                            "dtype": dtype_name,
                            "compile": compile,
                            "size": size_name,
                            "batch": batch,
                        }
                    )
                    break
                try:
                    result = measure(
                        extractor, height, width, batch, repeats=repeats, min_seconds=min_seconds, warmups=warmups
                    )
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append(
                        {
                            "model": architecture,
                            "dtype": dtype_name,
                            "compile": compile,
                            "size": size_name,
                            "height": height,
                            "width": width,
                            "batch": batch,
                            "error": "out of memory",
                        }
                    )
                    break
                per_image = flops["vae_encoder"] + flops["unet_to_feature"]
                achieved = per_image * result["images_per_s"] / 1e12
                row = {
                    "model": architecture,
                    "dtype": dtype_name,
                    "vae_dtype": extractor.config.vae_dtype,
                    "compile": compile,
                    "size": size_name,
                    "height": height,
                    "width": width,
                    "batch": batch,
                    **result,
                    "flop_per_image": per_image,
                    "tflop_per_image": round(per_image / 1e12, 4),
                    "vae_tflop_per_image": round(flops["vae_encoder"] / 1e12, 4),
                    "achieved_tflops": round(achieved, 2),
                    "share_of_peak": round(achieved / peak, 4) if peak else None,
                }
                rows.append(row)
                log(format_row(row))
                if on_row is not None:
                    on_row(rows, skipped)

    for architecture, dtype_name, compile in settings:
        if time.perf_counter() - started > time_limit:
            skipped.append({"model": architecture, "dtype": dtype_name, "compile": compile})
            continue
        try:
            run_setting(architecture, dtype_name, compile)
        except Exception as error:  # noqa: BLE001 - one broken setting must not end a one-shot device run
            traceback.print_exc()
            rows.append(
                {
                    "model": architecture,
                    "dtype": dtype_name,
                    "compile": compile,
                    "error": f"{type(error).__name__}: {error}"[:500],
                }
            )
            log(f"{architecture} {dtype_name} compile={compile}: failed, {type(error).__name__}: {error}"[:300])
            if on_row is not None:
                on_row(rows, skipped)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, skipped


def _constructor_args(config: dict) -> dict:
    """A diffusers config as constructor arguments (without the bookkeeping keys)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


HEADER = (
    f"{'model':<8} {'dtype':<9} {'vae':<9} {'comp':<5} {'size':<7} {'HxW':<10} {'b':>3} {'img/s':>8} "
    f"{'in ms':>7} {'vae ms':>8} {'unet ms':>8} {'out ms':>7} {'TFLOP/s':>8} {'peak%':>6} {'GiB':>6}"
)


def format_row(row: dict) -> str:
    share = f"{100 * row['share_of_peak']:.1f}" if row.get("share_of_peak") is not None else "-"
    gib = f"{row['peak_gib']:.1f}" if row.get("peak_gib") is not None else "-"
    return (
        f"{row['model']:<8} {row['dtype']:<9} {row['vae_dtype']:<9} {str(row['compile']):<5} {row['size']:<7} "
        f"{row['height']}x{row['width']:<5} {row['batch']:>3} {row['images_per_s']:>8.2f} "
        f"{row['copy_in_ms']:>7.2f} {row['vae_ms']:>8.2f} {row['unet_ms']:>8.2f} {row['copy_out_ms']:>7.2f} "
        f"{row['achieved_tflops']:>8.1f} {share:>6} {gib:>6}"
    )


def job_stage(extractor: FeatureExtractor, seconds: float, batch_size, resolution: int) -> dict:
    """The labeling job's feature actor's batch work (:class:`diffcut.job.feature_batches.FeatureBatches`,
    what :class:`diffcut.job.stages.FeatureStage` runs, without Ray) on synthetic decoded rows, bucket
    sizes mixed and grouped as decode_stage hands them over, for ``seconds``."""
    import numpy as np
    import pyarrow as pa

    from diffcut.job.feature_batches import DECODED_SCHEMA, FeatureBatches

    stage = FeatureBatches(extractor, batch_size)
    rng = np.random.default_rng(0)
    rows_per_table = 4 * (8 if batch_size == "auto" else int(batch_size))
    tables = []
    for _, height, width in input_sizes(resolution):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8).tobytes()
        rows = [
            dict(
                dict.fromkeys(DECODED_SCHEMA.names),
                image_id=str(i),
                source=str(i),
                status="ok",
                pixels=image,
                pixel_height=height,
                pixel_width=width,
            )
            for i in range(rows_per_table)
        ]
        tables.append(pa.Table.from_pylist(rows, schema=DECODED_SCHEMA))
    for table in tables:  # warm-up: compilation, cuDNN autotuning, auto batch search
        stage(table)
    images, errors, started, loop_start = 0, 0, time.perf_counter(), time.time()
    while time.perf_counter() - started < seconds:
        out = stage(tables[images // rows_per_table % len(tables)])
        images += out.num_rows
        errors += sum(status != "ok" for status in out.column("status").to_pylist())
    elapsed = time.perf_counter() - started
    return {
        "images": images,
        "errors": errors,
        "seconds": round(elapsed, 2),
        "loop_start_unix": loop_start,
        "loop_end_unix": time.time(),
        "images_per_s": round(images / elapsed, 3),
        "batch_size": batch_size,
        "auto_batch_sizes": {f"{h}x{w}": b for (h, w), b in extractor._auto_batch.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ssd-1b,sdxl")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--compile", default="off,on", help="off, on, or off,on")
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--compile-batches", default="8,16", help="batch sizes timed with compile on")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument(
        "--time-limit",
        type=float,
        default=420.0,
        help="seconds after which no new setting starts (the running one finishes)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.5, help="time each setting at least this long")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument(
        "--job-stage",
        type=float,
        metavar="SECONDS",
        help="instead of the sweep: the job's feature actor on synthetic images for SECONDS "
        "(first of --models / --dtypes; --compile on/off; --batch-size)",
    )
    parser.add_argument("--batch-size", default="8", help="with --job-stage: an integer or auto")
    parser.add_argument(
        "--meta-check",
        action="store_true",
        help="build the published architectures of --models as the sweep does, on the meta device "
        "(no weights, no GPU), and count their FLOPs at --resolution: checks that the installed "
        "diffusers and torch take them (benchmarks/device_run.sh --rehearse)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny-random model on CPU, float32, 64x64 buckets, batch 1-2: checks the script",
    )
    args = parser.parse_args(argv)
    if args.meta_check:
        for architecture in args.models.split(","):
            extractor = build_extractor(architecture, torch.device("meta"), torch.float16, compile=False)
            flops = flops_per_image(
                _constructor_args(dict(extractor.unet.config)),
                _constructor_args(dict(extractor.vae.config)),
                args.resolution,
                args.resolution,
            )
            print(
                json.dumps(
                    {
                        "model": architecture,
                        "feature_module": extractor.feature_module_name,
                        "feature_dim": extractor.feature_dim,
                        "stride": extractor.stride,
                        "resolution": args.resolution,
                        **flops,
                    }
                ),
                flush=True,
            )
        return 0
    if args.smoke:
        device = torch.device("cpu")
        settings = [("tiny-random", "float32", False)]
        resolution, batches, repeats, min_seconds, warmups = 64, [1, 2], 1, 0.0, 1
    else:
        if not torch.cuda.is_available():
            print("gpu_stage.py: no CUDA device (use --smoke on CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True  # the float32 VAE under float16 (tf32 option)
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        compile_values = [value == "on" for value in args.compile.split(",")]
        # Priority order: what the job runs by default first, then the alternatives.
        settings = [
            (model, dtype, compile)
            for compile in compile_values
            for model in args.models.split(",")
            for dtype in args.dtypes.split(",")
        ]
        resolution, batches = args.resolution, [int(b) for b in args.batches.split(",")]
        repeats, min_seconds, warmups = args.repeats, args.min_seconds, 2
    started = time.time()
    if args.job_stage is not None:
        architecture, dtype_name, compile = settings[0]
        dtype = getattr(torch, dtype_name)
        extractor = (
            build_extractor(architecture, device, dtype, compile)
            if architecture in ARCHITECTURES
            else FeatureExtractor.from_pretrained(architecture, device=device, dtype=dtype, compile=compile)
        )
        batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
        result = {
            "model": architecture,
            "dtype": dtype_name,
            "compile": compile,
            "resolution": resolution,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            **job_stage(extractor, args.job_stage, batch_size, resolution),
        }
        print(json.dumps(result))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    print(HEADER, flush=True)

    def report_of(rows, skipped):
        return {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "peak_dense_tflops": (
                device_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
            ),
            "torch": torch.__version__,
            "command": " ".join(["python", "benchmarks/gpu_stage.py", *(argv if argv is not None else sys.argv[1:])]),
            "seconds": round(time.time() - started, 1),
            "rows": rows,
            "skipped": skipped,
        }

    def write(rows, skipped):  # after every row: a run killed by a time limit keeps what it measured
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report_of(rows, skipped), indent=1))

    rows, skipped = sweep(
        settings,
        device=device,
        resolution=resolution,
        batches=batches,
        time_limit=args.time_limit,
        repeats=repeats,
        min_seconds=min_seconds,
        warmups=warmups,
        log=lambda line: print(line, flush=True),
        on_row=write,
        compile_batches=None if args.smoke else [int(b) for b in args.compile_batches.split(",")],
    )
    write(rows, skipped)
    best = max(
        (r for r in rows if "images_per_s" in r and r["size"] == "square"),
        default=None,
        key=lambda r: r["images_per_s"],
    )
    if best:
        print(
            f"best at {best['height']}x{best['width']}: {best['images_per_s']:.2f} images/s "
            f"({best['model']}, {best['dtype']}, compile {best['compile']}, batch {best['batch']})"
        )
    if skipped:
        print(f"skipped {len(skipped)} setting(s) past --time-limit {args.time_limit:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
