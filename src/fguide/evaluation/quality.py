"""ADM-comparable evaluation: FID, sFID, Inception Score, precision/recall from image files.

METHODS.md section 6. A reference batch R and a sample batch S (ADM ``.npz`` files, folders of
PNG/JPEG images, or an ``fguide sample`` run folder; read through
:func:`fguide.io.images.open_images`) go through the FID Inception as a streaming job
(:func:`fguide.io.features.extract_features`; the reference's features through the on-disk
cache, :func:`fguide.io.features.cached_features`). Then, with ADM's definitions:

- FID = ‖μ_S − μ_R‖² + tr Σ_S + tr Σ_R − 2 tr sqrt(Σ_S Σ_R) on the pool features, sFID the
  same on the spatial ones. μ_R, Σ_R come from the reference file's ``mu``/``sigma``
  (``mu_s``/``sigma_s`` for sFID) when it has them, as ADM does, else from its images;
- IS over consecutive splits of 5000 sample logits;
- precision/recall with k = 3 between the reference images' and the samples' pool features.

This module is the job: the checks of the inputs, the metrics, the comparison with an earlier
``metrics.json`` and the result.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from fguide.io import features
from fguide.io.features import (
    LOGITS_DIM,
    POOL_DIM,
    SPATIAL_DIM,
    BatchFeatures,
    cached_features,
    default_cache_dir,
    extract_features,
    feature_cache_path,
    ieee_float32,
)
from fguide.io.files import sha256_file
from fguide.io.images import ImageSource, open_images
from fguide.metrics.fid import FIDComparabilityWarning, frechet_distance
from fguide.metrics.inception_score import inception_score_splits
from fguide.metrics.precision_recall import DistanceMode, precision_recall
from fguide.models.inception import INCEPTION_WEIGHTS_ENV, load_fid_inception
from fguide.runtime import resolve_device

__all__ = [
    "EVALUATOR_VERSION",
    "LOGITS_DIM",
    "BatchFeatures",
    "EvaluationResult",
    "EvaluationWarning",
    "ImageSource",
    "cached_features",
    "default_cache_dir",
    "evaluate",
    "extract_features",
    "feature_cache_path",
    "ieee_float32",
    "open_images",
    "read_reference_statistics",
]

#: Identifies the definitions behind the numbers (recorded in ``metrics.json``).
EVALUATOR_VERSION = (
    "fguide-evaluator 1 (ADM evaluator definitions, openai/guided-diffusion 22e0df8; "
    "TF 2015-12-05 Inception, TF1 bilinear resize)"
)
STANDARD_SAMPLE_COUNT = 50_000  # ADM / the paper: 50k samples (FID is biased in N)
STANDARD_REF_COUNT = 10_000  # ADM's reference batches: 10k images in arr_0
IS_SPLIT_SIZE = 5000
PR_K = 3
STAT_KEYS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s")}
STAT_DIMS = {"fid": POOL_DIM, "sfid": SPATIAL_DIM}


class EvaluationWarning(UserWarning):
    """Input that can be evaluated but whose numbers need care (sizes, counts, rank)."""


# -- reference statistics ---------------------------------------------------------------------


def read_reference_statistics(
    path: str | os.PathLike[str],
) -> dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]]:
    """Precomputed (μ, Σ) of a reference npz: {"fid": (mu, sigma), "sfid": (mu_s, sigma_s)}.

    Either pair may be absent (then those statistics are computed from ``arr_0``); half a pair,
    a wrong shape or a non-finite value is an error naming the file and the key.
    """
    p = Path(path)
    if p.is_dir():
        return {}
    out: dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]] = {}
    with np.load(p, allow_pickle=False) as data:
        keys = set(data.files)
        for metric, (mk, sk) in STAT_KEYS.items():
            if mk not in keys and sk not in keys:
                continue
            if mk not in keys or sk not in keys:
                have, miss = (mk, sk) if mk in keys else (sk, mk)
                raise ValueError(f"{p}: has '{have}' but no '{miss}' (the {metric} statistics)")
            d = STAT_DIMS[metric]
            try:
                mu, sigma = data[mk], data[sk]
            except ValueError as err:
                raise ValueError(f"{p}: cannot read '{mk}'/'{sk}' ({err})") from None
            for key, arr, shape in ((mk, mu, (d,)), (sk, sigma, (d, d))):
                if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating):
                    raise ValueError(
                        f"{p}['{key}'] must be a float array of shape {list(shape)}; got "
                        f"{arr.dtype} {list(arr.shape)}"
                    )
                if not np.isfinite(arr).all():
                    raise ValueError(f"{p}['{key}'] contains non-finite values")
            out[metric] = (mu.astype(np.float64), sigma.astype(np.float64))
    return out


# -- evaluation -------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    """What ``fguide evaluate`` reports; :meth:`to_dict` is ``metrics.json`` (less provenance)."""

    metrics: dict[str, float | None]
    inception_score_splits: list[float]
    reference: dict[str, Any]
    samples: dict[str, Any]
    inception: dict[str, Any]
    settings: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    comparison: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "evaluator": EVALUATOR_VERSION,
            "metrics": self.metrics,
            "inception_score_splits": self.inception_score_splits,
            "reference": self.reference,
            "samples": self.samples,
            "inception": self.inception,
            "settings": self.settings,
            "warnings": self.warnings,
            "comparison": self.comparison,
        }


def _resolve_weights(weights: str | os.PathLike[str] | None) -> Path:
    if weights is not None:
        return Path(os.fspath(weights))
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env:
        return Path(env)
    # Raises FileNotFoundError saying which file is needed and where it is published.
    load_fid_inception(None)
    raise AssertionError("unreachable")


def _source_info(src: ImageSource, sha: str | None) -> dict[str, Any]:
    return {
        "path": str(src.path),
        "kind": src.kind,
        "sha256": sha,
        "num_images": src.count,
        "image_size": list(src.size),
        "keys": list(src.keys) if src.kind == "npz" else None,
        "has_labels": src.labels is not None,
    }


def _load_comparison(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"--compare file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a metrics.json written by fguide evaluate")
    for key in ("metrics", "samples", "reference"):
        if not isinstance(data.get(key), dict):
            raise ValueError(f"{path}: no '{key}' section (not a metrics.json of fguide evaluate)")
    if not isinstance(data["samples"].get("num_images"), int):
        raise ValueError(f"{path}: no 'samples.num_images' (the sample count is needed)")
    return data


def evaluate(
    reference: str | os.PathLike[str],
    samples: str | os.PathLike[str] | ImageSource,
    *,
    weights: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    compare: str | os.PathLike[str] | None = None,
    pr_mode: DistanceMode = "float32",
    workers: int = 4,
    progress: bool = True,
    image_size: int | None = None,
) -> EvaluationResult:
    """FID, sFID, Inception Score and precision/recall of ``samples`` against ``reference``.

    ``reference``/``samples``: ADM ``.npz`` batches, image folders (centre-cropped to
    ``image_size`` × ``image_size`` as ADM prepares ImageNet, when given) or ``fguide sample``
    run folders (warned when the run is not complete); ``samples`` may also be an
    :class:`ImageSource` already opened (:func:`open_images`). ``weights``: the FID
    Inception weight file (default ``$FGUIDE_INCEPTION_WEIGHTS``). ``batch_size`` defaults to
    64 on the CPU (ADM's) and 256 on a GPU; it changes the numbers only by float32 round-off.
    ``cache_dir`` enables the reference-feature cache. ``compare``: a previous
    ``metrics.json``, to be warned when its numbers are not comparable with these (sample
    count, reference, weights).

    Problems with the input are errors naming the file and key; things that make the numbers
    hard to compare or unreliable are warnings (also listed in the result): sample counts
    other than the standard 50k, a reference other than 10k images, fewer images than the
    feature dimension (rank-deficient covariances), references and samples of different
    image sizes, a comparison with a different sample count.
    """
    notes: list[str] = []

    def warn(msg: str, category: type[Warning] = EvaluationWarning, depth: int = 0) -> None:
        """Record and issue a warning, attributed to evaluate's caller (``depth``: the number
        of helper frames between evaluate and this call)."""
        notes.append(msg)
        warnings.warn(msg, category, stacklevel=3 + depth)

    dev = resolve_device(device)
    bs = batch_size or (256 if dev.type == "cuda" else 64)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {bs}")
    weights_path = _resolve_weights(weights)
    compare_path = Path(compare) if compare is not None else None
    comparison = _load_comparison(compare_path) if compare_path is not None else None
    ref_src = open_images(reference, image_size, warn=warn)
    # an opened source is used as it is (its checksum, computed once, shared with its caller)
    sam_src = (
        samples if isinstance(samples, ImageSource) else open_images(samples, image_size, warn=warn)
    )
    file_stats = read_reference_statistics(ref_src.path) if ref_src.kind == "npz" else {}
    _check_inputs(ref_src, sam_src, comparison, compare_path, warn)

    # The model first: a missing or wrong weight file fails before any long checksum.
    model = load_fid_inception(weights_path, dev, torch.float32, require_logits=False)
    weights_sha = sha256_file(weights_path)
    # The npz files' sha256 (the cache key); a folder's content hash would cost a full read.
    ref_sha = ref_src.sha256 if ref_src.kind == "npz" else None
    sam_sha = sam_src.sha256 if sam_src.kind == "npz" else None
    extract: dict[str, Any] = {"batch_size": bs, "workers": workers, "progress": progress}
    ref_feats, cache_status, cache_path = _reference_features(
        ref_src, model, ref_sha, weights_sha, cache_dir, extract, warn
    )
    sam_feats = features.extract_features(sam_src, model, desc="samples", **extract)

    metrics, sources, file_vs_images = _frechet_metrics(
        ref_feats, sam_feats, file_stats, ref_src, sam_src, warn
    )
    split_scores = _score_metrics(metrics, ref_feats, sam_feats, weights_path, pr_mode, dev, warn)
    reference_info = _source_info(ref_src, ref_sha)
    reference_info.update(
        statistics={m: s["reference"] for m, s in sources.items()},
        file_statistics_vs_images=file_vs_images or None,
        cache=cache_status,
        cache_path=str(cache_path) if cache_path else None,
    )
    samples_info = _source_info(sam_src, sam_sha)
    samples_info["statistics"] = {m: s["samples"] for m, s in sources.items()}
    comp = None
    if comparison is not None and compare_path is not None:
        comp = _compare(compare_path, comparison, ref_sha, weights_sha, warn)
    return EvaluationResult(
        metrics={k: metrics[k] for k in ("inception_score", "fid", "sfid", "precision", "recall")},
        inception_score_splits=split_scores,
        reference=reference_info,
        samples=samples_info,
        inception={
            "weights_path": str(weights_path),
            "weights_sha256": weights_sha,
            "dtype": "float32",
            "device": str(dev),
            "tf32": False,
        },
        settings={
            "batch_size": bs,
            "is_split_size": IS_SPLIT_SIZE,
            "pr_k": PR_K,
            "pr_mode": pr_mode,
            "fid_trace": "exact (symmetric eigendecomposition, METHODS.md 6)",
        },
        warnings=notes,
        comparison=comp,
    )


def _reference_features(
    ref_src: ImageSource,
    model: Any,
    ref_sha: str | None,
    weights_sha: str,
    cache_dir: str | os.PathLike[str] | None,
    extract: dict[str, Any],
    warn: Callable[..., None],
) -> tuple[BatchFeatures, str, Path | None]:
    """The reference's features, from the cache when an npz file's checksum keys it; with the
    cache's status and path."""
    if ref_sha is None:  # a folder has no single checksum to key a cache with
        return (
            features.extract_features(ref_src, model, desc="reference", **extract),
            "disabled",
            None,
        )
    return features.cached_features(
        ref_src,
        model,
        file_sha256=ref_sha,
        weights_sha256=weights_sha,
        cache_dir=cache_dir,
        warn=lambda m: warn(m, RuntimeWarning),
        desc="reference",
        **extract,
    )


