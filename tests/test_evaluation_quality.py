"""``fguide evaluate`` end to end on tiny batches, against the metrics computed directly.

The Inception gets fixture-init weights saved to a temporary file (the real weights are not
needed: the evaluator's plumbing is under test; the network itself is tested against the
fixtures in test_models_inception.py). Every Inception forward costs ~0.1-0.3 s per image on CPU, so
the batches hold 4 images and the features of a run are shared by the tests that read them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fixture_utils import fixture_init
from PIL import Image
from tolerances import assert_close, network_depth

import fguide.cli.evaluate
import fguide.evaluation.quality
import fguide.io.features
from fguide.cli.main import main
from fguide.evaluation import (
    EVALUATOR_VERSION,
    BatchFeatures,
    EvaluationWarning,
    cached_features,
    evaluate,
    open_images,
    read_reference_statistics,
)
from fguide.io import runs
from fguide.metrics import (
    FeatureStats,
    FIDComparabilityWarning,
    frechet_distance,
    inception_score,
    precision_recall,
)
from fguide.models.inception import FIDInception, load_fid_inception

N = 4  # images per batch (precision/recall with k = 3 need 4)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _save_weights(path: Path) -> Path:
    sd = {
        k: fixture_init(k, tuple(v.shape), 0).to(v.dtype)
        for k, v in FIDInception().state_dict().items()
    }
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Weights, a reference batch, a sample batch (two of its images are reference images,
    so precision and recall are not trivially 0), and the features computed directly."""
    root = tmp_path_factory.mktemp("evaluate")
    weights = _save_weights(root / "weights.pth")
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, 32)[None, :, None, None] * rng.uniform(0.3, 1, (N - 2, 1, 1, 3))
    smooth = np.broadcast_to(ramp, (N - 2, 32, 32, 3)).astype(np.uint8)
    sam = np.concatenate([ref[:2], smooth])
    np.savez(root / "ref.npz", ref)
    np.savez(root / "sam.npz", sam, np.arange(N))
    model = load_fid_inception(weights)
    with torch.no_grad():  # one batch per file, as the evaluator reads them (batch size 64)
        f_ref, f_sam = model(torch.from_numpy(ref)), model(torch.from_numpy(sam))
    return {
        "root": root,
        "weights": weights,
        "model": model,
        "ref_images": ref,
        "sam_images": sam,
        "ref_pool": f_ref.pool.numpy(),
        "ref_spatial": f_ref.spatial.numpy(),
        "sam_pool": f_sam.pool.numpy(),
        "sam_spatial": f_sam.spatial.numpy(),
        "sam_logits": f_sam.logits.numpy(),
    }


def _close_fid(actual: float, expected: float, samples: np.ndarray, *ref: np.ndarray) -> None:
    """FID = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr sqrt(Σ1 Σ2) from statistics that differ by
    their summation order: terms on the scale of the traces and ‖μ‖², cancelled; the
    eigendecomposition of a D × D matrix runs D stages."""
    mu1, s1 = _stats(samples)
    mu2, s2 = (ref[0], ref[1]) if len(ref) == 2 else _stats(ref[0])
    scale = float(np.trace(s1) + np.trace(s2) + (mu1 @ mu1) + (mu2 @ mu2))
    assert_close(actual, expected, torch.float64, depth=len(s1), scale=scale)


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


