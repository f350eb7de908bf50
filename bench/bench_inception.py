"""Benchmark FID Inception feature extraction: images/s on CPU (and GPU when available).

Random weights (speed does not depend on them). Each measurement feeds uint8 NHWC images of
``--image-size`` (ADM's layout), so the TF1 resize to 299×299 is included, as in evaluation:

1. the forward alone, per batch size (one warm-up batch, then ``--images`` images, whole
   batches, at most 8 batches);
2. the whole streaming job (:func:`fguide.evaluation.extract_features`: npz read-ahead, forward,
   statistics) on two batches of ``--pipeline-batch`` images, best of two runs, as a ratio to
   the bare forward at that batch size: what the plumbing costs on top of the network;
3. on CUDA: the forward per GPU batch size in IEEE float32 (what the evaluator uses) and with
   TF32 convolutions, with TF32's maximum relative deviation of the pool features, which is why
   the evaluator turns TF32 off.

Defaults take about a minute on 2 CPU cores.

    python bench/bench_inception.py [--batch-sizes 1,8,32] [--images 32] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fguide.evaluation import extract_features, ieee_float32, open_images
from fguide.models.inception import FIDInception


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_rate(
    model: FIDInception, images: torch.Tensor, batch: int, min_images: int
) -> dict[str, float]:
    """Images/s of ``model`` on batches of ``batch`` images (after one warm-up batch)."""
    device = next(model.parameters()).device
    x = images[:batch].to(device)
    model(x)
    _sync(device)
    done, t0 = 0, time.perf_counter()
    while done < max(min_images, batch):
        model(x)
        done += batch
    _sync(device)
    seconds = time.perf_counter() - t0
    return {
        "batch_size": batch,
        "images": done,
        "seconds": seconds,
        "images_per_s": done / seconds,
        "ms_per_image": 1000 * seconds / done,
    }


def pipeline_rate(
    model: FIDInception, images: np.ndarray, batch: int, repeats: int = 2
) -> dict[str, float]:
    """Images/s of the whole streaming extraction of an npz (read-ahead, forward, statistics),
    the best of ``repeats`` runs (a shared machine's load only ever slows a run down)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.npz"
        np.savez(path, images)
        source = open_images(path)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            extract_features(source, model, batch_size=batch, progress=False)
            times.append(time.perf_counter() - t0)
        seconds = min(times)
    return {
        "batch_size": batch,
        "images": len(images),
        "seconds": seconds,
        "images_per_s": len(images) / seconds,
    }


@torch.no_grad()
def gpu_bench(
    model: FIDInception, images: torch.Tensor, batches: list[int], min_images: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "ieee_float32": []}
    with ieee_float32():
        for b in batches:
            out["ieee_float32"].append(forward_rate(model, images, b, min_images))
            print(f"  cuda ieee b={b}: {out['ieee_float32'][-1]['images_per_s']:.0f} img/s")
        ref = model(images[: batches[0]].cuda()).pool.double()
    conv: Any = getattr(torch.backends.cudnn, "conv")  # noqa: B009 (not in the type stubs)
    saved = conv.fp32_precision
    conv.fp32_precision = "tf32"
    try:
        out["tf32"] = [forward_rate(model, images, b, min_images) for b in batches]
        tf32 = model(images[: batches[0]].cuda()).pool.double()
    finally:
        conv.fp32_precision = saved
    dev = ((tf32 - ref).abs() / ref.abs().clamp_min(1e-12)).max()
    out["tf32_pool_max_rel_deviation"] = float(dev)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32], help="CPU batch sizes")
    p.add_argument("--gpu-batch-sizes", type=_ints, default=[64, 256, 512])
    p.add_argument("--images", type=int, default=32, help="images timed per batch size (CPU)")
    p.add_argument("--gpu-images", type=int, default=2048, help="images timed per GPU batch size")
    p.add_argument("--image-size", type=int, default=256, help="input resolution (ADM: 256)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default all)")
    p.add_argument("--pipeline-batch", type=int, default=8, help="batch of the streaming job")
    p.add_argument("--no-pipeline", action="store_true", help="skip the streaming-job timing")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = FIDInception().eval()
    n_max = max([*args.batch_sizes, *(args.gpu_batch_sizes if torch.cuda.is_available() else [])])
    s = args.image_size
    images = torch.randint(0, 256, (n_max, s, s, 3), dtype=torch.uint8)
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "input": f"uint8 NHWC {s}x{s} -> TF1 resize 299x299, float32",
        "cpu_forward": [],
    }
    print(f"== CPU, {torch.get_num_threads()} threads, {s}x{s} inputs ==", flush=True)
    for b in args.batch_sizes:
        r = forward_rate(model, images, b, args.images)
        result["cpu_forward"].append(r)
        print(
            f"  b={b}: {r['images_per_s']:.2f} img/s ({r['ms_per_image']:.0f} ms/img)", flush=True
        )
    if not args.no_pipeline:
        b = args.pipeline_batch
        n = min(args.images, 2 * b)  # two batches: the second is read while the first runs
        result["cpu_pipeline"] = pipeline_rate(model, images[:n].numpy(), b)
        same = [r for r in result["cpu_forward"] if r["batch_size"] == b]
        if same:  # the plumbing's cost: streaming job vs bare forward at the same batch size
            result["cpu_pipeline"]["ratio_to_forward"] = (
                result["cpu_pipeline"]["images_per_s"] / same[0]["images_per_s"]
            )
        print(
            f"  streaming job (npz, b={b}): {result['cpu_pipeline']['images_per_s']:.2f} img/s",
            flush=True,
        )
    if torch.cuda.is_available():
        print("== CUDA ==", flush=True)
        result["gpu"] = gpu_bench(model.cuda(), images, args.gpu_batch_sizes, args.gpu_images)
        model.cpu()
    else:
        result["gpu"] = None
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