def _check_inputs(
    ref_src: ImageSource,
    sam_src: ImageSource,
    comparison: dict[str, Any] | None,
    compare_path: Path | None,
    warn: Callable[..., None],
) -> None:
    """Refuse fewer than 2 images; warn where the numbers will not compare with others: image
    sizes that differ, non-standard counts, a comparison on another sample count."""
    for src, what in ((ref_src, "reference"), (sam_src, "sample")):
        if src.count < 2:
            raise ValueError(
                f"{src.path}: {src.count} {what} image(s); FID's covariance needs at least 2"
            )
    if ref_src.size != sam_src.size:
        warn(
            f"reference images are {ref_src.size[0]}x{ref_src.size[1]} but samples are "
            f"{sam_src.size[0]}x{sam_src.size[1]}: the resize to 299x299 then differs between "
            "them and enters the metrics (ADM compares batches of one resolution)",
            depth=1,
        )
    if sam_src.count != STANDARD_SAMPLE_COUNT:
        warn(
            f"{sam_src.path} holds {sam_src.count} samples, not the standard "
            f"{STANDARD_SAMPLE_COUNT}: FID is biased in N, so compare these numbers only with "
            f"FIDs computed on {sam_src.count} samples",
            FIDComparabilityWarning,
            depth=1,
        )
    if ref_src.count != STANDARD_REF_COUNT:
        warn(
            f"{ref_src.path} holds {ref_src.count} reference images, not ADM's "
            f"{STANDARD_REF_COUNT}: precision/recall (and FID from the images) depend on it",
            depth=1,
        )
    if comparison is not None:
        n_other = comparison["samples"]["num_images"]
        if n_other != sam_src.count:
            warn(
                f"{compare_path} was computed on {n_other} samples, this run on {sam_src.count}: "
                "FIDs computed on different sample counts are not comparable (FID is biased "
                "in N)",
                FIDComparabilityWarning,
                depth=1,
            )


