"""ADM evaluator metrics: parity with ``metrics_from_features.pt`` and properties."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from fixture_utils import case_names, get_case, load_fixture
from tolerances import assert_close

from fguide.metrics import (
    DistanceMode,
    FeatureStats,
    FIDComparabilityWarning,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    inception_score_splits,
    manifold_radii,
    precision_recall,
    trace_sqrt_product,
    warn_if_incomparable,
)
from fguide.metrics import fid as fid_mod
from fguide.metrics.precision_recall import _Features, _sq_distances

FIXTURE = "metrics_from_features.pt"
PR_MODES: tuple[DistanceMode, ...] = ("float32", "float64", "float16")
F64 = torch.float64


def _features(case: dict, which: str) -> np.ndarray:
    """Decode a case's features as the fixtures README says, then ADM's float32 cast."""
    if f"{which}_features_code" in case:
        x = case[f"{which}_features_code"].double() / 32.0
    else:
        x = case[f"{which}_features"].double()
    return x.float().numpy()


def _sqrt_amplification(x1: np.ndarray, x2: np.ndarray) -> float:
    """The scale on which tr sqrt(Σ1 Σ2), computed from the statistics, carries rounding: an
    eigenvalue λ_i of Σ1 moves by ∝ λ1_max (a backward-stable eigensolver), so sqrt(λ_i) by
    ∝ λ1_max / (2 sqrt λ_i), which the other factor scales by sqrt(λ2_max); and vice versa.
    Eigenvalues from the features' singular values (numpy), those below D·eps·λ_max dropped
    as the code drops them."""
    lams = []
    for x in (x1, x2):
        a = x.astype(np.float64)
        lam = np.linalg.svd(a - a.mean(0), compute_uv=False) ** 2 / (len(a) - 1)
        lams.append(lam[lam > a.shape[1] * np.finfo(np.float64).eps * lam[0]])
    (l1, l2) = lams
    return float(l1[0] * np.sqrt(l2[0]) * (1 / np.sqrt(l1)).sum()) + float(
        l2[0] * np.sqrt(l1[0]) * (1 / np.sqrt(l2)).sum()
    )


# ---------------------------------------------------------------- fixture parity (every case)


@pytest.mark.parametrize("name", case_names(FIXTURE))
def test_metrics_case(name: str) -> None:
    case = get_case(FIXTURE, name)
    kind = case["config"]["kind"]
    if kind == "fid":
        _check_fid(case)
    elif kind == "inception_score":
        _check_inception_score(case)
    elif kind == "precision_recall":
        for mode in PR_MODES:
            _check_precision_recall(case, mode)
    else:
        pytest.fail(f"case {name}: unknown kind {kind!r}")


def _check_fid(case: dict) -> None:
    cfg = case["config"]
    ref, sample = _features(case, "ref"), _features(case, "sample")
    assert ref.shape == (cfg["n_ref"], cfg["dim"]) and sample.shape == (cfg["n_sample"], cfg["dim"])
    # Streamed in uneven chunks: the accumulator must not depend on the batching.
    st_ref = FeatureStats()
    for chunk in np.array_split(ref, 7):
        st_ref.update(chunk)
    st_sam = FeatureStats().update(torch.from_numpy(sample))
    d = cfg["dim"]
    for st, which, x in ((st_ref, "ref", ref), (st_sam, "sample", sample)):
        # sums over n rows of the features (and of their products), in float64
        n, size = len(x), float(np.abs(x).max())
        assert_close(st.mean, case[f"mu_{which}"], F64, depth=n, scale=size)
        cov = st.cov
        assert_close(np.diag(cov), case[f"diag_sigma_{which}"], F64, 2 * n, scale=size**2)
        trace = case[f"trace_sigma_{which}"]
        assert_close(np.trace(cov), trace, F64, depth=2 * n + d)
        if f"sigma_{which}" in case:
            assert_close(cov, case[f"sigma_{which}"], F64, 2 * n, scale=size**2)
    diff = st_sam.mean - st_ref.mean
    mean_scale = float(((np.abs(st_sam.mean) + np.abs(st_ref.mean)) ** 2).sum())
    depth = len(sample) + len(ref) + d
    assert_close(diff @ diff, case["mean_diff_sq"], F64, depth, scale=mean_scale)

    exact = case["fid_exact"]
    # FID = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr sqrt(Σ1 Σ2): terms on the scale of the traces and
    # the means, cancelled; the statistics' sums over the rows, then D × D eigensolvers. From
    # the statistics, the square roots of small eigenvalues amplify their rounding.
    scale = float(np.trace(st_sam.cov) + np.trace(st_ref.cov)) + mean_scale
    stats_scale = scale + _sqrt_amplification(sample, ref)
    fid_depth = len(sample) + len(ref) + d
    for (m1, s1), (m2, s2) in (
        ((st_sam.mean, st_sam.cov), (st_ref.mean, st_ref.cov)),
        ((st_ref.mean, st_ref.cov), (st_sam.mean, st_sam.cov)),  # symmetric
    ):
        fid_stats = frechet_distance(m1, s1, m2, s2)
        assert_close(fid_stats, exact, F64, fid_depth, scale=stats_scale)
    tr = trace_sqrt_product(st_sam.cov, st_ref.cov)
    assert_close(tr, case["tr_covmean_exact"], F64, fid_depth, scale=stats_scale)
    # The nuclear-norm path (singular values of the features) whatever the rank.
    fid_nuc = frechet_distance_from_features(sample, ref)
    assert_close(fid_nuc, exact, F64, fid_depth, scale=scale)
    assert_close(frechet_distance_from_features(ref, sample), exact, F64, fid_depth, scale=scale)
    # ADM's own value (scipy's sqrtm of the near-singular Σ1 Σ2, the error of its method, not
    # rounding) is ~1e-5 away at 2048-d: information, checked loosely.
    assert abs(fid_nuc - case["fid_adm"]) < 1e-4 * abs(case["fid_adm"])


def _check_inception_score(case: dict) -> None:
    cfg = case["config"]
    logits = case["logits_code"].double() / 8.0 - 12.0
    assert logits.shape == (cfg["n"], cfg["classes"])
    res = inception_score_splits(logits, split_size=cfg["split_size"])
    assert len(res.split_scores) == cfg["num_splits"]
    # softmaxes over the classes, KL sums over them, means over the rows; exp of the mean KL
    # (the score's relative error is the mean KL's absolute one)
    depth = cfg["classes"] + cfg["n"]
    kl_scale = float(res.kl_per_row.max())
    score_scale = res.score * kl_scale
    assert_close(res.score, case["inception_score_float64"], F64, depth, scale=score_scale)
    splits = case["split_scores_float64"]
    assert_close(res.split_scores, splits, F64, depth, scale=float(max(splits)) * kl_scale)
    assert_close(res.kl_per_row, case["kl_per_row_float64"], F64, depth)
    assert inception_score(logits.numpy(), split_size=cfg["split_size"]) == res.score
    # ADM's value: the same computation in float32
    adm = case["inception_score_adm"]
    assert_close(res.score, adm, torch.float32, depth, scale=score_scale)


def _check_precision_recall(case: dict, mode: DistanceMode) -> None:
    cfg = case["config"]
    ref, sample = _features(case, "ref"), _features(case, "sample")
    assert cfg["row_batch_size"] == cfg["col_batch_size"]
    # A small block exercises the blocking (and per-block fallback); at 2048-d once is enough.
    blocks = [cfg["row_batch_size"]]
    if mode == "float32" or cfg["dim"] <= 256:
        blocks.append(97)
    for block in blocks:
        pr = precision_recall(ref, sample, k=cfg["k"], mode=mode, block_size=block)
        msg = f"mode {mode}, block {block}"
        assert pr.precision == case["precision_exact"], msg
        assert pr.recall == case["recall_exact"], msg
        np.testing.assert_array_equal(
            pr.sample_in_ref_manifold, case["sample_in_ref_manifold"].numpy(), err_msg=msg
        )
        np.testing.assert_array_equal(
            pr.ref_in_sample_manifold, case["ref_in_sample_manifold"].numpy(), err_msg=msg
        )
        # squared distances ‖a‖² + ‖b‖² − 2 a·b in the mode's dtype: D-term sums, cancelled
        dtype = {"float64": F64, "float32": torch.float32, "float16": torch.float16}[mode]
        for radii, x, key in ((pr.radii_ref, ref, "ref"), (pr.radii_sample, sample, "sample")):
            scale = 2 * float((x.astype(np.float64) ** 2).sum(1).max())
            exact_radii = case[f"radii_{key}_exact"]
            assert_close(radii, exact_radii, dtype, cfg["dim"], scale=scale, msg=msg)
        if mode == "float16":
            # Recomputed in float32 exactly where ADM's float16 blocks were non-finite.
            assert (pr.fallback_blocks > 0) == (not cfg["adm_used_float16_path"]), msg
        else:
            assert pr.fallback_blocks == 0


def test_float16_overflow_case_needs_the_fallback() -> None:
    """Without the float32 recomputation, float16 norm expansion is non-finite on this case."""
    load_fixture(FIXTURE)  # skips with the reason when the fixtures are missing
    names = [
        n
        for n in case_names(FIXTURE)
        if n.startswith("pr_") and not get_case(FIXTURE, n)["config"]["adm_used_float16_path"]
    ]
    assert names, "no precision/recall case exercises the float16 fallback"
    for name in names:
        case = get_case(FIXTURE, name)
        f = _Features(torch.from_numpy(_features(case, "ref")), "float16")
        assert f.x16 is not None and f.norm16 is not None
        d16 = _sq_distances(f.x16, f.x16, f.norm16, f.norm16)
        assert not bool(torch.isfinite(d16).all())


# ---------------------------------------------------------------- FID properties


def test_feature_stats_merge_equals_np_cov() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(503, 17)) * rng.uniform(0.1, 5, size=17)
    # Small blocks: several buffered folds inside each accumulator, then merges.
    a = FeatureStats(block_rows=64).update(x[:100]).update(x[100:101]).update(x[101:250])
    b = FeatureStats(dim=17, block_rows=1).update(x[250:])
    merged = FeatureStats().merge(a).merge(FeatureStats()).merge(b)
    assert merged.count == 503
    size = float(np.abs(x).max())  # sums over 503 rows of values and products, in float64
    assert_close(merged.mean, x.mean(axis=0), F64, depth=503, scale=size)
    assert_close(merged.cov, np.cov(x, rowvar=False), F64, depth=2 * 503, scale=size**2)
    restored = FeatureStats.from_state_dict(merged.state_dict())
    np.testing.assert_array_equal(restored.cov, merged.cov)
    with pytest.raises(ValueError, match="dimension"):
        merged.update(x[:, :5])
    with pytest.raises(ValueError, match="dimension"):
        FeatureStats(dim=4).update(x)
    with pytest.raises(ValueError, match="non-finite"):
        FeatureStats().update(np.full((3, 2), np.inf))
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStats().update(x[:1]).cov


def test_fid_identical_sets_is_zero() -> None:
    rng = np.random.default_rng(1)
    for n, d in ((400, 32), (20, 64)):  # full rank and rank-deficient
        x = rng.normal(size=(n, d))
        st = FeatureStats().update(x)
        scale = 2 * float(np.trace(st.cov))  # 2 tr Σ − 2 tr sqrt(Σ Σ), cancelled
        same = frechet_distance(st.mean, st.cov, st.mean, st.cov)
        assert_close(same, 0.0, F64, n + d, scale=scale)
        assert_close(frechet_distance_from_features(x, x), 0.0, F64, n + d, scale=scale)


def test_fid_closed_form_and_symmetry() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # common rotation: Σ1, Σ2 commute
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    # cancelled terms of the size of the traces and the means; an 8 × 8 eigensolver
    scale = float(a.sum() + b.sum() + mu1 @ mu1 + mu2 @ mu2)
    assert_close(frechet_distance(mu1, s1, mu2, s2), expected, F64, depth=3 * 8, scale=scale)
    # Non-commuting pair: symmetric in its arguments, equal to the nuclear-norm path.
    x, y = rng.normal(size=(300, 12)), rng.normal(size=(250, 12)) @ rng.normal(size=(12, 12))
    sx, sy = FeatureStats().update(x), FeatureStats().update(y)
    f_xy = frechet_distance(sx.mean, sx.cov, sy.mean, sy.cov)
    scale = float(np.trace(sx.cov) + np.trace(sy.cov) + sx.mean @ sx.mean + sy.mean @ sy.mean)
    depth = 300 + 250 + 12  # the statistics' sums, then a 12 × 12 eigensolver
    f_yx = frechet_distance(sy.mean, sy.cov, sx.mean, sx.cov)
    assert_close(f_yx, f_xy, F64, depth, scale=scale)
    assert_close(frechet_distance_from_features(x, y), f_xy, F64, depth, scale=scale)


def test_fid_errors_name_the_statistics() -> None:
    mu, sigma = np.zeros(4), np.eye(4)
    bad = sigma.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu, sigma, mu, bad)
    with pytest.raises(ValueError, match="mu1"):
        frechet_distance(np.full(4, np.inf), sigma, mu, sigma)
    with pytest.raises(ValueError, match="must be"):
        frechet_distance(mu, np.eye(3), mu, sigma)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(mu, np.diag([1.0, 1.0, 1.0, -0.5]), mu, sigma)
    with pytest.raises(ValueError, match="features2"):
        frechet_distance_from_features(np.ones((5, 3)), np.full((5, 3), np.nan))


def test_fid_non_finite_trace_falls_back_to_eps(monkeypatch: pytest.MonkeyPatch) -> None:
    real = fid_mod._trace_sqrt_product
    calls: list[float] = []

    def flaky(s1: np.ndarray, s2: np.ndarray) -> float:
        calls.append(float(s1[0, 0]))
        return math.nan if len(calls) == 1 else real(s1, s2)

    monkeypatch.setattr(fid_mod, "_trace_sqrt_product", flaky)
    s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 4.0])
    with pytest.warns(RuntimeWarning, match="1e-06"):
        value = frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
    assert calls == [1.0, 1.0 + 1e-6]
    e = 1e-6
    expected = 1 + 2 + 3 + 4 - 2 * (math.sqrt((1 + e) * (3 + e)) + math.sqrt((2 + e) * (4 + e)))
    assert_close(value, expected, F64, depth=8, scale=10.0)  # terms summing to 10, cancelled


def test_warn_if_incomparable() -> None:
    with pytest.warns(FIDComparabilityWarning, match="10000"):
        assert warn_if_incomparable({"run_a": 50000, "run_b": 10000})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_incomparable([50000, 50000])


# ---------------------------------------------------------------- IS and P/R properties


def test_inception_score_limits_and_splits() -> None:
    # Identical predictions: KL = 0, IS = 1. Distinct near-one-hot predictions: IS = N.
    # softmaxes over the classes, KL sums over them, means over the rows
    assert_close(inception_score(torch.zeros(6, 10)), 1.0, F64, depth=10 + 6)
    one_hot = torch.full((7, 1008), -1e4, dtype=torch.float64)
    one_hot[torch.arange(7), torch.arange(7) * 3] = 1e4
    assert_close(inception_score(one_hot), 7.0, F64, depth=1008 + 7)
    # A short last split counts as much as a full one: splits {5 rows, 2 rows} -> (5 + 2) / 2.
    res = inception_score_splits(one_hot, split_size=5)
    assert_close(res.split_scores, [5.0, 2.0], F64, depth=1008 + 5)
    assert_close(res.score, 3.5, F64, depth=1008 + 7)
    with pytest.raises(ValueError, match="split_size"):
        inception_score(one_hot, split_size=0)


def test_precision_recall_properties() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(60, 5)).astype(np.float32)
    # Radii equal the brute-force float64 4th smallest squared distance (self included).
    d = ((ref[:, None, :].astype(np.float64) - ref[None, :, :]) ** 2).sum(-1)
    expected = np.sort(d, axis=1)[:, 3]
    for mode in PR_MODES:
        r = manifold_radii(ref, mode=mode, block_size=16)
        dtype = {"float64": F64, "float32": torch.float32, "float16": torch.float16}[mode]
        scale = 2 * float((ref.astype(np.float64) ** 2).sum(1).max())  # ‖a‖² + ‖b‖² − 2 a·b
        assert_close(r, expected, dtype, depth=5, scale=scale, msg=mode)
    # Identical sets: everything is inside. One far sample: outside, and precision drops.
    pr = precision_recall(ref, ref, block_size=7)
    assert pr.precision == 1.0 and pr.recall == 1.0
    sample = np.concatenate([ref[:39], np.full((1, 5), 100.0, dtype=np.float32)])
    pr = precision_recall(ref, sample, block_size=16)
    assert not pr.sample_in_ref_manifold[-1] and pr.sample_in_ref_manifold[:-1].all()
    assert pr.precision == 39 / 40
    assert pr.recall == pr.ref_in_sample_manifold.mean()
    with pytest.raises(ValueError, match="k \\+ 1"):
        precision_recall(ref[:3], ref)
    with pytest.raises(ValueError, match="mode"):
        precision_recall(ref, ref, mode="bfloat16")  # type: ignore[arg-type]


def test_precision_recall_counts_a_point_exactly_on_a_radius_as_inside() -> None:
    """ADM's ManifoldEstimator: d(s, r) ≤ r_r is inside (``<=``, not ``<``). Integer features
    make every squared distance exact in float16, float32 and float64.

    R = {0, 1, 2, 3} ∪ {20, 21, 22, 23} (1-d): radii (4th smallest squared distance, self
    included) 9 at the ends of a cluster, 4 inside. S = {−3, −4, −5, −6}: radii 9, 4, 4, 9.
    s = −3 is at squared distance 9 = r_0 from r = 0 (on the radius, inside); every other s is
    outside every reference radius. Symmetrically r = 0 is at 9 = r_{−3} from s = −3 (inside),
    every other r outside.
    """
    ref = np.array([0, 1, 2, 3, 20, 21, 22, 23], dtype=np.float32)[:, None]
    sample = np.array([-3, -4, -5, -6], dtype=np.float32)[:, None]
    for mode in PR_MODES:
        np.testing.assert_array_equal(manifold_radii(ref, mode=mode), [9, 4, 4, 9, 9, 4, 4, 9])
        np.testing.assert_array_equal(manifold_radii(sample, mode=mode), [9, 4, 4, 9])
        for block in (10000, 3):
            pr = precision_recall(ref, sample, mode=mode, block_size=block)
            msg = f"mode {mode}, block {block}"
            np.testing.assert_array_equal(pr.sample_in_ref_manifold, [1, 0, 0, 0], err_msg=msg)
            np.testing.assert_array_equal(
                pr.ref_in_sample_manifold, [1, 0, 0, 0, 0, 0, 0, 0], err_msg=msg
            )
            assert (pr.precision, pr.recall) == (1 / 4, 1 / 8), msg


def test_fid_cuts_round_off_eigenvalues_of_rank_deficient_covariances() -> None:
    """Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ (Q a random rotation, so the zeros are only zero to
    round-off) with supports overlapping on two directions: tr sqrt(Σ1 Σ2) = Σ_i sqrt(a_i b_i).
    The product has null directions whose computed eigenvalues are ±round-off: unclamped they
    give a NaN (then ADM's 1e-6·I fallback and its warning) or sqrt(round-off) ≈ 1e-8 each."""
    rng = np.random.default_rng(7)
    d = 40
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = np.zeros(d), np.zeros(d)
    a[:12] = rng.uniform(0.5, 2.0, size=12)  # rank 12
    b[10:20] = rng.uniform(0.5, 2.0, size=10)  # rank 10, sharing directions 10 and 11 with a
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    tr_exact = float(np.sqrt(a * b).sum())
    expected = float(np.sum((mu1 - mu2) ** 2) + a.sum() + b.sum() - 2 * tr_exact)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 1e-6·I fallback
        # (the uncut sqrt(round-off) ≈ 1e-8 per null direction would be far outside these)
        depth = 3 * d  # Q diag Qᵀ products, then a d × d eigensolver
        for x, y in ((s1, s2), (s2, s1)):
            assert_close(trace_sqrt_product(x, y), tr_exact, F64, depth)
        scale = float(a.sum() + b.sum() + mu1 @ mu1 + mu2 @ mu2)
        assert_close(frechet_distance(mu1, s1, mu2, s2), expected, F64, depth, scale=scale)
        assert_close(frechet_distance(mu2, s2, mu1, s1), expected, F64, depth, scale=scale)
