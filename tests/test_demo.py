"""The Gaussian-mixture world and ``fguide demo``: exact quantities and the end-to-end job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tolerances
import torch

import fguide
from fguide.cli.main import main
from fguide.denoisers import VPAsEDM
from fguide.schedules import make_process
from fguide.worlds.gmm import (
    BayesClassifier,
    ExactDenoiser,
    ExactEpsModel,
    GaussianMixture,
    NoisyBayesClassifier,
)

F64 = torch.float64


def test_posterior_mean_matches_monte_carlo() -> None:
    """E[x0 | x_t] in closed form against importance weighting of exact draws."""
    mix = GaussianMixture.circle(num_classes=4, radius=2.0, s=0.5, dim=2)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    k = torch.randint(0, 4, (n,), generator=g)
    x0 = mix.sample(k, g)
    abar = torch.tensor([0.3], dtype=torch.float64)
    x_t = torch.tensor([[0.7, -0.4]], dtype=torch.float64)
    # p(x_t | x0) ∝ exp(−‖x_t − sqrt(ᾱ) x0‖² / (2(1 − ᾱ)))
    logw = -(x_t - abar.sqrt() * x0).pow(2).sum(1) / (2 * (1 - abar))
    w = torch.softmax(logw, 0)
    mc = (w[:, None] * x0).sum(0)
    exact = mix.posterior_mean(x_t, abar)[0]
    # Monte Carlo, not rounding: within 5 standard errors of the self-normalised estimate
    # (P(|z| > 5) = 6e-7), se² = Σ w_i² (x0_i − mc)².
    se = (w[:, None] ** 2 * (x0 - mc) ** 2).sum(0).sqrt()
    assert ((exact - mc).abs() <= 5 * se).all(), (exact, mc, se)


def test_noisy_classifier_is_the_bayes_posterior_at_abar_one() -> None:
    mix = GaussianMixture.circle(num_classes=5, radius=3.0, s=0.7, dim=3)
    full = make_process("linear", 1000, "")
    noisy = NoisyBayesClassifier(mix, full["alphas_cumprod"])
    clean = BayesClassifier(mix, sharpness=1.0)
    x = torch.randn(6, 3, dtype=torch.float64)
    # at ᾱ → 1 the noisy posterior tends to the clean Bayes posterior (κ = 1)
    p_noisy = torch.softmax(mix.noisy_log_joint(x, torch.ones(6, dtype=torch.float64)), -1)
    depth = 3 * 3 + 5  # squared distances in 3 dimensions, a softmax over 5 classes
    tolerances.assert_close(p_noisy, torch.softmax(clean(x), -1), F64, depth, scale=1.0)
    # and the time-aware module indexes ᾱ_t by the training step
    t = torch.full((6,), 999)
    abar = torch.from_numpy(full["alphas_cumprod"])[t]
    log_joint = mix.noisy_log_joint(x, abar)
    tolerances.assert_close(noisy(x, t), log_joint, F64, depth)


def test_vp_eps_model_as_edm_denoiser_equals_exact_denoiser() -> None:
    """D(x, σ) through the discrete-ε wrapper equals the closed form at the training σ's."""
    mix = GaussianMixture.circle(num_classes=8, radius=4.0, s=0.5, dim=2)
    abar = make_process("linear", 1000, "")["alphas_cumprod"]
    wrapped = VPAsEDM(ExactEpsModel(mix, abar), abar)
    exact = ExactDenoiser(mix)
    x = 3 * torch.randn(5, 2, dtype=torch.float64)
    for k in (0, 10, 500, 999):
        sigma = torch.full((5,), math.sqrt((1 - abar[k]) / abar[k]), dtype=torch.float64)
        # σ from ᾱ, then back through log σ and the table's interpolation: t on its scale, 999
        t = wrapped.sigma_to_t(sigma)
        tolerances.assert_close(t, torch.full((5,), float(k)), F64, depth=8, scale=999.0)
        # the mixture's posterior in 2 dimensions over 8 classes, written twice; D = x − σ ε̂
        # cancels terms of the size of x (at large σ, D → the mixture's mean, 0)
        scale = tolerances.magnitude(x)
        d = wrapped(x, sigma, None)
        tolerances.assert_close(d, exact(x, sigma), F64, depth=2 * 8 + 8, scale=scale)