def _frechet_metrics(
    ref_feats: BatchFeatures,
    sam_feats: BatchFeatures,
    file_stats: dict[str, Any],
    ref_src: ImageSource,
    sam_src: ImageSource,
    warn: Callable[..., None],
) -> tuple[dict[str, float | None], dict[str, dict[str, str]], dict[str, float]]:
    """FID and sFID: the reference file's statistics when present (ADM), else its images'.
    Returns the metrics, where each side's statistics came from, and (information) how far
    the file's statistics are from those of its own images."""
    metrics: dict[str, float | None] = {}
    sources: dict[str, dict[str, str]] = {}
    file_vs_images: dict[str, float] = {}
    for metric, r_stats, s_stats in (
        ("fid", ref_feats.pool_stats, sam_feats.pool_stats),
        ("sfid", ref_feats.spatial_stats, sam_feats.spatial_stats),
    ):
        d = STAT_DIMS[metric]
        if metric in file_stats:
            mu_r, sigma_r = file_stats[metric]
            keys = STAT_KEYS[metric]
            sources[metric] = {"reference": f"file ({keys[0]}, {keys[1]})", "samples": "computed"}
            file_vs_images[metric] = frechet_distance(r_stats.mean, r_stats.cov, mu_r, sigma_r)
        else:
            mu_r, sigma_r = r_stats.mean, r_stats.cov
            sources[metric] = {
                "reference": f"computed from {ref_src.count} images",
                "samples": "computed",
            }
            if ref_src.count <= d:
                warn(_rank_msg(ref_src, metric, d), depth=1)
        if sam_src.count <= d:
            warn(_rank_msg(sam_src, metric, d), depth=1)
        metrics[metric] = frechet_distance(s_stats.mean, s_stats.cov, mu_r, sigma_r)
    return metrics, sources, file_vs_images


