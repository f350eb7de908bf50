"""Sampling runs: sharded, resumable and distributed guided sampling (``fguide sample``).

A run draws ``num_samples`` images with one sampler (METHODS.md §1, §5) guided by one
objective (§2–3) and writes them in ADM's format. The rules that make it resumable and
parallel:

- **Sample i is a function of (configuration, seed, i) only.** Its noise comes from a
  generator seeded by (seed, i) (:class:`fguide.SampleNoise`), its label from one seeded by
  (seed, i, label stream) (:func:`sample_labels`). So it does not depend on the batch, the
  shard, the process, or the number of samples asked for. Per-sample methods are exact in
  this sense; EluCD's ``variance_tracking="first_sample"`` couples a batch and is not.
- **Tilting couples a group**, so groups are fixed blocks of sample indices
  [jG, (j+1)G), G = ``tilt_group``, never "the batch": batches are whole groups and shards are
  multiples of G. The last block of a run is completed with extra samples that are drawn and
  thrown away, so a tilted sample depends on its block alone.
- **Shards** are fixed index ranges [i0, i1) of ``shard_size`` samples (independent of the
  batch size and of the number of processes). A shard is written atomically (temporary file,
  then rename): the npz, its trajectory statistics, and last a sidecar JSON with their
  SHA-256. A shard counts as done only when its sidecar exists and the checksums match, so a
  run killed at any moment leaves complete shards or none, and a truncated or corrupt shard is
  found and regenerated on the next run.
- **Processes** (``torchrun``): rank 0 checks the output folder, then every rank takes the
  missing shards round-robin; after all ranks report, rank 0 merges the shards, in index order,
  into ``samples.npz``. Multi-node runs need ``out`` on a filesystem all nodes share.
- **Identity.** The manifest stores the resolved configuration that determines the samples
  (checkpoint checksums included). A rerun into the same folder with a different one is
  refused; the batch size, device, number of processes and number of samples may change
  (more samples extend the run; the shards already there are reused).

Files (``out/``): ``shards/shard-<i0>-<i1>.{npz,traj.npz,json}``; ``samples.npz``
(``arr_0`` uint8 NHWC with ADM's quantisation, ``arr_1`` int64 labels, the layout of
``np.savez(path, images, labels)``, written byte-reproducibly); ``manifest.json``;
``grid.png``; ``trajectory.json`` (:class:`fguide.diagnostics.TrajectoryRecorder`'s format,
merged over all shards and ranks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from fguide import rng
from fguide.accel import choose_batch_size
from fguide.config import (
    DEFAULT_SHARD_SIZE,
    SampleConfig,
    parse_flags,
    resolve_config,
)
from fguide.diagnostics import StepStatistic, TrajectoryRecorder
from fguide.distributed import Dist, DistributedRunError
from fguide.guidance import GuidanceResult
from fguide.io.files import sha256_file
from fguide.io.images import to_uint8_nhwc
from fguide.io.runs import (
    FORMAT,
    ConfigMismatchError,
    OwnedFolder,
    TrajState,
    canonical,
    check_run_folder,
    claim_run_folder,
    identity_sha256,
    merge_run,
    merge_states,
    plan_shards,
    prepare_folder,
    recorder_state,
    write_shard,
)
from fguide.rng import SampleNoise
from fguide.samplers import (
    NonFiniteGuidanceError,
    NonFiniteModelOutputError,
    NonFiniteUpdateError,
    StepRecord,
    ddim,
    ddpm,
    heun,
)
from fguide.sampling_models import Components, build_components

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "Components",
    "ConfigMismatchError",
    "DistributedRunError",
    "NonFiniteSamplesError",
    "SampleConfig",
    "SampleResult",
    "build_components",
    "parse_flags",
    "plan_shards",
    "resolve_config",
    "run_sampling",
    "sample_batch",
    "sample_labels",
]


class NonFiniteSamplesError(NonFiniteGuidanceError):
    """A non-finite model output or guidance gradient, naming the step, the global indices of
    the samples and the culprit."""

    def __init__(
        self, err: NonFiniteGuidanceError, samples: list[int], shard: tuple[int, int]
    ) -> None:
        super().__init__(err.step, err.t, samples, err.what)
        shown = f"{samples[:16]}{' …' if len(samples) > 16 else ''}"
        where = (
            f"at sampling step {err.step} (t = {err.t:g}) for sample indices {shown} "
            f"(shard [{shard[0]}, {shard[1]}))"
        )
        if isinstance(err, NonFiniteModelOutputError):
            advice = (
                "check the diffusion model (--model); with guidance on, a --scale too large "
                "for the classifier can also push the state there"
            )
        elif isinstance(err, NonFiniteUpdateError):
            advice = "lower --scale"
        else:
            advice = "lower --scale, check the classifier, or use a smoother one (--softplus-beta)"
        self.args = (f"non-finite {err.what} {where}; {advice}",)


# -- samples ------------------------------------------------------------------------------------


def sample_labels(
    mode: str, seed: int, indices: Sequence[int], num_classes: int | None
) -> NDArray[np.int64] | None:
    """Labels of samples ``indices``: each a function of (mode, seed, index) alone.

    ``uniform``: i.i.d. uniform, from a generator seeded by (seed, i, label stream);
    ``balanced``: block b = i // N of N consecutive indices holds a seeded permutation of the
    N classes (class counts differ by at most one for any prefix of whole blocks);
    a class id: every sample. ``None`` when there are no classes (unconditional, unguided).
    """
    if num_classes is None:
        return None
    if mode == "uniform":
        out = [rng.numpy_rng(seed, i, rng.LABELS).integers(num_classes) for i in indices]
        return np.asarray(out, dtype=np.int64).reshape(-1)
    if mode == "balanced":
        perms: dict[int, NDArray[np.int64]] = {}
        out = []
        for i in indices:
            b = i // num_classes
            if b not in perms:
                perms[b] = rng.numpy_rng(seed, b, rng.LABELS, 1).permutation(num_classes)
            out.append(perms[b][i % num_classes])
        return np.asarray(out, dtype=np.int64).reshape(-1)
    return np.full(len(indices), int(mode), dtype=np.int64)


def sample_batch(
    comp: Components,
    cfg: SampleConfig,
    indices: Sequence[int],
    labels: NDArray[np.int64] | Tensor | None,
    callback: Callable[[StepRecord], None] | None = None,
) -> Tensor:
    """Draw samples ``indices`` (x_0 in about [−1, 1], NCHW float32 on the run's device).

    Sample i's noise comes from :class:`~fguide.samplers.SampleNoise` seeded by (seed, i).
    """
    noise = SampleNoise(cfg.seed, indices)
    shape = comp.state_shape or (3, comp.image_size, comp.image_size)
    z = noise.initial(shape, device=comp.device)
    x = _sample_state(comp, cfg, z, noise, labels, callback)
    if comp.to_image is None:
        return x
    with torch.no_grad():
        return comp.to_image(x)


def _sample_state(
    comp: Components,
    cfg: SampleConfig,
    z: Tensor,
    noise: SampleNoise,
    labels: NDArray[np.int64] | Tensor | None,
    callback: Callable[[StepRecord], None] | None,
) -> Tensor:
    """The sampler's final state (pixels, or latents for a latent model)."""
    clip_denoised = cfg.clip_denoised if comp.clip_denoised is None else comp.clip_denoised
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.long, device=comp.device)
    with torch.no_grad():  # guidance enables grad for its own classifier pass
        if cfg.sampler == "ddpm":
            assert comp.model is not None and comp.process is not None
            return ddpm(
                comp.model,
                z,
                comp.process,
                labels=y,
                guide=comp.guide,
                noise=noise,
                callback=callback,
                clip_denoised=clip_denoised,
                sine_factor=cfg.sine_factor or 0.0,
                variance_tracking=cfg.variance_tracking or "per_sample",  # type: ignore[arg-type]
            )
        if cfg.sampler == "ddim":
            assert comp.model is not None and comp.process is not None
            return ddim(
                comp.model,
                z,
                comp.process,
                labels=y,
                guide=comp.guide,
                noise=noise,
                callback=callback,
                clip_denoised=clip_denoised,
                eta=cfg.eta or 0.0,
            )
        assert comp.denoiser is not None and comp.sigmas is not None
        return heun(
            comp.denoiser,
            z,
            comp.sigmas,
            labels=y,
            guide=comp.guide,
            callback=callback,
            sine_factor=cfg.sine_factor or 0.0,
            guidance_input=cfg.guidance_input or "x",  # type: ignore[arg-type]
            noise=noise,
            s_churn=cfg.s_churn or 0.0,
            s_tmin=cfg.s_tmin or 0.0,
            s_tmax=float("inf") if cfg.s_tmax is None else cfg.s_tmax,
            s_noise=1.0 if cfg.s_noise is None else cfg.s_noise,
        )