def test_frechet_to_class_is_zero_for_the_exact_moments() -> None:
    mix = GaussianMixture.circle(num_classes=3, radius=1.0, s=0.5, dim=4)
    g = torch.Generator().manual_seed(1)
    x = mix.sample(torch.zeros(200_000, dtype=torch.long), g)
    assert mix.frechet_to_class(x, 0) < 2e-3
    assert mix.frechet_to_class(x + 1.0, 0) == pytest.approx(4.0, rel=0.01)  # ‖shift‖² = 4·1


def test_guided_heun_and_ddim_reach_the_target_class() -> None:
    mix = GaussianMixture.circle()
    abar = make_process("linear", 1000, "")["alphas_cumprod"]
    clf = BayesClassifier(mix, 8.0)
    labels = torch.arange(8).repeat(8)
    obj = fguide.objective("base")
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    proc = make_process("linear", 1000, "ddim25", "fixed_small")
    x_ddim = fguide.ddim(
        ExactEpsModel(mix, abar),
        z,
        proc,
        labels=labels,
        guide=fguide.ClassifierGuide(clf, obj, 0.05),
        clip_denoised=False,
    )
    # EluCD's EDM displacement is relative (c_i ≈ G of rms(x) per step); the classifier sees
    # the denoised estimate, since x/max(1, rms x) assumes images in [-1, 1]
    x_heun = fguide.heun(
        ExactDenoiser(mix),
        z,
        fguide.karras_sigmas(18),
        labels=labels,
        guide=fguide.ClassifierGuide(clf, obj, 0.5),
        guidance_input="denoised",
    )
    unguided = fguide.ddim(ExactEpsModel(mix, abar), z, proc, clip_denoised=False)
    for x in (x_ddim, x_heun):
        assert (mix.bayes_labels(x) == labels).double().mean() > 0.9
    assert (mix.bayes_labels(unguided) == labels).double().mean() < 0.4


@pytest.mark.parametrize("dim", [2, 16])
def test_method_blocks_equal_each_method_alone(dim: int) -> None:
    """The demo samples all x̂0 methods in one sampler call: each block must be that method's
    own run (same noise, its own tilt groups, its own gain), and each block's recorder must
    see that run's guidance."""
    from fguide.diagnostics import TrajectoryRecorder
    from fguide.worlds.demo import DemoConfig, World, method_objectives

    steps = 12
    world = World(GaussianMixture.circle(dim=dim), DemoConfig(steps=steps))
    objs = method_objectives(tilt_group_size=5)
    labels = world.labels(3, seed=5)  # 24 samples a block: tilt groups of 5, the last of 4
    names = ["none", "elucd", "tilted", "js"]
    swept_methods = ("elucd", "tilted")
    recs = [TrajectoryRecorder(vanish_threshold=0.1) for _ in names]
    blocks = world.sample_blocks([objs[n] for n in names], labels, 5, 0.05, callbacks=recs)
    gains = [0.01, 0.3]
    swept = {m: world.sample_blocks([objs[m]] * 2, labels, 5, 1.0, gains) for m in swept_methods}
    # Blocks and solo runs differ by round-off only (the gains: γ·(Jᵀc) against Jᵀ(γc)),
    # grown by the guided steps; half of float64's digits bounds that with room to spare,
    # while a block with other noise, gain, tilt groups or guidance is off by > 1e−3.
    tol = torch.finfo(torch.float64).eps ** 0.5 * float(blocks.abs().max())
    for i, name in enumerate(names):
        rec = TrajectoryRecorder(vanish_threshold=0.1)
        alone = world.sample(name, objs[name], 0.05, labels, 5, rec)
        torch.testing.assert_close(blocks[i], alone, rtol=0, atol=tol)
        mine, theirs = recs[i].curves(), rec.curves()
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-9), name
        assert recs[i].summary()["max_tilt_weight"] == rec.summary()["max_tilt_weight"]
    assert recs[2].summary()["max_tilt_weight"] is not None
    for m in swept_methods:  # a sweep over γ: tilt groups stay inside their block
        for i, g in enumerate(gains):
            alone = world.sample(m, objs[m], g, labels, 5)
            torch.testing.assert_close(swept[m][i], alone, rtol=0, atol=tol)


