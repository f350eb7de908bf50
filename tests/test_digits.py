"""The digits world: data split, deterministic cached training, the pipeline end to end.

Everything trains tiny networks for a few steps on a subset of the digits: the numbers mean
nothing, the pipeline is what is checked.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tolerances
import torch

pytest.importorskip("sklearn")

from fguide.io.files import sha256_file  # noqa: E402
from fguide.models.loading import load_model, load_state_dict_file  # noqa: E402
from fguide.worlds import digits_train  # noqa: E402
from fguide.worlds.digits import (  # noqa: E402
    CLEAN_CLASSIFIER_SPEC,
    FEATURE_NETWORK_SPEC,
    METHODS,
    DigitsConfig,
    DigitsData,
    FeatureNet,
    load_digits_data,
    split_digits,
)
from fguide.worlds.digits_run import (  # noqa: E402
    DigitsEvaluator,
    _sample_config_kwargs,
    run_digits_world,
    sample_method,
)
from fguide.worlds.digits_train import TrainedWorld, cache_key, load_or_train  # noqa: E402


def _tiny_config(**kw: Any) -> DigitsConfig:
    base: dict[str, Any] = dict(
        diffusion_steps=4,
        classifier_steps=4,
        noisy_classifier_steps=2,
        feature_steps=4,
        train_batch=16,
        sample_steps=3,
        num_samples=20,
        batch_size=20,
        sweep_samples=20,
        scale_grid=(1.0,),
        adm_scale_grid=(2.0,),
        methods=("none", "adm_cg", "base", "tilted"),
        tilt_group=4,
        finetune_iters=1,
        calib_steps=1,
        calib_t_grid=(100, 800),
    )
    base.update(kw)
    return DigitsConfig.quick_config(**base)


def _subset(data: DigitsData, train_every: int = 12, held_every: int = 4) -> DigitsData:
    """Every k-th training / held-out image (sorted indices keep every class present)."""
    return dataclasses.replace(data, train=data.train[::train_every], held=data.held[::held_every])


@pytest.fixture(scope="module")
def digits() -> DigitsData:
    return load_digits_data()


@pytest.fixture(scope="module")
def tiny_world(
    digits: DigitsData, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainedWorld, DigitsData, DigitsConfig]:
    torch.set_num_threads(1)
    data = _subset(digits)
    config = _tiny_config()
    root = tmp_path_factory.mktemp("digits-cache")
    return load_or_train(data, config, root, progress=False), data, config


def test_data_encoding_and_stratified_disjoint_split(digits: DigitsData) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    assert digits.images.shape == (1797, 8, 8, 3) and digits.images.dtype == np.uint8
    # u = round(255 v / 16), three equal channels; x = u / 127.5 − 1 in [−1, 1]
    expected = np.rint(raw.images * 255.0 / 16.0)
    for c in range(3):
        np.testing.assert_array_equal(digits.images[..., c], expected)
    x = digits.x(digits.held[:5])
    assert x.shape == (5, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    ref = torch.from_numpy(expected[digits.held[:5]] / 127.5 - 1).float()
    tolerances.assert_close(x[:, 0], ref, torch.float32, depth=2)  # u / 127.5 − 1
    train, held = digits.train, digits.held
    assert len(np.intersect1d(train, held)) == 0
    np.testing.assert_array_equal(np.union1d(train, held), np.arange(1797))
    for k in range(10):
        n_k = int((raw.target == k).sum())
        assert int((digits.labels[held] == k).sum()) == round(0.2 * n_k)
    # deterministic for a seed, another seed holds out other images
    again = split_digits(digits.labels, 0.2, 0)
    np.testing.assert_array_equal(again[1], held)
    other = split_digits(digits.labels, 0.2, 1)[1]
    assert not np.array_equal(other, held) and len(other) == len(held)
    with pytest.raises(ValueError, match="held_fraction"):
        split_digits(digits.labels, 1.0)


def test_training_is_deterministic_and_cached(
    digits: DigitsData,
    tiny_world: tuple[TrainedWorld, DigitsData, DigitsConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world, data, config = tiny_world
    assert sorted(world.trained) == sorted(digits_train.FILES)
    # The same configuration and seed in another folder: same key, identical weights.
    again = load_or_train(data, config, tmp_path, progress=False)
    assert again.key == world.key and again.trained
    for name in digits_train.FILES:
        a = load_state_dict_file(world.files[name])
        b = load_state_dict_file(again.files[name])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # A second call reuses the cache and trains nothing.
    monkeypatch.setattr(digits_train, "_train_unet", _forbidden)
    monkeypatch.setattr(digits_train, "_train_classifier", _forbidden)
    reused = load_or_train(data, config, tmp_path, progress=False)
    assert reused.trained == [] and reused.folder == again.folder
    # The key follows the seed, the training settings and the data, not the sampling settings.
    assert cache_key(dataclasses.replace(config, seed=1), data) != world.key
    assert cache_key(dataclasses.replace(config, diffusion_lr=5e-4), data) != world.key
    assert cache_key(config, _subset(digits, 11)) != world.key
    assert cache_key(dataclasses.replace(config, num_samples=999, seeds=(5,)), data) == world.key
    # An incomplete folder (no meta.json) is not trusted.
    (again.folder / "meta.json").unlink()
    with pytest.raises(AssertionError, match="trained"):
        load_or_train(data, config, tmp_path, progress=False)


def _forbidden(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("trained although the cache holds the networks")


def test_feature_network_is_never_a_guide(
    tiny_world: tuple[TrainedWorld, DigitsData, DigitsConfig],
) -> None:
    world, _, config = tiny_world
    feature_sha = sha256_file(world.files["feature_net"])
    for method in METHODS:
        kw = _sample_config_kwargs(world, config, method, None)
        assert kw["classifier"] in (CLEAN_CLASSIFIER_SPEC, "adm")
        assert kw["classifier"] != FEATURE_NETWORK_SPEC
        assert sha256_file(kw["classifier_weights"]) != feature_sha


def test_evaluator_uses_the_feature_network(
    tiny_world: tuple[TrainedWorld, DigitsData, DigitsConfig],
) -> None:
    world, data, _ = tiny_world
    net = load_model(FeatureNet(), world.files["feature_net"]).eval()
    ev = DigitsEvaluator(net, data)  # type: ignore[arg-type]
    held, labels = data.images[data.held], data.labels[data.held]
    m = ev.evaluate(held, labels)
    # The held-out split against itself: zero Fréchet distance, full precision and recall,
    # and the accuracy is the feature network's own (independent code: argmax of its logits).
    # FD(f, f) = tr(2Σ − 2 sqrt(Σ Σ)) = 0 up to the matrix square root's rounding: d² stages
    # (d features) on the scale of tr Σ
    f = ev.features(held)
    cov_trace, d = float(np.trace(np.cov(f, rowvar=False))), f.shape[1]
    tolerances.assert_close(m["fd"], 0.0, torch.float64, depth=d * d, scale=cov_trace)
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    with torch.no_grad():
        acc = (net(data.x(data.held)).argmax(1).numpy() == labels).mean()
    assert m["accuracy"] == acc  # a fraction of the same count
    # Shuffled targets change the accuracy and the per-class distance, not the overall FD.
    rng = np.random.default_rng(0)
    shuffled = ev.evaluate(held, rng.permutation(labels))
    fd_depth = d * d + len(held)  # the same FD, with the samples' sums in another order
    tolerances.assert_close(shuffled["fd"], m["fd"], torch.float64, fd_depth, scale=cov_trace)
    assert shuffled["fd_class"] > m["fd_class"]


@pytest.mark.parametrize("method", ["none", "adm_cg", "tilted"])
def test_methods_run_through_run_sampling(
    method: str, tiny_world: tuple[TrainedWorld, DigitsData, DigitsConfig], tmp_path: Path
) -> None:
    world, data, config = tiny_world
    images, labels, traj = sample_method(tmp_path / method, world, config, method, 2.0, 0, 20)
    assert images.shape == (20, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 2))  # balanced
    manifest = json.loads((tmp_path / method / "manifest.json").read_text())
    text = json.dumps(manifest)
    assert sha256_file(world.files["unet"]) in text
    guide = world.files["noisy_classifier" if method == "adm_cg" else "classifier"]
    assert sha256_file(guide) in text
    assert sha256_file(world.files["feature_net"]) not in text
    curves = traj["curves"]
    assert len(curves["step"]) == config.sample_steps
    if method != "none":
        assert all(g is not None and g > 0 for g in curves["grad_norm"])
    if method == "tilted":
        assert traj["summary"]["max_tilt_weight"] is not None
    # The same call again reuses the finished run (run_sampling's resume): same images.
    again, _, _ = sample_method(tmp_path / method, world, config, method, 2.0, 0, 20)
    np.testing.assert_array_equal(again, images)


def test_run_digits_world_end_to_end(
    digits: DigitsData, tiny_world: tuple[TrainedWorld, DigitsData, DigitsConfig], tmp_path: Path
) -> None:
    config = _tiny_config(
        methods=("none", "adm_cg", "base", "tilted", "mpgd"), family_scale_grid=(0.5,)
    )
    data = _subset(digits)
    out = tmp_path / "out"
    res = run_digits_world(
        out,
        config,
        cache_root=tmp_path / "cache",
        progress=False,
        log=lambda s: None,
        data=data,
        workers=2,
    )
    # Trained by two worker processes, the networks are bit for bit those trained here.
    assert res["cache"]["key"] == tiny_world[0].key
    for name, path in tiny_world[0].files.items():
        here = load_state_dict_file(path)
        there = load_state_dict_file(Path(res["cache"]["folder"]) / path.name)
        assert all(torch.equal(here[k], there[k]) for k in here), name
    for name in ("report.md", "results.json", "table.png", "curves.png", "samples.png"):
        assert (out / name).is_file(), name
    assert (out / "calibration.png").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["provenance"]["cache_key"] == res["cache"]["key"]
    rows = set(saved["methods"])
    assert set(config.methods) <= rows and "base+ft-smooth_ece" in rows
    for row, r in saved["methods"].items():
        assert len(r["per_seed"]) == len(config.seeds)
        assert all(np.isfinite(r["mean"][k]) for k in ("accuracy", "fd", "fd_class")), row
        for s in config.seeds:
            assert (out / "runs" / row / f"seed{s}" / "manifest.json").is_file()
    # The shared scale is the base sweep's choice; ADM's classic guidance has its own.
    assert saved["methods"]["base"]["scale"] == saved["scale_sweep"]["base"]["chosen"]
    assert saved["methods"]["adm_cg"]["scale"] == saved["scale_sweep"]["adm_cg"]["chosen"]
    # A training-free row: its own sweep, its cost (and every row's) in the table and the plot.
    assert saved["methods"]["mpgd"]["scale"] == saved["scale_sweep"]["mpgd"]["chosen"]
    assert saved["scale_sweep"]["mpgd"]["grid"] == list(config.family_scale_grid)
    for row, r in saved["methods"].items():
        assert r["cost"]["nfe_per_sample"] >= config.sample_steps, row
        assert r["cost"]["cpu_seconds_per_sample"] > 0, row
    assert (out / "quality_vs_cost.png").is_file()
    report_text = (out / "report.md").read_text()
    assert "| mpgd | 0.5 |" in report_text and "NFE (bwd)" in report_text
    assert "chosen strength and the CPU time of its sweep and runs: mpgd 0.5" in report_text
    regimes = saved["calibration_comparison"]["regimes"]
    assert len(regimes) == 2
    for reg in regimes.values():
        assert {"before", "ce", "smooth_ece", "soft_binned_ece"} <= set(reg)
    report = (out / "report.md").read_text()
    assert "| base |" in report and "The paper's claims here" in report
    # A second run reuses the cached networks and the finished sampling runs.
    res2 = run_digits_world(
        out,
        config,
        cache_root=tmp_path / "cache",
        progress=False,
        log=lambda s: None,
        data=data,
        workers=1,
    )
    assert res2["cache"]["trained_now"] == [] and res["cache"]["trained_now"]
    assert res2["methods"]["base"]["mean"] == res["methods"]["base"]["mean"]
    # recomputed here, the calibration comparison equals the workers' (jobs on one thread)
    assert res2["calibration_comparison"] == res["calibration_comparison"]


def test_bad_method_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="methods"):
        run_digits_world(tmp_path, _tiny_config(methods=("base", "nope")), progress=False)


def test_paired_differences_and_their_confidence_interval() -> None:
    from fguide.worlds.digits import paired_vs

    runs = [{"fd": 11.0, "acc": 0.5}, {"fd": 12.0, "acc": 0.7}, {"fd": 16.0, "acc": 0.6}]
    base = [{"fd": 10.0, "acc": 0.5}, {"fd": 10.0, "acc": 0.5}, {"fd": 13.0, "acc": 0.5}]
    d = paired_vs(runs, base, keys=("fd", "acc"))
    # differences fd 1, 2, 3: mean 2, sample std 1; t(0.975, 2 dof) = 4.302652729911275
    assert d["mean"]["fd"] == pytest.approx(2.0) and d["std"]["fd"] == pytest.approx(1.0)
    assert d["ci95"]["fd"] == pytest.approx(4.302652729911275 / 3**0.5, rel=1e-8)  # scipy: ~1e-10
    assert d["mean"]["acc"] == pytest.approx(0.1)
    one = paired_vs(runs[:1], base[:1], keys=("fd",))
    assert one["mean"]["fd"] == 1.0 and one["ci95"]["fd"] is None


# -- the training-free family (issue 21) -------------------------------------------------------


@pytest.mark.parametrize("method", ["dps", "mpgd"])
def test_family_rows_run_with_their_update_rule(
    method: str, tiny_world: tuple[TrainedWorld, DigitsData, DigitsConfig], tmp_path: Path
) -> None:
    """A family row is ``fguide sample --guidance-method`` on the logsoftmax objective: its
    identity says so, and its samples differ from the logsoftmax row's (EluCD's mean shift,
    same objective, same noise) only through the update rule."""
    world, data, config = tiny_world
    images, _, traj = sample_method(tmp_path / method, world, config, method, 2.0, 0, 20)
    ident = json.loads((tmp_path / method / "manifest.json").read_text())["identity"]
    assert (ident["guidance_method"], ident["method"]) == (method, "logsoftmax")
    assert all(g is not None and g > 0 for g in traj["curves"]["grad_norm"])
    elucd, _, _ = sample_method(tmp_path / "ls", world, config, "logsoftmax", 2.0, 0, 20)
    assert not np.array_equal(images, elucd)


def test_network_evaluations_are_counted_per_sample(
    tiny_world: tuple[TrainedWorld, DigitsData, DigitsConfig], tmp_path: Path
) -> None:
    """Per sample over n steps (the methods' definitions): unguided n ε-net passes; EluCD n
    ε-net and n classifier passes, the classifier differentiated; DPS both differentiated;
    MPGD the classifier only (on x̂0); TFG (N_iter = 4, M = 1) 1 + 4 classifier passes per
    step, all differentiated, and the ε-net once."""
    from fguide.worlds.digits_family import count_evaluations
    from fguide.worlds.digits_run import sample_config

    world, _, config = tiny_world
    n = config.sample_steps
    expected = {  # (ε fwd, ε bwd, classifier fwd, classifier bwd) per sample
        "none": (n, 0, 0, 0),
        "base": (n, 0, n, n),
        "dps": (n, n, n, n),
        "mpgd": (n, 0, n, n),
        "tfg": (n, n, 5 * n, 5 * n),
    }
    for method, want in expected.items():
        cfg = sample_config(tmp_path / method, world, config, method, 1.0, 0, 3)
        got = count_evaluations(cfg, samples=3)
        assert tuple(got[k] for k in _COUNT_KEYS) == want, method
    assert not (tmp_path / "none").exists()  # counting writes no run


_COUNT_KEYS = ("eps_forward", "eps_backward", "classifier_forward", "classifier_backward")


def test_a_diverging_sweep_point_scores_nan_instead_of_ending_the_world() -> None:
    from fguide.samplers import NonFiniteGuidanceError
    from fguide.worlds.digits_family import sweep_point

    def diverges(x: int) -> int:
        raise NonFiniteGuidanceError(3, 0.5, [1], "guidance gradient")

    def other_error(x: int) -> int:
        raise RuntimeError("a bug")

    assert sweep_point(diverges, 1) is None
    assert sweep_point(lambda x: x + 1, 1) == 2
    with pytest.raises(RuntimeError, match="a bug"):  # only divergence is absorbed
        sweep_point(other_error, 1)
