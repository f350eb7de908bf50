"""The digits world's experiment: every method through ``fguide sample``'s run code, measured.

:func:`run_digits_world` trains (or reuses) the networks, chooses the guidance scale by a sweep
of the base method on a validation seed, samples every method over the seeds with
:func:`fguide.sampling.run_sampling`, measures the samples with the independent feature
network (:class:`DigitsEvaluator`, fguide's metric functions), fine-tunes the off-the-shelf
classifier with :func:`fguide.finetune.finetune` and guides with it (the paper's Table 1 in
miniature), compares the calibration losses (:mod:`fguide.worlds.digits_calib`) and writes
``results.json``, ``report.md`` and PNGs (:mod:`fguide.worlds.digits_report`).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from fguide.config import SampleConfig
from fguide.diagnostics import load_trajectory
from fguide.io.files import atomic_write_json, provenance
from fguide.io.folders import DEMO_FILES, claim_folder
from fguide.metrics.fid import frechet_distance_from_features
from fguide.metrics.precision_recall import precision_recall
from fguide.models.loading import load_model
from fguide.worlds.digits import (
    CLEAN_CLASSIFIER_SPEC,
    FAMILY_METHODS,
    METHODS,
    NUM_CLASSES,
    DigitsConfig,
    DigitsData,
    FeatureNet,
    load_digits_data,
    mean_std,
    paired_vs,
    to_model_input,
)
from fguide.worlds.digits_calib import (
    accuracy_by_t,
    calibration_regime,
    calibration_settings,
    choose_regimes,
)
from fguide.worlds.digits_family import add_costs, family_kwargs, sweep_point
from fguide.worlds.digits_report import write_report
from fguide.worlds.digits_train import (
    TrainedWorld,
    load_or_train,
    load_unet,
    training_process,
)
from fguide.worlds.workers import default_workers, job_pool, timed

__all__ = ["DigitsEvaluator", "main", "run_digits_world", "sample_method"]

_METRICS = (
    "accuracy",
    "fd",
    "fd_class",
    "precision",
    "recall",
    "integral_ece",
    "vanished_mean",
    "final_confidence",
)


class DigitsEvaluator:
    """Metrics of samples against the held-out split in the feature network's space.

    accuracy = mean 1[argmax feature_net(x) = target]; ``fd`` = Fréchet distance of all
    samples' features to all held-out features; ``fd_class`` = mean over classes k of the
    Fréchet distance between the samples with target k and the held-out images of class k;
    precision/recall (k = 3) against the held-out features (fguide.metrics).
    """

    def __init__(self, feature_net: FeatureNet, data: DigitsData) -> None:
        self.net = feature_net.eval().requires_grad_(False)
        self.ref = self.features(data.images[data.held])
        self.ref_labels = data.labels[data.held]

    def features(self, images: NDArray[np.uint8]) -> NDArray[np.float64]:
        with torch.no_grad():
            return self.net.features(to_model_input(images)).double().numpy()

    def evaluate(self, images: NDArray[np.uint8], labels: NDArray[np.int64]) -> dict[str, float]:
        x = to_model_input(images)
        with torch.no_grad():
            feats = self.net.features(x)
            pred = self.net.head(feats).argmax(dim=1).numpy()
        f = feats.double().numpy()
        per_class = [
            frechet_distance_from_features(f[labels == k], self.ref[self.ref_labels == k])
            for k in range(NUM_CLASSES)
            if (labels == k).sum() >= 2
        ]
        pr = precision_recall(self.ref, f, k=3, mode="float64")
        return {
            "accuracy": float((pred == labels).mean()),
            "fd": frechet_distance_from_features(f, self.ref),
            "fd_class": float(np.mean(per_class)),
            "precision": pr.precision,
            "recall": pr.recall,
        }


def _sample_config_kwargs(
    world: TrainedWorld, config: DigitsConfig, method: str, weights: Path | None
) -> dict[str, Any]:
    """``SampleConfig`` fields of one table method (see :data:`fguide.worlds.digits.METHODS`)."""
    kw: dict[str, Any] = {
        "model": world.files["unet"],
        "model_flags": dict(config.unet),
        "classifier": CLEAN_CLASSIFIER_SPEC,
        "classifier_weights": weights or world.files["classifier"],
        "method": method,
    }
    if method == "adm_cg":  # ADM's classic guidance: ∇ log p(y | x_t) of the noisy classifier
        kw.update(
            classifier="adm",
            classifier_weights=world.files["noisy_classifier"],
            classifier_flags=dict(config.adm_classifier),
            method="logsoftmax",
        )
    elif method == "tilted":
        kw["tilt_group"] = config.tilt_group
    elif method in FAMILY_METHODS:
        kw.update(family_kwargs(method))
    return kw


def sample_method(
    run_dir: Path,
    world: TrainedWorld,
    config: DigitsConfig,
    method: str,
    scale: float,
    seed: int,
    num_samples: int,
    weights: Path | None = None,
) -> tuple[NDArray[np.uint8], NDArray[np.int64], dict[str, Any]]:
    """Run ``method`` through :func:`fguide.sampling.run_sampling` into ``run_dir``.

    Returns (uint8 NHWC samples, target labels, the run's trajectory.json). A finished run
    with the same configuration is reused (run_sampling's own resume); one with another
    configuration (e.g. retrained networks) is replaced.
    """
    from fguide.sampling import ConfigMismatchError, run_sampling

    cfg = sample_config(run_dir, world, config, method, scale, seed, num_samples, weights)
    try:
        res = run_sampling(cfg)
    except ConfigMismatchError:  # our own run folder, made with other networks or settings
        shutil.rmtree(run_dir)
        res = run_sampling(cfg)
    assert res.samples is not None
    with np.load(res.samples) as z:
        images, labels = z["arr_0"], z["arr_1"].astype(np.int64)
    return images, labels, load_trajectory(run_dir / "trajectory.json")


def sample_config(
    run_dir: Path,
    world: TrainedWorld,
    config: DigitsConfig,
    method: str,
    scale: float,
    seed: int,
    num_samples: int,
    weights: Path | None = None,
) -> SampleConfig:
    """The ``fguide sample`` configuration of one table row's run."""
    kw = _sample_config_kwargs(world, config, method, weights)
    return SampleConfig(
        out=run_dir,
        scale=None if kw["method"] == "none" else scale,
        steps=str(config.sample_steps),
        num_samples=num_samples,
        batch_size=config.batch_size,
        seed=seed,
        labels="balanced",
        device="cpu",
        progress=False,
        grid=min(64, num_samples),
        **kw,
    )


class _Jobs:
    """The experiment's jobs on a pool, and the CPU seconds they took, by phase."""

    def __init__(self, pool: Executor) -> None:
        self.pool = pool
        self.cpu: dict[str, float] = {}
        self.rows: dict[str, float] = {}  # CPU seconds by table row (or "sweep <method>")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[tuple[Any, float]]:
        return self.pool.submit(timed, fn, *args)

    def result(self, phase: str, future: Future[tuple[Any, float]], row: str = "") -> Any:
        value, cpu = future.result()
        self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu
        if row:
            self.rows[row] = self.rows.get(row, 0.0) + cpu
        return value


def _grid(config: DigitsConfig, method: str) -> tuple[float, ...]:
    if method == "adm_cg":
        return config.adm_scale_grid
    return config.family_scale_grid if method in FAMILY_METHODS else config.scale_grid


def _submit_sweep(
    jobs: _Jobs, out: Path, world: TrainedWorld, config: DigitsConfig, method: str
) -> list[Future[tuple[Any, float]]]:
    grid = _grid(config, method)
    return [
        jobs.submit(
            sweep_point,
            sample_method,
            out / f"{method}-scale{g:g}",
            world,
            config,
            method,
            g,
            config.validation_seed,
            config.sweep_samples,
        )
        for g in grid
    ]


def _sweep_result(
    jobs: _Jobs,
    futures: list[Future[tuple[Any, float]]],
    evaluator: DigitsEvaluator,
    config: DigitsConfig,
    method: str,
) -> dict[str, Any]:
    """The sweep's class FD per scale and the scale that minimises it (a strength whose
    samples diverge scores NaN)."""
    grid = _grid(config, method)
    scores = []
    for future in futures:
        got = jobs.result("sweep", future, f"sweep {method}")
        scores.append(float("nan") if got is None else evaluator.evaluate(*got[:2])["fd_class"])
    if all(np.isnan(scores)):
        raise ValueError(f"{method}: its samples diverged at every strength of {list(grid)}")
    best = int(np.nanargmin(scores))
    return {
        "method": method,
        "grid": list(grid),
        "fd_class": scores,
        "chosen": grid[best],
        "seed": config.validation_seed,
        "num_samples": config.sweep_samples,
    }


def _finetune(
    world: TrainedWorld, data: DigitsData, config: DigitsConfig, loss: str, progress: bool
) -> tuple[Path, dict[str, Any] | None]:
    """CE + λ·loss fine-tuning of the off-the-shelf classifier on x̂0 (``fguide finetune``'s
    code, input ``denoised``), into the cache folder: (model file, report)."""
    from fguide.finetune import FinetuneConfig, adm_x0_estimator, finetune, wrap_module
    from fguide.io.images import from_arrays
    from fguide.worlds.digits import clean_classifier

    ft = FinetuneConfig(
        iterations=config.finetune_iters,
        batch_size=config.train_batch,
        lr=config.finetune_lr,
        augment=False,  # ADM's crops and flips do not suit 8 × 8 digits
        input="denoised",
        holdout=0.1,
        seed=config.seed,
        workers=0,
        checkpoint_every=max(1, config.finetune_iters),
        log_every=10,
        calibration_loss=loss,
    )
    net = load_model(clean_classifier(), world.files["classifier"])
    unet, process = load_unet(world, config), training_process(config)
    source = from_arrays(data.images[data.train], data.labels[data.train], "digits-train")
    key = f"finetune-{loss}-{config.finetune_iters}-{config.finetune_lr:g}"
    res = finetune(
        wrap_module(net, "clean", CLEAN_CLASSIFIER_SPEC),
        source,
        world.folder / key,
        ft,
        denoiser=adm_x0_estimator(unet, process, False),
        device="cpu",
        progress=progress,
    )
    report = res.report
    if report is None and (world.folder / key / "report.json").is_file():
        import json

        report = json.loads((world.folder / key / "report.json").read_text())
    return res.model_path, report


def _submit_runs(
    jobs: _Jobs,
    out: Path,
    world: TrainedWorld,
    config: DigitsConfig,
    runs: Mapping[str, tuple[str, float, Path | None]],
) -> dict[tuple[str, int], Future[tuple[Any, float]]]:
    """One sampling job per (table row, seed)."""
    return {
        (row, s): jobs.submit(
            sample_method,
            out / "runs" / row / f"seed{s}",
            world,
            config,
            method,
            scale,
            s,
            config.num_samples,
            weights,
        )
        for row, (method, scale, weights) in runs.items()
        for s in config.seeds
    }


def _collect_runs(
    jobs: _Jobs,
    futures: Mapping[tuple[str, int], Future[tuple[Any, float]]],
    runs: Mapping[str, tuple[str, float, Path | None]],
    config: DigitsConfig,
    evaluator: DigitsEvaluator,
    bar: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every (row, seed): metrics per seed, mean ± std, the first seed's curves and samples."""
    table: dict[str, Any] = {}
    extras: dict[str, Any] = {"curves": {}, "samples": {}}
    for row, (method, scale, _) in runs.items():
        per_seed = []
        for s in config.seeds:
            bar.set_description(f"sampling {row} seed {s}")
            images, labels, traj = jobs.result("sampling", futures[row, s], row)
            m: dict[str, Any] = {"seed": s, **evaluator.evaluate(images, labels)}
            summ = traj.get("summary", {})
            m["integral_ece"] = summ.get("integral_ece")
            m["vanished_mean"] = summ.get("vanished_mean")
            m["final_confidence"] = summ.get("final_confidence_mean")
            per_seed.append(m)
            if s == config.seeds[0]:
                extras["curves"][row] = traj.get("curves", {})
                extras["samples"][row] = (images, labels)
            bar.update(1)
        table[row] = {
            "method": method,
            "scale": scale,
            "per_seed": per_seed,
            **mean_std(per_seed, _METRICS),
        }
    if "base" in table:  # every row shares the seeds: differences to base are paired
        for r in table.values():
            r["vs_base"] = paired_vs(r["per_seed"], table["base"]["per_seed"])
    return table, extras


def run_digits_world(
    out: str | Path,
    config: DigitsConfig | None = None,
    *,
    quick: bool = False,
    cache_root: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    data: DigitsData | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Run the whole digits experiment into ``out``; returns the results (also results.json).

    ``config`` defaults to :class:`DigitsConfig` (or :meth:`DigitsConfig.quick_config` with
    ``quick``). ``cache_root`` overrides the network cache folder (see
    :func:`fguide.worlds.digits_train.cache_dir`). ``data`` replaces the digits and their split
    (tests pass a subset; the training split is part of the cache key). ``workers``: processes
    for the independent jobs (1: everything in this process; ``fguide demo`` uses
    :func:`~fguide.worlds.workers.default_workers`); the results do not depend on it. Worker
    processes are started by spawn, which imports the calling script again: call with
    ``workers`` > 1 from under ``if __name__ == "__main__":``. Writes ``results.json``,
    ``report.md``, ``table.png``, ``curves.png``, ``samples.png``, ``calibration.png`` and the
    sampling runs under ``runs/`` and ``sweep/``.
    """
    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    config = config or (DigitsConfig.quick_config() if quick else DigitsConfig())
    bad = [m for m in config.methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods: unknown {bad}; valid: see fguide.worlds.digits.METHODS")
    out = Path(out)
    claim_folder(out, "demo-digits", DEMO_FILES["demo-digits"], hold=False)  # refuses others' files
    say = log or (lambda msg: print(msg, file=sys.stderr))
    torch.set_grad_enabled(True)

    data = data or load_digits_data(config.held_fraction, config.seed)
    with job_pool(workers) as pool:
        t0 = time.perf_counter()
        world = load_or_train(data, config, cache_root, progress=progress, log=say, pool=pool)
        t_train = time.perf_counter() - t0
        jobs = _Jobs(pool)
        results, samples = _experiment(out, world, data, config, jobs, progress, say)
    t_experiment = time.perf_counter() - t0 - t_train
    train_cpu = world.meta.get("train_cpu_seconds") or {}
    results["timing_seconds"] = {
        "training_or_cache": round(t_train, 1),
        "experiment": round(t_experiment, 1),
        "total": round(time.perf_counter() - t_start, 1),
        "torch_threads": 1,
        "workers": workers,
    }
    results["cpu_seconds"] = {
        "training": round(sum(train_cpu.values()), 1) if world.trained else 0.0,
        **{phase: round(v, 1) for phase, v in jobs.cpu.items()},
        "total": round(_cpu_seconds() - cpu_start, 1),
    }
    results["cpu_seconds_by_row"] = {row: round(v, 2) for row, v in jobs.rows.items()}
    results["provenance"] = provenance(world="digits", cache_key=world.key)
    write_report(out, results, samples)
    atomic_write_json(out / "results.json", results)
    return results


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the workers, once stopped)."""
    try:
        import resource
    except ImportError:  # Windows: this process only
        return time.process_time()
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _experiment(
    out: Path,
    world: TrainedWorld,
    data: DigitsData,
    config: DigitsConfig,
    jobs: _Jobs,
    progress: bool,
    say: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sweeps, fine-tuning, the table's runs and the calibration comparison as jobs, in the
    order their results are needed; the metrics here as the samples come back."""
    from tqdm import tqdm

    feature_net = load_model(FeatureNet(), world.files["feature_net"])
    evaluator = DigitsEvaluator(feature_net, data)  # type: ignore[arg-type]
    held_metrics = _held_out_accuracies(world, data)
    say(
        "digits world: guidance-scale sweeps, fine-tuning (fguide finetune, on x̂0) and the "
        "calibration-loss comparison, then every method's runs"
    )
    swept = ["base"] + [m for m in ("adm_cg", *FAMILY_METHODS) if m in config.methods]
    sweep_jobs = {m: _submit_sweep(jobs, out / "sweep", world, config, m) for m in swept}
    inline = not isinstance(jobs.pool, ProcessPoolExecutor)
    ft_jobs = {
        loss: jobs.submit(_finetune, world, data, config, loss, progress and inline)
        for loss in ("smooth_ece", "soft_binned_ece")
    }
    cpu0 = time.process_time()
    acc_by_t = accuracy_by_t(world, data, config)
    jobs.cpu["calibration"] = time.process_time() - cpu0
    regime_jobs = {
        f"t{t}": jobs.submit(calibration_regime, world, data, config, t, target)
        for t, target in choose_regimes(acc_by_t, config.calib_accuracy_targets)
    }
    sweeps = {m: _sweep_result(jobs, f, evaluator, config, m) for m, f in sweep_jobs.items()}
    scale = float(sweeps["base"]["chosen"])
    runs: dict[str, tuple[str, float, Path | None]] = {
        m: (m, float(sweeps[m]["chosen"]) if m in sweeps else scale, None) for m in config.methods
    }
    run_jobs = _submit_runs(jobs, out, world, config, runs)
    finetuned: dict[str, Any] = {}
    for loss, future in ft_jobs.items():
        model, report = jobs.result("finetune", future)
        finetuned[loss] = {"model": str(model), "report": _finetune_summary(report)}
    ft_runs = {
        f"base+ft-{loss}": ("base", scale, Path(i["model"])) for loss, i in finetuned.items()
    }
    run_jobs |= _submit_runs(jobs, out, world, config, ft_runs)
    runs |= ft_runs
    bar = tqdm(total=len(run_jobs), unit="run", disable=not progress, file=sys.stderr)
    try:
        table, extras = _collect_runs(jobs, run_jobs, runs, config, evaluator, bar)
    finally:
        bar.close()
    add_costs(
        table,
        jobs.rows,
        {r: (m, w) for r, (m, _, w) in runs.items()},
        lambda m, scale, w: sample_config(Path("count"), world, config, m, scale, 0, 2, w),
        config.num_samples * len(config.seeds),
    )
    calib = {
        "accuracy_by_t": {str(t): a for t, a in acc_by_t.items()},
        "regimes": {name: jobs.result("calibration", f) for name, f in regime_jobs.items()},
        "settings": calibration_settings(config),
    }
    results: dict[str, Any] = {
        "world": "digits",
        "config": asdict(config),
        "cache": {
            "folder": str(world.folder),
            "key": world.key,
            "trained_now": world.trained,
            "train_seconds": world.meta.get("train_seconds"),
        },
        "held_out": held_metrics,
        "guidance_scale": scale,
        "scale_sweep": sweeps,
        "methods": table,
        "finetuned": finetuned,
        "calibration_comparison": calib,
        "curves": extras["curves"],
    }
    return results, extras["samples"]


def _finetune_summary(report: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    keep = ("before", "after", "delta", "training")
    return {k: v for k, v in report.items() if k in keep} or {"keys": sorted(report)}


def _held_out_accuracies(world: TrainedWorld, data: DigitsData) -> dict[str, float]:
    """Clean held-out accuracy and ECE of the off-the-shelf classifier and the feature net."""
    from fguide.metrics.calibration import ece
    from fguide.worlds.digits import clean_classifier

    x, y = data.x(data.held), data.labels[data.held]
    out: dict[str, float] = {}
    for name, net in (
        ("classifier", clean_classifier()),
        ("feature_net", FeatureNet()),
    ):
        load_model(net, world.files[name]).eval()
        with torch.no_grad():
            logits = net(x).double().numpy()
        out[f"{name}_accuracy"] = float((logits.argmax(1) == y).mean())
        out[f"{name}_ece"] = ece(logits, y, kind="logits")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m fguide.worlds.digits_run [--out DIR] [--quick | --full] [--seed N]
    [--cache-dir DIR] [--workers N]``: the same job ``fguide demo --world digits`` runs."""
    import argparse

    ap = argparse.ArgumentParser(prog="fguide-digits", description=run_digits_world.__doc__)
    ap.add_argument("--out", type=Path, default=Path("fguide-demo-digits"), metavar="DIR")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    size.add_argument("--full", action="store_true", help="the larger configuration")
    ap.add_argument("--seed", type=int, default=0, metavar="N", help="training seed (default 0)")
    ap.add_argument("--cache-dir", type=Path, default=None, metavar="DIR")
    ap.add_argument("--workers", type=int, default=None, metavar="N")
    args = ap.parse_args(argv)
    if args.seed < 0:
        ap.error(f"--seed must be >= 0, got {args.seed}")
    if args.workers is not None and args.workers < 1:
        ap.error(f"--workers must be >= 1, got {args.workers}")
    if args.quick:
        config = DigitsConfig.quick_config()
    else:
        config = DigitsConfig.full_config() if args.full else DigitsConfig()
    config = config.with_(seed=args.seed, seeds=tuple(args.seed + s for s in config.seeds))
    default = 1 if args.quick else default_workers()  # --quick: jobs smaller than a start-up
    workers = default if args.workers is None else args.workers
    res = run_digits_world(args.out, config, cache_root=args.cache_dir, workers=workers)
    print(f"wrote {args.out / 'report.md'} ({res['timing_seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