def _demo(tmp_path: Path, name: str) -> dict:
    out = tmp_path / name
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    res = _demo(tmp_path, "a")
    out = tmp_path / "a"
    figures = ("confidence_vs_step.png", "grad_norm_vs_step.png", "samples_d2.png")
    for f in ("report.md", *figures, "quality_vs_cost.png"):
        assert (out / f).stat().st_size > 0
    (world,) = res["worlds"]
    methods = world["methods"]
    assert list(methods) == list(fguide.worlds.demo.METHOD_NAMES)
    assert world["guidance_scale"] in world["scale_sweep"]["grid"]
    chosen = world["scale_sweep"]["grid"].index(world["guidance_scale"])
    assert world["scale_sweep"]["frechet_mean"][chosen] == min(world["scale_sweep"]["frechet_mean"])
    k = res["settings"]["num_classes"]
    # unguided samples hit the target at chance; guided ones mostly hit it
    assert methods["none"]["accuracy"] < 2.5 / k
    for name in ("elucd", "js", "exact"):
        assert methods[name]["accuracy"] > 0.8
        assert methods[name]["frechet_mean"] < methods["none"]["frechet_mean"] / 10
    steps = res["settings"]["steps"]
    for name, m in methods.items():
        assert len(m["curves"]["confidence_mean"]) == steps
        assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
        if name not in ("none",):
            assert len(m["curves"]["grad_norm"]) == steps
    assert methods["tilted"]["max_tilt_weight"] <= res["settings"]["tilt_group_size"] + 1e-9
    assert methods["elucd"]["max_tilt_weight"] is None
    report = (out / "report.md").read_text()
    assert f"γ = {world['guidance_scale']:g}" in report


def test_demo_is_deterministic(tmp_path: Path) -> None:
    a, b = _demo(tmp_path, "a"), _demo(tmp_path, "a")  # a rerun into its own folder
    for name in a["worlds"][0]["methods"]:
        ma, mb = a["worlds"][0]["methods"][name], b["worlds"][0]["methods"][name]
        assert ma["frechet_per_class"] == mb["frechet_per_class"]
        assert np.array_equal(ma["curves"]["confidence_mean"], mb["curves"]["confidence_mean"])


def test_demo_rejects_bad_sharpness(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:  # refused by the flag's Range type
        main(["demo", "--quick", "--sharpness", "0.5", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--sharpness" in capsys.readouterr().err


def test_demo_refuses_a_folder_holding_the_users_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = {"results.json": "my results", "report.md": "my report", "notes.txt": "my notes"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "(notes.txt, report.md, results.json)" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == mine


def test_demo_world_digits_runs_the_digits_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The whole digits job is tested end to end in test_digits.py; here: the command's wiring.
    import fguide.worlds.digits_run as digits_run
    from fguide.cli.main import main

    calls = []

    def fake(out: Path, config: object, **kw: object) -> dict:
        calls.append((out, config, kw))
        return {"timing_seconds": {"total": 0.0}}

    monkeypatch.setattr(digits_run, "run_digits_world", fake)
    assert main(["demo", "--world", "digits", "--quick", "--seed", "3", "--out",
                 str(tmp_path), "--cache-dir", str(tmp_path / "c")]) == 0  # fmt: skip
    (out, config, kw) = calls[0]
    assert out == tmp_path and kw["cache_root"] == tmp_path / "c"
    assert config.quick and config.seed == 3 and config.seeds[0] == 3  # type: ignore[attr-defined]
