"""Sampler properties: per-sample seeding, batch invariance, errors naming the step."""

from __future__ import annotations

import pytest
import torch

import fguide
from fguide.guidance import GuidanceResult
from fguide.schedules import make_process
from fguide.worlds.gmm import BayesClassifier, ExactDenoiser, ExactEpsModel, GaussianMixture

MIX = GaussianMixture.circle()
ABAR = make_process("linear", 1000, "")["alphas_cumprod"]


def _run(
    sampler: str,
    indices: list[int],
    labels: torch.Tensor,
    objective: fguide.Objective,
    seed: int = 7,
) -> torch.Tensor:
    noise = fguide.SampleNoise(seed, indices)
    z = noise.initial((2,), dtype=torch.float64)
    guide = fguide.ClassifierGuide(BayesClassifier(MIX), objective, 0.05)
    if sampler == "heun":
        return fguide.heun(
            ExactDenoiser(MIX),
            z,
            fguide.karras_sigmas(8),
            labels=labels,
            guide=guide,
            guidance_input="denoised",
        )
    proc = make_process("linear", 1000, "10", "fixed_small")
    fn = fguide.ddpm if sampler == "ddpm" else fguide.ddim
    kw = {"eta": 1.0} if sampler == "ddim" else {}
    return fn(
        ExactEpsModel(MIX, ABAR),
        z,
        proc,
        labels=labels,
        guide=guide,
        noise=noise,
        clip_denoised=False,
        **kw,
    )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun"])
def test_sample_i_is_independent_of_its_batch(sampler: str) -> None:
    labels = torch.tensor([3, 1, 4, 1, 5, 2])
    obj = fguide.objective("js", entropy=True)
    full = _run(sampler, list(range(6)), labels, obj)
    # the same samples in other batches: singles, and a reordered subset
    for i in range(6):
        torch.testing.assert_close(
            _run(sampler, [i], labels[i : i + 1], obj), full[i : i + 1], atol=1e-12, rtol=1e-12
        )
    sub = _run(sampler, [4, 0, 2], labels[[4, 0, 2]], obj)
    torch.testing.assert_close(sub, full[[4, 0, 2]], atol=1e-12, rtol=1e-12)
    # and different seeds give different samples
    assert not torch.allclose(_run(sampler, list(range(6)), labels, obj, seed=8), full)


def test_tilting_couples_the_samples_of_a_group() -> None:
    labels = torch.tensor([3, 1, 4, 1])
    obj = fguide.objective("tilted", t_tilt=-0.5)
    full = _run("ddpm", [0, 1, 2, 3], labels, obj)
    alone = _run("ddpm", [0], labels[:1], obj)
    assert not torch.allclose(alone, full[:1])  # documented: a tilted sample depends on its group


def test_sample_noise_streams_are_distinct_and_reproducible() -> None:
    a = fguide.SampleNoise(0, [0, 1]).initial((1000,))
    b = fguide.SampleNoise(0, [1]).initial((1000,))
    assert torch.equal(a[1], b[0])
    assert abs(float(torch.corrcoef(a)[0, 1])) < 0.1
    with pytest.raises(ValueError, match="noise source has 2 samples"):
        fguide.SampleNoise(0, [0, 1])(torch.zeros(3, 4))


class _Exploding:
    scale = 1.0

    def __call__(self, x_t, x0, t, labels, progress):  # type: ignore[no-untyped-def]
        g = torch.zeros_like(x0)
        if progress > 0.3:
            g[2] = float("nan")
        return GuidanceResult(grad=g, logits=torch.zeros(len(x0), 8), labels=labels)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_non_finite_guidance_names_the_step_and_sample(sampler: str) -> None:
    proc = make_process("linear", 1000, "10", "fixed_small")
    fn = fguide.ddpm if sampler == "ddpm" else fguide.ddim
    z = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(fguide.NonFiniteGuidanceError, match=r"step 3 .*positions \[2\]") as info:
        fn(
            ExactEpsModel(MIX, ABAR),
            z,
            proc,
            labels=torch.zeros(4, dtype=torch.long),
            guide=_Exploding(),
            clip_denoised=False,
        )
    assert info.value.step == 3 and info.value.samples == [2]


def test_start_step_is_validated() -> None:
    proc = make_process("linear", 1000, "10", "fixed_small")
    with pytest.raises(ValueError, match="start_step"):
        fguide.ddpm(ExactEpsModel(MIX, ABAR), torch.zeros(1, 2), proc, start_step=10)


def test_callback_records_every_step_with_guidance_diagnostics() -> None:
    records: list[fguide.StepRecord] = []
    proc = make_process("linear", 1000, "10", "fixed_small")
    labels = torch.tensor([0, 5])
    guide = fguide.ClassifierGuide(BayesClassifier(MIX), fguide.objective("base"), 0.05)
    fguide.ddpm(
        ExactEpsModel(MIX, ABAR),
        torch.randn(2, 2, dtype=torch.float64),
        proc,
        labels=labels,
        guide=guide,
        callback=records.append,
        clip_denoised=False,
    )
    assert [r.step for r in records] == list(range(10))
    assert [int(r.t[0]) for r in records] == list(reversed(proc.timestep_map.tolist()))
    for r in records:
        assert r.confidence is not None and r.confidence.shape == (2,)
        assert r.grad_norm is not None and (r.grad_norm > 0).all()
    assert records[0].progress == 0.0 and records[-1].progress == 1.0