def _score_metrics(
    metrics: dict[str, float | None],
    ref_feats: BatchFeatures,
    sam_feats: BatchFeatures,
    weights_path: Path,
    pr_mode: DistanceMode,
    dev: torch.device,
    warn: Callable[..., None],
) -> list[float]:
    """Inception Score (the samples' 1008-way logits, splits of 5000, ADM) and precision/recall
    (k = 3, pool features against the reference's) into ``metrics``; the IS split scores."""
    split_scores: list[float] = []
    if np.isfinite(sam_feats.logits).all():
        score = inception_score_splits(sam_feats.logits, IS_SPLIT_SIZE)
        metrics["inception_score"] = score.score
        split_scores = score.split_scores
    else:
        metrics["inception_score"] = None
        warn(
            f"{weights_path} has no fc layer (pytorch-fid's wrapper file): no Inception Score",
            depth=1,
        )
    if min(ref_feats.count, sam_feats.count) > PR_K:
        pr = precision_recall(ref_feats.pool, sam_feats.pool, k=PR_K, mode=pr_mode, device=dev)
        metrics["precision"], metrics["recall"] = pr.precision, pr.recall
    else:
        metrics["precision"] = metrics["recall"] = None
        warn(
            f"precision/recall with k = {PR_K} need at least {PR_K + 1} images per set: skipped",
            depth=1,
        )
    return split_scores


def _rank_msg(src: ImageSource, metric: str, d: int) -> str:
    name = {"fid": "FID", "sfid": "sFID"}[metric]
    return (
        f"{src.path}: {src.count} images for {d}-d features: the covariance is rank-deficient "
        f"(rank <= {src.count - 1} < {d}), so {name} is strongly biased and noisy at this size; "
        "use more images than the feature dimension"
    )


def _compare(
    path: Path,
    other: dict[str, Any],
    ref_sha: str | None,
    weights_sha: str,
    warn: Callable[[str], None],
) -> dict[str, Any]:
    o_ref = other["reference"].get("sha256")
    if ref_sha and o_ref and o_ref != ref_sha:
        warn(f"{path} was computed against a different reference batch (sha256 {o_ref[:12]}…)")
    o_w = other.get("inception", {}).get("weights_sha256")
    if o_w and weights_sha and o_w != weights_sha:
        warn(f"{path} was computed with different Inception weights (sha256 {o_w[:12]}…)")
    if other.get("evaluator") != EVALUATOR_VERSION:
        warn(f"{path} comes from another evaluator version: {other.get('evaluator')!r}")
    return {
        "path": str(path),
        "num_samples": other["samples"]["num_images"],
        "metrics": other["metrics"],
    }