@pytest.fixture(scope="module")
def first_run(data: dict[str, Any]) -> dict[str, Any]:
    root = data["root"]
    out = root / "run1"
    code, stdout, stderr = _cli(
        [
            "evaluate",
            str(root / "ref.npz"),
            str(root / "sam.npz"),
            "--inception-weights",
            str(data["weights"]),
            "--cache-dir",
            str(root / "cache"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, stderr
    return {"json": json.loads((out / "metrics.json").read_text()), "out": stdout, "err": stderr}


def test_metrics_equal_direct_computation(data: dict[str, Any], first_run: dict[str, Any]) -> None:
    m = first_run["json"]["metrics"]
    fid = frechet_distance(*_stats(data["sam_pool"]), *_stats(data["ref_pool"]))
    sfid = frechet_distance(*_stats(data["sam_spatial"]), *_stats(data["ref_spatial"]))
    pr = precision_recall(data["ref_pool"], data["sam_pool"], k=3)
    assert fid > 0 and sfid > 0
    # the same features: only the statistics' summation order differs
    _close_fid(m["fid"], fid, data["sam_pool"], data["ref_pool"])
    _close_fid(m["sfid"], sfid, data["sam_spatial"], data["ref_spatial"])
    # the same float32 logits: a softmax over 1008 classes, then means over N images
    score = inception_score(data["sam_logits"])
    assert_close(m["inception_score"], score, torch.float64, depth=1008 + N)
    assert (m["precision"], m["recall"]) == (pr.precision, pr.recall)
    assert 0 < m["precision"] < 1  # the two shared images are inside, the ramps are not


def test_metrics_json_provenance_and_table(data: dict[str, Any], first_run: dict[str, Any]) -> None:
    j, root = first_run["json"], data["root"]
    assert j["evaluator"] == EVALUATOR_VERSION
    assert j["reference"]["sha256"] == _sha(root / "ref.npz")
    assert j["inception"]["weights_sha256"] == _sha(data["weights"])
    assert j["samples"]["num_images"] == N and j["reference"]["num_images"] == N
    assert j["reference"]["statistics"] == {
        "fid": f"computed from {N} images",
        "sfid": f"computed from {N} images",
    }
    assert j["samples"]["statistics"] == {"fid": "computed", "sfid": "computed"}
    assert j["reference"]["cache"] == "miss"
    assert j["provenance"]["fguide_version"]
    assert j["inception_score_splits"] == [j["metrics"]["inception_score"]]
    lines = first_run["out"].splitlines()
    fid_line = next(line for line in lines if line.startswith("FID "))
    fid = j["metrics"]["fid"]  # printed to 4 decimals, or 4 significant digits below 1e-3
    half_digit = 5e-5 if abs(fid) >= 1e-3 else 5e-4 * abs(fid)
    assert abs(float(fid_line.split()[-1]) - fid) <= half_digit
    assert "Precision" in first_run["out"] and "metrics.json" in first_run["out"]


def test_small_counts_warn(first_run: dict[str, Any]) -> None:
    warns = first_run["json"]["warnings"]
    assert any("not the standard 50000" in w for w in warns)
    assert any("rank-deficient" in w and "2048" in w for w in warns)
    assert any("rank-deficient" in w and "2023" in w for w in warns)
    assert "rank-deficient" in first_run["err"] and "warning" in first_run["err"]


def test_cache_hit_identical_and_compare_warns(
    data: dict[str, Any], first_run: dict[str, Any]
) -> None:
    root = data["root"]
    other = json.loads(json.dumps(first_run["json"]))
    other["samples"]["num_images"] = 50_000
    (root / "other.json").write_text(json.dumps(other))
    code, stdout, stderr = _cli(
        [
            "evaluate",
            str(root / "ref.npz"),
            str(root / "sam.npz"),
            "--inception-weights",
            str(data["weights"]),
            "--cache-dir",
            str(root / "cache"),
            "--out",
            str(root / "run2"),
            "--compare",
            str(root / "other.json"),
            "--no-progress",
        ]
    )
    assert code == 0, stderr
    j = json.loads((root / "run2" / "metrics.json").read_text())
    assert j["reference"]["cache"] == "hit"
    assert j["metrics"] == first_run["json"]["metrics"]
    assert any("50000 samples" in w and "not comparable" in w for w in j["warnings"])
    assert "not comparable" in stderr
    assert j["comparison"]["num_samples"] == 50_000
    assert "compared" in stdout and "+0.0000" in stdout


def test_corrupt_cache_is_recomputed(data: dict[str, Any], first_run: dict[str, Any]) -> None:
    root = data["root"]
    cached = Path(first_run["json"]["reference"]["cache_path"])
    cache2 = root / "cache2"
    cache2.mkdir()
    target = cache2 / cached.name
    shutil.copy(cached, target)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the stored features
    target.write_bytes(bytes(raw))
    model = data["model"]
    key = {"file_sha256": _sha(root / "ref.npz"), "weights_sha256": _sha(data["weights"])}
    source = open_images(root / "ref.npz")
    with pytest.warns(RuntimeWarning, match="invalid"):
        feats, status, path = cached_features(
            source, model, cache_dir=cache2, batch_size=2, progress=False, **key
        )
    assert status == "recomputed" and path == target
    # Recomputed in batches of 2: the same features (to float32 round-off) and statistics
    # equal to those of the stored rows.
    assert_close(feats.pool, data["ref_pool"], torch.float32, network_depth(model))
    mu, sigma = _stats(feats.pool)
    # N rows accumulated in another order: sums of N terms of the features' (products') size
    scale = float(np.abs(feats.pool).max())
    assert_close(feats.pool_stats.mean, mu, torch.float64, depth=N, scale=scale)
    assert_close(feats.pool_stats.cov, sigma, torch.float64, depth=2 * N, scale=scale**2)
    # The rewritten file is valid again: the next read is a hit with the same features.
    feats2, status2, _ = cached_features(source, model, cache_dir=cache2, progress=False, **key)
    assert status2 == "hit"
    np.testing.assert_array_equal(feats2.pool, feats.pool)
    np.testing.assert_array_equal(feats2.spatial_stats.cov, feats.spatial_stats.cov)


def _features(pool: np.ndarray, logits: np.ndarray, spatial: np.ndarray) -> BatchFeatures:
    return BatchFeatures(pool, logits, FeatureStats().update(pool), FeatureStats().update(spatial))


def test_precomputed_reference_statistics_are_used(
    data: dict[str, Any], first_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Which statistics are used is under test here, not the features (first_run does those):
    # the features come from the data fixture instead of a second Inception pass.
    root = data["root"]
    nan_logits = np.full((N, 1008), np.nan, np.float32)
    feats = {
        root / "ref_stats.npz": _features(data["ref_pool"], nan_logits, data["ref_spatial"]),
        root / "sam.npz": _features(data["sam_pool"], data["sam_logits"], data["sam_spatial"]),
    }
    fake = lambda src, *a, **k: feats[src.path]  # noqa: E731
    monkeypatch.setattr(fguide.io.features, "extract_features", fake)
    rng = np.random.default_rng(1)
    stats = {
        "mu": rng.normal(0, 1e-3, 2048),
        "sigma": np.diag(rng.uniform(1e-8, 1e-7, 2048)),
        "mu_s": rng.normal(0, 1e-2, 2023),
        "sigma_s": np.diag(rng.uniform(1e-4, 1e-3, 2023)),
    }
    np.savez(root / "ref_stats.npz", data["ref_images"], **stats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = evaluate(
            root / "ref_stats.npz",
            root / "sam.npz",
            weights=data["weights"],
            cache_dir=None,
            progress=False,
        )
    fid = frechet_distance(*_stats(data["sam_pool"]), stats["mu"], stats["sigma"])
    sfid = frechet_distance(*_stats(data["sam_spatial"]), stats["mu_s"], stats["sigma_s"])
    _close_fid(r.metrics["fid"], fid, data["sam_pool"], stats["mu"], stats["sigma"])
    _close_fid(r.metrics["sfid"], sfid, data["sam_spatial"], stats["mu_s"], stats["sigma_s"])
    assert abs(r.metrics["fid"] - first_run["json"]["metrics"]["fid"]) > 1e-3 * fid
    assert r.reference["statistics"] == {"fid": "file (mu, sigma)", "sfid": "file (mu_s, sigma_s)"}
    # Precision/recall still use the reference images: unchanged.
    assert r.metrics["precision"] == first_run["json"]["metrics"]["precision"]
    assert r.metrics["recall"] == first_run["json"]["metrics"]["recall"]
    assert r.reference["cache"] == "disabled"
    # No rank warning about the reference: its statistics did not come from its 5 images.
    assert not any(str(root / "ref_stats.npz") in w and "rank" in w for w in r.warnings)


def test_folder_input_equals_npz(data: dict[str, Any], first_run: dict[str, Any]) -> None:
    root = data["root"]
    folder = root / "sam_png"
    folder.mkdir()
    for i, im in enumerate(data["sam_images"]):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    src = open_images(folder)
    assert (src.kind, src.count, src.size, src.labels) == ("folder", N, (32, 32), None)
    batches = list(src.batches(3))
    assert [len(b) for b in batches] == [3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), data["sam_images"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = evaluate(
            root / "ref.npz",
            folder,
            weights=data["weights"],
            cache_dir=root / "cache",
            progress=False,
        )
    assert r.reference["cache"] == "hit"
    assert r.samples["kind"] == "folder" and r.samples["sha256"] is None
    assert r.metrics == first_run["json"]["metrics"]


def test_run_folder_that_is_not_complete_warns(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The features come from the data fixture (the run folder and its warning are under test).
    root = data["root"]
    run = root / "run_running"
    run.mkdir()
    shutil.copy(root / "sam.npz", run / runs.SAMPLES)
    (run / runs.MANIFEST).write_text(json.dumps({"format": runs.FORMAT, "status": "running"}))
    feats = {
        root / "ref.npz": _features(data["ref_pool"], data["sam_logits"], data["ref_spatial"]),
        run / runs.SAMPLES: _features(data["sam_pool"], data["sam_logits"], data["sam_spatial"]),
    }
    fake = lambda src, *a, **k: feats[src.path]  # noqa: E731
    monkeypatch.setattr(fguide.io.features, "extract_features", fake)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = evaluate(root / "ref.npz", run, weights=data["weights"], progress=False)
    assert r.samples["path"] == str(run / runs.SAMPLES)
    assert any("'running', not 'complete'" in w for w in r.warnings)


def test_out_is_checked_before_the_features(data: dict[str, Any], tmp_path: Path) -> None:
    # --out is a file: the error comes at once (no Inception pass), naming --out.
    blocker = tmp_path / "metrics-here"
    blocker.write_text("")
    code, err = _evaluate_cli(data, data["root"] / "ref.npz", data["root"] / "sam.npz", blocker)
    assert code == 2 and "--out" in err and "is a file" in err
    with pytest.raises(SystemExit) as exit_info:
        _cli(["evaluate", "ref.npz", "sam.npz", "--out", ""])
    assert exit_info.value.code == 2


# -- bad input (the readers' own errors: tests/test_io_images.py) -----------------------------


def test_a_folder_holding_the_users_files_is_refused(data: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    mine = {"metrics.json": "my metrics", "notes.txt": "my notes"}
    for name, text in mine.items():
        (out / name).write_text(text)
    code, err = _evaluate_cli(data, data["root"] / "ref.npz", data["root"] / "sam.npz", out)
    assert code == 2 and "(metrics.json, notes.txt)" in err
    assert {p.name: p.read_text() for p in out.iterdir()} == mine  # no lock or record added


def _failing_out(monkeypatch: pytest.MonkeyPatch, out: Path, failure: int) -> None:
    """Writes into ``out`` fail with ``failure`` (a full disk, a read-only folder)."""
    write = fguide.cli.evaluate.atomic_write_json

    def failing(path: Path, obj: Any) -> Path:
        if Path(path).parent == out:
            raise OSError(failure, os.strerror(failure), str(path))
        return write(path, obj)

    monkeypatch.setattr(fguide.cli.evaluate, "atomic_write_json", failing)


def test_out_filling_up_after_the_features_keeps_the_metrics(
    data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --out fills up once the features are computed: the table is printed and metrics.json is
    # kept in the cache folder, which the error names.
    failure = errno.ENOSPC
    root = data["root"]
    feats = {
        root / "ref.npz": _features(data["ref_pool"], data["sam_logits"], data["ref_spatial"]),
        root / "sam.npz": _features(data["sam_pool"], data["sam_logits"], data["sam_spatial"]),
    }
    monkeypatch.setattr(
        fguide.io.features, "extract_features", lambda src, *a, **k: feats[src.path]
    )
    monkeypatch.setattr(
        fguide.evaluation.quality, "load_fid_inception", lambda *a, **k: data["model"]
    )
    out, cache = tmp_path / "out", tmp_path / "cache"
    _failing_out(monkeypatch, out, failure)
    code, stdout, stderr = _cli(
        [
            "evaluate", str(root / "ref.npz"), str(root / "sam.npz"), "--inception-weights",
            str(data["weights"]), "--cache-dir", str(cache), "--out", str(out), "--no-progress",
        ]
    )  # fmt: skip
    assert code == 2 and not (out / "metrics.json").exists()
    (kept,) = (cache / "unsaved-metrics").glob("metrics-*.json")
    assert f"kept in {kept}" in stderr and os.strerror(failure) in stderr
    saved = json.loads(kept.read_text())
    assert saved["evaluator"] == EVALUATOR_VERSION and saved["samples"]["num_images"] == N
    fid_line = next(line for line in stdout.splitlines() if line.startswith("FID "))
    assert float(fid_line.split()[-1]) == pytest.approx(saved["metrics"]["fid"], rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("failure", [errno.EROFS, errno.ENOSPC], ids=["read-only", "full"])
def test_metrics_go_to_a_fallback_that_the_error_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: int
) -> None:
    out, data = tmp_path / "out", {"metrics": {"fid": 1.5}}
    _failing_out(monkeypatch, out, failure)
    with pytest.raises(OSError, match=os.strerror(failure)) as err:
        fguide.cli.evaluate.write_metrics(out, data, tmp_path / "cache")
    (kept,) = (tmp_path / "cache" / "unsaved-metrics").glob("metrics-*.json")
    assert f"kept in {kept}" in str(err.value) and json.loads(kept.read_text()) == data
    # No cache folder (--no-cache): the system's temporary folder.
    monkeypatch.setattr(fguide.cli.evaluate.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    with pytest.raises(OSError, match=f"kept in {tmp_path / 'tmp'}"):
        fguide.cli.evaluate.write_metrics(out, data, None)


def test_mixed_folder_error_names_the_flag_that_exists(data: dict[str, Any]) -> None:
    folder = data["root"] / "mixed_sizes"
    folder.mkdir()
    Image.fromarray(data["ref_images"][0]).save(folder / "a.png")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(folder / "b.png")
    code, err = _evaluate_cli(data, data["root"] / "ref.npz", folder)
    assert code == 2 and "different sizes" in err and "--image-size N" in err
    from fguide.cli.main import build_parser

    args = build_parser().parse_args(["evaluate", "r", "s", "--image-size", "16"])
    assert args.image_size == 16
    # --help's defaults are the API's.
    import inspect

    api = inspect.signature(evaluate).parameters
    assert (args.workers, args.pr_mode) == (api["workers"].default, api["pr_mode"].default)


def _evaluate_cli(
    data: dict[str, Any], ref: Path, sam: Path, out: Path | None = None
) -> tuple[int, str]:
    code, _, err = _cli(
        [
            "evaluate",
            str(ref),
            str(sam),
            "--inception-weights",
            str(data["weights"]),
            "--no-cache",
            "--out",
            str(out or data["root"] / "bad"),
            "--no-progress",
        ]
    )
    return code, err


def test_missing_arr_0_names_file_and_keys(data: dict[str, Any]) -> None:
    bad = data["root"] / "no_arr0.npz"
    np.savez(bad, images=data["ref_images"])
    code, err = _evaluate_cli(data, bad, data["root"] / "sam.npz")
    assert code == 2
    assert "fguide evaluate: error:" in err and str(bad) in err
    assert "'arr_0'" in err and "images" in err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"mu": np.zeros(2048)}, "no 'sigma'"),
        (
            {"mu": np.zeros(100), "sigma": np.eye(100)},
            "['mu'] must be a float array of shape [2048]",
        ),
        ({"mu_s": np.zeros(2023), "sigma_s": np.full((2023, 2023), np.nan)}, "['sigma_s']"),
    ],
)
def test_bad_reference_statistics(data: dict[str, Any], extra: dict[str, Any], needle: str) -> None:
    bad = data["root"] / "bad_stats.npz"
    np.savez(bad, data["ref_images"], **extra)
    with pytest.raises(ValueError, match="bad_stats.npz") as err:
        read_reference_statistics(bad)
    assert needle in str(err.value)
    code, stderr = _evaluate_cli(data, bad, data["root"] / "sam.npz")
    assert code == 2 and needle in stderr


def test_too_few_images_is_an_error(data: dict[str, Any]) -> None:
    one = data["root"] / "one.npz"
    np.savez(one, data["ref_images"][:1])
    code, err = _evaluate_cli(data, data["root"] / "ref.npz", one)
    assert code == 2 and str(one) in err and "at least 2" in err


def test_compare_file_must_be_metrics_json(data: dict[str, Any]) -> None:
    bad = data["root"] / "not_metrics.json"
    bad.write_text(json.dumps({"fid": 3.0}))
    with pytest.raises(ValueError, match="no 'metrics' section"):
        evaluate(
            data["root"] / "ref.npz", data["root"] / "sam.npz", weights=data["weights"], compare=bad
        )


def test_missing_weights_says_which_file(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FGUIDE_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.chdir(data["root"])  # the default --out, fguide-eval, goes there
    code, _, err = _cli(["evaluate", str(data["root"] / "ref.npz"), str(data["root"] / "sam.npz")])
    assert code == 2 and "pt_inception-2015-12-05-6726825d.pth" in err


def test_non_finite_features_and_size_mismatch(data: dict[str, Any]) -> None:
    root = data["root"]
    sd = torch.load(data["weights"], weights_only=True)
    # A negative variance: sqrt(var + eps) is NaN, and so is every feature after it.
    sd["Mixed_6a.branch3x3.bn.running_var"][0] = -1.0
    bad_weights = root / "nan_weights.pth"
    torch.save(sd, bad_weights)
    np.savez(root / "ref2.npz", data["ref_images"][:2])
    big = np.zeros((2, 48, 48, 3), np.uint8)
    np.savez(root / "sam48.npz", big)
    with (
        pytest.warns(EvaluationWarning, match="32x32 but samples are 48x48"),
        pytest.warns(EvaluationWarning, match="2 reference images, not ADM's 10000"),
        pytest.warns(FIDComparabilityWarning),
        pytest.raises(
            ValueError, match=r"non-finite Inception features .*ref2\.npz\['arr_0'\]\[0\]"
        ),
    ):
        evaluate(root / "ref2.npz", root / "sam48.npz", weights=bad_weights, progress=False)