def _generate_shard(
    comp: Components, cfg: SampleConfig, i0: int, i1: int, on_batch: Callable[[int], None]
) -> tuple[NDArray[np.uint8], NDArray[np.int64] | None, TrajState]:
    group = cfg.tilt_group if cfg.t_tilt is not None else None
    end = i1 if group is None else -(-i1 // group) * group  # complete the last tilt group
    size = cfg.batch_size or 64  # resolved by the run (None only for direct callers)
    batch = size if group is None else max(1, size // group) * group
    labels = sample_labels(comp.label_mode, cfg.seed, range(i0, end), comp.num_classes)
    # Unguided runs record the classifier's calibration too, when it sees x̂0.
    record = comp.guide is not None or (
        comp.classifier is not None and not comp.classifier.time_aware
    )
    images, states = [], []
    for b0 in range(i0, end, batch):
        idx = list(range(b0, min(b0 + batch, end)))
        keep = min(len(idx), i1 - b0)
        lab = None if labels is None else labels[b0 - i0 : b0 - i0 + len(idx)]
        rec, clip_rec = None, None
        callback: Callable[[StepRecord], None] | None = None
        if record and lab is not None:
            y_keep = torch.as_tensor(lab[:keep], device=comp.device)
            if comp.guide is not None:
                rec = TrajectoryRecorder()
            else:
                assert comp.classifier is not None
                rec = TrajectoryRecorder(labels=y_keep, classifier=comp.classifier.module)
            callbacks: list[Callable[[StepRecord], None]] = [rec]
            if comp.classifier is not None and comp.classifier.kind == "clip":
                from fguide.models.clip import CLIPScoreRecorder

                clip_rec = CLIPScoreRecorder(comp.classifier.module, y_keep)  # type: ignore[arg-type]
                callbacks.append(clip_rec)
            callback = _each(callbacks) if keep == len(idx) else _Kept(_each(callbacks), keep)
        try:
            x = sample_batch(comp, cfg, idx, lab, callback)
        except NonFiniteGuidanceError as err:
            raise NonFiniteSamplesError(err, [idx[p] for p in err.samples], (i0, i1)) from None
        except ValueError as err:  # e.g. non-finite logits: name the samples globally
            raise ValueError(
                f"{err} (in the batch of sample indices {idx[0]}..{idx[-1]}: batch position "
                f"p is sample {idx[0]} + p)"
            ) from None
        images.append(to_uint8_nhwc(x[:keep]))
        state = recorder_state(rec)
        states.append(state if clip_rec is None else {**state, **clip_rec.state()})
        on_batch(keep)
    return (
        np.concatenate(images),
        None if labels is None else labels[: i1 - i0],
        merge_states(states),
    )


def _each(callbacks: list[Callable[[StepRecord], None]]) -> Callable[[StepRecord], None]:
    if len(callbacks) == 1:
        return callbacks[0]

    def call_all(rec: StepRecord) -> None:
        for cb in callbacks:
            cb(rec)

    return call_all


class _Kept:
    """Callback filter: passes the first ``keep`` samples of each record (drops tilt padding)."""

    def __init__(self, inner: Callable[[StepRecord], None], keep: int):
        self.inner, self.keep = inner, keep

    def __call__(self, rec: StepRecord) -> None:
        k = self.keep
        res = rec.guidance
        if res is not None:
            res = GuidanceResult(
                res.grad[:k],
                res.logits[:k],
                res.labels[:k],
                None if res.weights is None else res.weights[:k],
            )
        self.inner(dataclasses.replace(rec, t=rec.t[:k], x=rec.x[:k], x0=rec.x0[:k], guidance=res))


# -- the run ------------------------------------------------------------------------------------


@dataclass
class SampleResult:
    """What a run did. ``complete`` is False when it stopped early (``max_shards``)."""

    out: Path
    complete: bool
    num_samples: int
    shards: list[tuple[int, int]]
    generated: list[tuple[int, int]]
    """Shards generated by this run (all ranks), in index order."""
    regenerated: list[tuple[int, int]]
    """Shards found corrupt or incomplete and generated again."""
    samples: Path | None
    manifest: Path


def _identity(cfg: SampleConfig, comp: Components, hashes: Mapping[str, str | None]) -> dict:
    """What determines the samples: compared on every rerun into the same folder."""
    run_only = {
        "out", "model", "classifier_weights", "num_samples", "batch_size", "device", "grid",
        "max_shards", "progress", "config_name", "model_preset", "model_flags", "compile",
        "channels_last",
    }  # fmt: skip
    settings = {k: v for k, v in cfg.to_json().items() if k not in run_only}
    if cfg.variance_tracking == "first_sample":
        settings["batch_size"] = cfg.batch_size  # EluCD's σ²_max couples a batch
    source = None if comp.classifier is None else comp.classifier.description.get("source_sha256")
    if source is not None:  # an import spec's module file (its code, beside its weights)
        settings["classifier_source_sha256"] = source
    return canonical(
        {
            "format": FORMAT,
            **settings,
            "resolved": comp.info,
            "num_classes": comp.num_classes,
            "image_size": comp.image_size,
            "model_sha256": hashes["model"],
            "classifier_weights_sha256": hashes.get("classifier"),
            # the weights in use, whatever their source (a file or an import spec)
            "classifier_state_sha256": (
                None
                if comp.classifier is None
                else comp.classifier.description["state_dict_sha256"]
            ),
        }
    )


class _ProbeDone(Exception):
    """Raised by the probe's callback after one sampling step."""


def _auto_batch_size(comp: Components, cfg: SampleConfig) -> int:
    """64 on CPU; on CUDA, from free memory and the peak of one guided step at two sizes."""
    if comp.device.type != "cuda":
        return 64

    def one_step(b: int) -> None:
        def stop(_: StepRecord) -> None:
            raise _ProbeDone

        labels = sample_labels(comp.label_mode, cfg.seed, range(b), comp.num_classes)
        try:
            sample_batch(comp, cfg, range(b), labels, stop)
        except _ProbeDone:
            pass

    group = cfg.tilt_group if cfg.t_tilt is not None and cfg.tilt_group else 8
    # Probe uncompiled (compiled code has a lower peak, so the choice stays safe): compiling
    # for the two probe sizes would cost two compilations of shapes the run never uses.
    probing = comp.compiled.eager() if comp.compiled is not None else contextlib.nullcontext()
    with probing:
        return choose_batch_size(one_step, comp.device, probe=(group, 2 * group), multiple_of=group)


def _model_sha256(path: Path) -> str:
    """SHA-256 of a model file, or of a diffusers folder's files (names and contents)."""
    if path.is_file():
        return sha256_file(path)
    from fguide.models.hf_diffusers import pipeline_files

    h = hashlib.sha256()
    for f in pipeline_files(path):
        h.update(f"{f.relative_to(path).as_posix()}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _log(dist: Dist, msg: str) -> None:
    if dist.rank == 0:
        print(f"fguide sample: {msg}", file=sys.stderr, flush=True)


def _merge(
    cfg: SampleConfig,
    comp: Components,
    plan: list[tuple[int, int]],
    identity_sha: str,
    records: list[dict[str, Any]],
) -> Path | None:
    extra: dict[str, Any] = {
        "num_samples": cfg.num_samples,
        "shard_size": cfg.shard_size,
        "seeding": (
            f"sample i: noise from SeedSequence([{cfg.seed}, i]), label from "
            f"SeedSequence([{cfg.seed}, i, {rng.LABELS}]) ('balanced': per block of "
            "num_classes indices); shard 'samples' [i0, i1) is its range of i"
        ),
    }
    if cfg.t_tilt is not None:
        extra["tilt_groups"] = f"index blocks [j*{cfg.tilt_group}, (j+1)*{cfg.tilt_group})"
    return merge_run(
        cfg.out,
        plan,
        identity_sha,
        [(int(r["samples"][0]), int(r["samples"][1])) for r in records],
        image_size=comp.image_size,
        with_labels=comp.num_classes is not None,
        grid=cfg.grid,
        manifest_extra=extra,
        trajectory_run={
            "method": cfg.method,
            "config_name": cfg.config_name,
            "sampler": cfg.sampler,
            "steps": cfg.steps,
        },
        statistics=_statistics(comp),
    )


def _statistics(comp: Components) -> tuple[type[StepStatistic], ...]:
    if comp.classifier is not None and comp.classifier.kind == "clip":
        from fguide.models.clip import CLIPScoreRecorder

        return (CLIPScoreRecorder,)
    return ()


def run_sampling(cfg: SampleConfig) -> SampleResult:
    """Run (or continue) the sampling run ``cfg`` describes; see the module docstring.

    Under ``torchrun`` every process calls this; it initialises ``torch.distributed`` (gloo on
    CPU, NCCL on CUDA) when needed and returns the same :class:`SampleResult` on every rank.
    """
    cfg = resolve_config(cfg)
    dist = Dist.from_env(cfg.device)
    try:
        return _run(cfg, dist)
    finally:
        dist.close()


def _run(cfg: SampleConfig, dist: Dist) -> SampleResult:
    claimed: list[OwnedFolder] = []  # rank 0 claims the folder and holds it for the whole run
    try:
        return _run_claimed(cfg, dist, claimed)
    finally:
        for folder in claimed:
            folder.release()


def _run_claimed(cfg: SampleConfig, dist: Dist, claimed: list[OwnedFolder]) -> SampleResult:
    comp: Components | None = None
    err: BaseException | None = None
    batch: int | None = cfg.batch_size
    try:
        if dist.rank == 0:  # a folder holding others' files is refused before any model loads
            check_run_folder(cfg.out)
        comp = build_components(cfg, dist.device(cfg.device))
        if batch is None and dist.rank == 0:
            batch = _auto_batch_size(comp, cfg)
    except Exception as e:  # every rank must learn of a failure, or the others would hang
        err = e
    dist.agree(err)
    assert comp is not None
    if cfg.batch_size is None:  # every rank uses rank 0's choice: equal bytes in every shard
        cfg = dataclasses.replace(cfg, batch_size=int(dist.broadcast(batch)))
        if comp.device.type == "cuda":
            _log(dist, f"batch size {cfg.batch_size} (chosen from free memory on {comp.device})")
    plan = plan_shards(cfg.num_samples, cfg.shard_size)

    payload: tuple[str, Any] = ("ok", None)
    if dist.rank == 0:
        try:
            claimed.append(claim_run_folder(cfg.out))
            hashes = {"model": _model_sha256(cfg.model)}
            if cfg.classifier_weights is not None:
                hashes["classifier"] = sha256_file(cfg.classifier_weights)
            identity = _identity(cfg, comp, hashes)
            todo, corrupt = prepare_folder(
                cfg.out, identity, plan, cfg.to_json(), dist.world, lambda m: _log(dist, m)
            )
            identity_sha = identity_sha256(identity)
            payload = ("ok", (todo, corrupt, identity_sha))
        except Exception as e:
            err = e
            payload = ("error", f"{type(e).__name__}: {e}")
    payload = dist.broadcast(payload)
    if err is not None:
        raise err
    if payload[0] == "error":
        raise DistributedRunError(f"rank 0 failed: {payload[1]}")
    todo, corrupt, identity_sha = payload[1]
    todo = [tuple(p) for p in todo]
    mine = todo[dist.rank :: dist.world]
    if cfg.max_shards is not None:
        mine = mine[: cfg.max_shards]
    _log(
        dist,
        f"{len(plan) - len(todo)} of {len(plan)} shards already complete; generating "
        f"{len(todo)} on {dist.world} process(es) into {cfg.out}",
    )
    if cfg.variance_tracking == "first_sample":
        _log(dist, "variance_tracking=first_sample couples each batch (EluCD's reference mode)")
    if comp.device.type == "cpu" and cfg.precision == "fp16":
        _log(dist, "fp16 convolutions are very slow on CPU; consider --precision fp32 or bf16")

    from tqdm import tqdm

    records: list[dict[str, Any]] = []
    total = sum(i1 - i0 for i0, i1 in mine)
    bar = tqdm(
        total=total,
        unit="img",
        desc=f"sampling (rank 0 of {dist.world})" if dist.world > 1 else "sampling",
        disable=not cfg.progress or dist.rank != 0 or total == 0,
        file=sys.stderr,
    )
    err = None
    try:
        for i0, i1 in mine:
            t0 = time.perf_counter()
            images, labels, traj = _generate_shard(comp, cfg, i0, i1, bar.update)
            meta = {
                "identity_sha256": identity_sha,
                "rank": dist.rank,
                "world_size": dist.world,
                "device": str(comp.device),
                "batch_size": cfg.batch_size,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            records.append(write_shard(cfg.out, i0, i1, images, labels, traj, meta))
    except Exception as e:
        err = e
    finally:
        bar.close()
    if comp.compiled is not None and comp.compiled.compile_seconds is not None:
        _log(dist, f"torch.compile: {comp.compiled.compile_seconds:.1f} s (first call, included)")
    gathered = dist.all_gather((None if err is None else f"{type(err).__name__}: {err}", records))
    if err is not None:
        raise err
    for r, (msg, _) in enumerate(gathered):
        if msg is not None:
            raise DistributedRunError(f"rank {r} failed: {msg}")
    all_records = sorted((r for _, recs in gathered for r in recs), key=lambda r: r["samples"])

    outcome: tuple[str, Any] = ("ok", (False, None))
    if dist.rank == 0:
        try:
            samples_path = _merge(cfg, comp, plan, identity_sha, all_records)
            outcome = ("ok", (samples_path is not None, samples_path))
        except Exception as e:
            err = e
            outcome = ("error", f"{type(e).__name__}: {e}")
    outcome = dist.broadcast(outcome)
    if err is not None:
        raise err
    if outcome[0] == "error":
        raise DistributedRunError(f"rank 0 failed while merging: {outcome[1]}")
    complete, samples = outcome[1]
    if not complete:
        _log(dist, "stopped before every shard was written; rerun the same command to continue")
    return SampleResult(
        out=cfg.out,
        complete=complete,
        num_samples=cfg.num_samples,
        shards=plan,
        generated=[(int(r["samples"][0]), int(r["samples"][1])) for r in all_records],
        regenerated=[(int(a), int(b)) for a, b in corrupt],
        samples=None if samples is None else Path(samples),
        manifest=cfg.out / "manifest.json",
    )
