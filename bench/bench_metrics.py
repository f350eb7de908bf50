"""Benchmark fguide's evaluator metrics against naive baselines; prints speed-up ratios.

1. Statistics: FeatureStats streamed in ADM's batches of 64 vs one-shot np.mean + np.cov on
   the whole float32 array (ADM's code); then frechet_distance (two symmetric eigh) vs
   ADM's scipy.linalg.sqrtm(Σ1 Σ2), and frechet_distance_from_features (nuclear norm).
2. Precision/recall (k = 3): fguide's blocked torch computation vs a float64 numpy norm
   expansion with np.partition, timed on ``--baseline-rows`` rows per pass and scaled up
   linearly to the full row count (the baseline's cost is linear in the rows).

Default sizes run in a few minutes on 2 CPU cores; ``--full`` uses ADM's sizes (50k samples,
10k reference images for precision/recall). With a CUDA device, precision/recall also runs on
the GPU in float32 and float16 (with the float32 fallback).

    python bench/bench_metrics.py [--full] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import scipy
import scipy.linalg
import torch

from fguide.metrics import (
    FeatureStats,
    frechet_distance,
    frechet_distance_from_features,
    precision_recall,
)


def _timed(fn: Callable[[], Any], sync: bool = False) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _features(rng: np.random.Generator, n: int, d: int, scale: float, shift: float) -> np.ndarray:
    # Non-negative like Inception pool features (post-ReLU means), float32 like ADM's.
    x = rng.standard_normal((n, d), dtype=np.float32)
    np.abs(x, out=x)
    x *= scale
    x += shift
    return x


def _adm_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """ADM's FID: sqrtm of the non-symmetric product, real part of its trace."""
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _naive_sq_dist(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    d = (u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :]
    return np.maximum(d, 0)


def bench_stats(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    n, d = args.stats_n, args.dim
    print(f"\n== statistics: {n} x {d} float32 features per set ==", flush=True)
    ref = _features(rng, n, d, 1.0, 0.0)
    sam = _features(rng, n, d, 1.1, 0.02)

    def stream(x: np.ndarray) -> FeatureStats:
        st = FeatureStats()
        for i in range(0, x.shape[0], 64):  # ADM's evaluator batch
            st.update(x[i : i + 64])
        _ = st.cov  # include the final flush
        return st

    t_ours, st_ref = _timed(lambda: stream(ref))
    t_base, (mu_b, sig_b) = _timed(lambda: (np.mean(ref, axis=0), np.cov(ref, rowvar=False)))
    cov_err = float(np.abs(st_ref.cov - sig_b).max())
    st_sam = stream(sam)
    mu1, s1, mu2, s2 = st_sam.mean, st_sam.cov, st_ref.mean, st_ref.cov

    t_fid, fid = _timed(lambda: frechet_distance(mu1, s1, mu2, s2))
    t_sqrtm, fid_adm = _timed(lambda: _adm_fid(mu1, s1, mu2, s2))
    t_nuc, fid_nuc = _timed(lambda: frechet_distance_from_features(sam, ref))
    rows = [
        ("FeatureStats (batches of 64)", t_ours, "np.mean+np.cov (one shot)", t_base),
        ("frechet_distance (stats)", t_fid, "scipy sqrtm (ADM)", t_sqrtm),
        # Both start from the features: two sets' statistics, then the trace term.
        ("from_features (nuclear)", t_nuc, "2x np.cov + sqrtm (ADM)", 2 * t_base + t_sqrtm),
    ]
    _print_rows(rows)
    print(
        f"  FID stats {fid:.10f}  nuclear {fid_nuc:.10f}  ADM sqrtm {fid_adm:.10f}  "
        f"(|stats-nuclear|/FID {abs(fid - fid_nuc) / abs(fid_nuc):.1e}, "
        f"|ADM-nuclear|/FID {abs(fid_adm - fid_nuc) / abs(fid_nuc):.1e}); "
        f"max|cov - np.cov| {cov_err:.1e}"
    )
    return {
        "n": n,
        "dim": d,
        "timings": _rows_json(rows),
        "fid_stats": fid,
        "fid_nuclear": fid_nuc,
        "fid_adm_sqrtm": fid_adm,
        "max_abs_cov_diff_vs_np_cov": cov_err,
        "mu_max_abs_diff_vs_float32_mean": float(np.abs(st_ref.mean - mu_b).max()),
    }


def _naive_radii(x: np.ndarray, m: int, k: int) -> np.ndarray:
    return np.partition(_naive_sq_dist(x[:m], x), k, axis=1)[:, k]


def _baseline_pr(
    ref: np.ndarray, sam: np.ndarray, rows: int, k: int, radii_sam: np.ndarray
) -> tuple[float, dict[str, Any]]:
    """Float64 numpy on `rows` rows per pass, time scaled to all rows; returns some values."""
    r64, s64 = ref.astype(np.float64), sam.astype(np.float64)
    total = 0.0
    out: dict[str, Any] = {}
    for name, x in (("ref", r64), ("sample", s64)):
        m = min(rows, x.shape[0])
        t, rad = _timed(partial(_naive_radii, x, m, k))
        total += t * x.shape[0] / m
        out[f"radii_{name}_head"] = rad
    m = min(rows, r64.shape[0])
    t, ref_in = _timed(lambda: (_naive_sq_dist(r64[:m], s64) <= radii_sam[None, :]).any(1))
    total += t * r64.shape[0] / m
    out["ref_in_head"] = ref_in
    return total, out


def bench_pr(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    nr, ns, d = args.pr_ref, args.pr_sample, args.dim
    print(f"\n== precision/recall: ref {nr} x {d}, samples {ns} x {d}, k = 3 ==", flush=True)
    ref = rng.standard_normal((nr, d), dtype=np.float32)
    sam = 1.05 * rng.standard_normal((ns, d), dtype=np.float32) + 0.01

    t_cpu, pr = _timed(lambda: precision_recall(ref, sam, mode="float32", block_size=args.block))
    t_base, base = _baseline_pr(ref, sam, args.baseline_rows, 3, pr.radii_sample)
    rows = [("precision_recall float32 CPU", t_cpu, "numpy float64 (scaled)", t_base)]
    m = min(args.baseline_rows, nr, ns)
    rad_err = max(
        float(np.max(np.abs(pr.radii_ref[:m] / base["radii_ref_head"][:m] - 1))),
        float(np.max(np.abs(pr.radii_sample[:m] / base["radii_sample_head"][:m] - 1))),
    )
    agree = bool((pr.ref_in_sample_manifold[:m] == base["ref_in_head"][:m]).all())
    result: dict[str, Any] = {
        "n_ref": nr,
        "n_sample": ns,
        "dim": d,
        "block_size": args.block,
        "precision": pr.precision,
        "recall": pr.recall,
        "radii_max_rel_diff_vs_float64_head": rad_err,
        "decisions_agree_with_float64_head": agree,
    }
    if torch.cuda.is_available() and args.device != "cpu":
        for mode in ("float32", "float16"):
            precision_recall(ref[:100], sam[:100], mode=mode, device="cuda")  # warm-up
            run = partial(precision_recall, ref, sam, mode=mode, block_size=args.block)
            t_gpu, pr_gpu = _timed(partial(run, device="cuda"), sync=True)
            rows.append((f"precision_recall {mode} GPU", t_gpu, "numpy float64 (scaled)", t_base))
            result[f"gpu_{mode}"] = {
                "precision": pr_gpu.precision,
                "recall": pr_gpu.recall,
                "fallback_blocks": pr_gpu.fallback_blocks,
                "flags_equal_cpu_float32": bool(
                    (pr_gpu.sample_in_ref_manifold == pr.sample_in_ref_manifold).all()
                    and (pr_gpu.ref_in_sample_manifold == pr.ref_in_sample_manifold).all()
                ),
            }
    _print_rows(rows)
    print(
        f"  precision {pr.precision:.4f} recall {pr.recall:.4f}; on the baseline's {m} rows: "
        f"radii max rel diff {rad_err:.1e}, decisions agree: {agree}"
    )
    result["timings"] = _rows_json(rows)
    return result


def _print_rows(rows: list[tuple[str, float, str, float]]) -> None:
    print(f"  {'fguide':34s} {'time':>9s}   {'baseline':28s} {'time':>9s}  {'speed-up':>8s}")
    for name, t, bname, bt in rows:
        print(f"  {name:34s} {t:8.2f}s   {bname:28s} {bt:8.2f}s  {bt / t:7.1f}x")


def _rows_json(rows: list[tuple[str, float, str, float]]) -> list[dict[str, Any]]:
    return [
        {"fguide": n, "fguide_s": t, "baseline": b, "baseline_s": bt, "speedup": bt / t}
        for n, t, b, bt in rows
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--full", action="store_true", help="ADM sizes: 50k samples, 10k refs")
    p.add_argument("--stats-n", type=int, default=None, help="rows per set for FID statistics")
    p.add_argument("--pr-ref", type=int, default=None, help="reference rows for P/R")
    p.add_argument("--pr-sample", type=int, default=None, help="sample rows for P/R")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--block", type=int, default=10000, help="P/R block size (ADM: 10000)")
    p.add_argument("--baseline-rows", type=int, default=400, help="rows timed per P/R pass")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip", choices=("stats", "pr"), action="append", default=[])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.stats_n = args.stats_n or (50000 if args.full else 10000)
    args.pr_ref = args.pr_ref or (10000 if args.full else 5000)
    args.pr_sample = args.pr_sample or (50000 if args.full else 10000)
    if args.threads:
        torch.set_num_threads(args.threads)

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan,
    }
    print("fguide metrics benchmark:", ", ".join(f"{k} {v}" for k, v in env.items()))
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"env": env, "args": vars(args)}
    if "stats" not in args.skip:
        results["statistics"] = bench_stats(args, rng)
    if "pr" not in args.skip:
        results["precision_recall"] = bench_pr(args, rng)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
