"""diffusers pipelines as fguide models: parity with DiTPipeline / DDPMPipeline / DDPMScheduler,
latent guidance through the VAE decoder against float64 autograd of the composite, micro-batching,
EluCD Algorithm 3 against its formula, per-sample seeding. Tiny models from configs, no network."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tolerances
import torch
from tolerances import assert_close, network_depth
from torch import Tensor, nn

import fguide

diffusers = pytest.importorskip("diffusers")

from fguide.models import hf_diffusers as hd  # noqa: E402
from fguide.models import latent_guidance as lg  # noqa: E402
from fguide.schedules import betas_for, make_process  # noqa: E402

T = 1000


def _dit() -> nn.Module:
    torch.manual_seed(0)
    # DiTPipeline hard-codes the null class 1000, so the tiny DiT keeps 1000 classes
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )


def _vae() -> nn.Module:
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    )


def _classifier(n: int = 10) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.Softplus(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, n),
    ).double()


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dit")
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, clip_sample=False)
    diffusers.DiTPipeline(transformer=_dit(), vae=_vae(), scheduler=sched).save_pretrained(
        path, safe_serialization=True
    )
    return path


@pytest.fixture(scope="module")
def dit(dit_dir: Path) -> hd.PipelineModel:
    return hd.load_pipeline_model(dit_dir, dtype=torch.float64)


F64 = torch.float64


def _sampling_depth(steps: int, net: nn.Module) -> int:
    """A sampler's stages: per step the network (twice with CFG: in parallel, once in
    sequence) and the step's few elementwise operations."""
    return steps * (network_depth(net) + 10)


def _guidance_depth(dit: hd.PipelineModel, classifier: Any) -> int:
    """The classifier's gradient through the decoder: both forward and back."""
    assert dit.decoder is not None
    clf = network_depth(classifier) if isinstance(classifier, nn.Module) else 1
    return 2 * (network_depth(dit.decoder) + clf)


def _float64_scheduler(sched: object) -> None:
    """diffusers keeps its schedule in float32; give it ADM's float64 one for exact parity."""
    betas = torch.from_numpy(betas_for("linear", T))
    sched.betas = betas  # type: ignore[attr-defined]
    sched.alphas = 1 - betas  # type: ignore[attr-defined]
    sched.alphas_cumprod = torch.cumprod(1 - betas, 0)  # type: ignore[attr-defined]


class _Replay:
    """Hands out a fixed list of draws in order (the same noise for both samplers)."""

    def __init__(self, draws: list[Tensor]):
        self.draws, self.k = draws, 0

    def __call__(self, like: Tensor) -> Tensor:
        d = self.draws[self.k]
        self.k += 1
        return d[: like.shape[0]].to(like)


def _patch_scheduler_noise(monkeypatch: pytest.MonkeyPatch, draws: list[Tensor]) -> None:
    it = iter(draws)

    def fake(shape, generator=None, device=None, dtype=None, layout=None):  # type: ignore[no-untyped-def]
        d = next(it)
        extra = shape[0] - d.shape[0]  # CFG steps the unconditional half too: its noise is unused
        return torch.cat([d, torch.zeros(extra, *d.shape[1:], dtype=d.dtype)]).to(dtype)

    monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor", fake)


# -- unguided parity with diffusers ---------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_dit_matches_dit_pipeline(
    dit_dir: Path, monkeypatch: pytest.MonkeyPatch, cfg_scale: float
) -> None:
    # DiTPipeline runs diffusers' own network (not DiT's arithmetic: test_models_dit_network.py)
    dit = hd.load_pipeline_model(dit_dir, dtype=torch.float64, dit_network="diffusers")
    steps, b = 10, 2
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(b, 4, 8, 8, generator=gen, dtype=torch.float64)
    draws = [torch.randn(b, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(steps)]
    labels = [7, 421]

    pipe = diffusers.DiTPipeline.from_pretrained(dit_dir, local_files_only=True).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    _float64_scheduler(pipe.scheduler)
    monkeypatch.setattr("diffusers.pipelines.dit.pipeline_dit.randn_tensor", lambda *a, **k: z)
    _patch_scheduler_noise(monkeypatch, draws)
    ref = pipe(labels, guidance_scale=cfg_scale, num_inference_steps=steps, output_type="pt")

    # DiTPipeline drops DiT's variance channels and uses the scheduler's fixed_small variance,
    # with diffusers' "leading" spacing (= ADM's ddimN respacing)
    proc = hd.process_from_betas(dit.betas, f"ddim{steps}", "fixed_small")
    with torch.no_grad():
        x = fguide.ddpm(
            dit.eps_model(cfg_scale),
            z,
            proc,
            labels=torch.tensor(labels),
            noise=_Replay(draws),
            clip_denoised=False,
        )
    img = (dit.to_image(x) / 2 + 0.5).clamp(0, 1)
    assert ref.images.std() > 0.05  # a non-degenerate output
    assert dit.decoder is not None
    depth = _sampling_depth(steps, dit.net) + network_depth(dit.decoder)
    assert_close(img, ref.images, F64, depth)


def test_dit_learned_variance_and_adm_respacing_match_ddpm_scheduler(
    dit: hd.PipelineModel,
) -> None:
    """DiT's [ε, v] read as ADM's learned range, over ADM's "10" respacing, = DDPMScheduler's
    learned_range stepping over the same (custom) timesteps."""
    proc = dit.process("10")
    assert list(proc.timestep_map) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    draws = [torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(10)]
    y = torch.tensor([5, 9])
    model = dit.eps_model(1.5)

    sched = diffusers.DDPMScheduler(
        num_train_timesteps=T, clip_sample=False, variance_type="learned_range"
    )
    _float64_scheduler(sched)
    sched.set_timesteps(timesteps=[int(k) for k in proc.timestep_map[::-1]])
    x, it = z, iter(draws)
    with torch.no_grad():
        for t in sched.timesteps:
            # CFG written out: separate calls, ε guided, v from the conditional call (DiT's rule)
            tt = t.expand(2)
            cond = dit.net(x, timestep=tt, class_labels=y).sample
            unc = dit.net(x, timestep=tt, class_labels=torch.full_like(y, 1000)).sample
            out = torch.cat([unc[:, :4] + 1.5 * (cond[:, :4] - unc[:, :4]), cond[:, 4:]], 1)
            x = _ddpm_scheduler_step(sched, out, t, x, next(it))
    ref = x
    with torch.no_grad():
        ours = fguide.ddpm(model, z, proc, labels=y, noise=_Replay(draws), clip_denoised=False)
    assert ours.std() > 0.1
    assert_close(ours, ref, F64, _sampling_depth(10, dit.net))


def _ddpm_scheduler_step(sched: object, out: Tensor, t: Tensor, x: Tensor, draw: Tensor) -> Tensor:
    """One DDPMScheduler.step with the given noise draw (patched in for this call only)."""
    import diffusers.schedulers.scheduling_ddpm as mod

    orig = mod.randn_tensor
    mod.randn_tensor = lambda *a, **k: draw  # type: ignore[assignment]
    try:
        return sched.step(out, t, x).prev_sample  # type: ignore[attr-defined]
    finally:
        mod.randn_tensor = orig


def test_unet_pipeline_matches_ddpm_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(5)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    sched = diffusers.DDPMScheduler(num_train_timesteps=T)  # DDPM-CIFAR: fixed_small, clip
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path)
    pm = hd.load_pipeline_model(tmp_path, dtype=torch.float64)
    assert (pm.kind, pm.variance_type, pm.clip_denoised) == ("unet", "fixed_small", True)
    assert pm.state_shape == (3, 8, 8) and pm.decoder is None

    steps, b = 10, 3
    gen = torch.Generator().manual_seed(6)
    z = 2 * torch.randn(b, 3, 8, 8, generator=gen, dtype=torch.float64)  # 2×: the clip acts
    draws = [torch.randn(b, 3, 8, 8, generator=gen, dtype=torch.float64) for _ in range(steps)]
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path, local_files_only=True)
    pipe.unet.to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    _float64_scheduler(pipe.scheduler)
    monkeypatch.setattr("diffusers.pipelines.ddpm.pipeline_ddpm.randn_tensor", lambda *a, **k: z)
    _patch_scheduler_noise(monkeypatch, draws)
    ref = pipe(batch_size=b, num_inference_steps=steps, output_type="pt").images
    with torch.no_grad():
        x = fguide.ddpm(
            pm.eps_model(),
            z,
            pm.process(f"ddim{steps}"),
            noise=_Replay(draws),
            clip_denoised=pm.clip_denoised,
        )
    assert ref.std() > 0.05
    assert_close((x / 2 + 0.5).clamp(0, 1), ref, F64, _sampling_depth(steps, pm.net))


# -- schedules from scheduler configs ---------------------------------------------------------


def test_scheduler_betas_follow_the_config() -> None:
    np.testing.assert_array_equal(hd.scheduler_betas({}), betas_for("linear", T))
    cos = hd.scheduler_betas({"beta_schedule": "squaredcos_cap_v2"})
    np.testing.assert_array_equal(cos, betas_for("cosine", T))
    sl = hd.scheduler_betas(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    )
    ref = diffusers.DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).betas.double()
    # diffusers' float32 copy of linspace(sqrt β0, sqrt β1)²
    assert_close(sl, ref, torch.float32, depth=3)
    tb = np.linspace(1e-4, 0.03, 50)
    np.testing.assert_array_equal(
        hd.scheduler_betas({"trained_betas": tb.tolist(), "num_train_timesteps": 50}), tb
    )
    # the respaced process equals make_process for a named schedule
    a, b = hd.process_from_betas(betas_for("linear", T), "250"), make_process("linear", T, "250")
    np.testing.assert_array_equal(a.timestep_map, b.timestep_map)
    # 1 − ᾱ_t / ᾱ_prev, ᾱ a product of up to T factors of size 1
    assert_close(a.betas, b.betas, F64, depth=T + 2, scale=1.0)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'"),
        ({"prediction_type": "v_prediction"}, "prediction_type 'v_prediction'"),
        ({"thresholding": True}, "thresholding"),
        ({"clip_sample_range": 2.0}, "clip_sample_range"),
        ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}, "trained_betas"),
    ],
)
def test_unsupported_scheduler_configs_are_refused(config: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hd.scheduler_betas(config, "x/scheduler_config.json")


def test_pipeline_files_are_the_configs_and_weights(dit_dir: Path) -> None:
    names = [str(f.relative_to(dit_dir)) for f in hd.pipeline_files(dit_dir)]
    assert names == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_pickled_weights_and_bad_folders_are_refused(dit_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_index.json"):
        hd.load_pipeline_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        hd.load_pipeline_model(tmp_path / "nope")
    bad = tmp_path / "pickled"
    bad.mkdir()
    for sub in ("scheduler", "vae", "transformer"):
        (bad / sub).mkdir()
        for f in (dit_dir / sub).iterdir():
            if f.suffix != ".safetensors":
                (bad / sub / f.name).write_bytes(f.read_bytes())
    (bad / "model_index.json").write_bytes((dit_dir / "model_index.json").read_bytes())
    (bad / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="never loads pickled"):
        hd.load_pipeline_model(bad)


# -- latent guidance ---------------------------------------------------------------------------


def _composite_grad(
    decoder: hd.LatentDecoder,
    clf: nn.Module,
    z0: Tensor,
    y: Tensor,
    obj: fguide.Objective,
    progress: float,
    clip: str,
) -> Tensor:
    """∇_{ẑ0} of Σ_i w_i S_i(C(clip(Dec(ẑ0)))) by plain autograd (no coefficients, no VJP)."""
    z = z0.detach().requires_grad_(True)
    img = decoder.vae.decode(z / decoder.scaling_factor).sample
    if clip == "none":
        return torch.autograd.grad(obj.tilted_score(clf(img), y, progress).sum(), z)[0]
    # straight-through: S's gradient at the clipped image, pulled back through the decoder
    xc = img.detach().clamp(-1, 1).requires_grad_(True)
    (gx,) = torch.autograd.grad(obj.tilted_score(clf(xc), y, progress).sum(), xc)
    return torch.autograd.grad(img, z, gx)[0]


@pytest.mark.parametrize("clip", ["none", "straight_through"])
@pytest.mark.parametrize(
    "obj",
    [
        fguide.objective("base"),
        fguide.objective("js", entropy=True),
        fguide.objective("tilted", t_tilt=-0.5, group_size=3),
    ],
    ids=["base", "js+entropy", "tilted"],
)
def test_latent_gradient_is_autograd_of_the_composite(
    dit: hd.PipelineModel, obj: fguide.Objective, clip: str
) -> None:
    assert dit.decoder is not None
    clf = _classifier()
    gen = torch.Generator().manual_seed(7)
    z0 = 1.5 * torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 3, 9, 1, 1, 4])
    f = dit.guidance_classifier(clf, clip=clip)  # type: ignore[arg-type]
    g = fguide.guidance_gradient(f, z0, y, obj, 0.4)
    ref = _composite_grad(dit.decoder, clf, z0, y, obj, 0.4, clip)
    assert ref.abs().max() > 1e-4
    assert_close(g, ref, F64, _guidance_depth(dit, clf))
    if clip == "straight_through":  # the clip must act somewhere for this case to mean anything
        assert (dit.decoder(z0).abs() > 1).any()


@pytest.mark.parametrize(
    "obj",
    [fguide.objective("js"), fguide.objective("tilted", t_tilt=-0.5, group_size=4)],
    ids=["js", "tilted"],
)
def test_microbatched_guidance_equals_the_full_batch(
    dit: hd.PipelineModel, obj: fguide.Objective
) -> None:
    f = dit.guidance_classifier(_classifier())
    gen = torch.Generator().manual_seed(8)
    z0 = torch.randn(7, 4, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 3, 9, 1, 1, 4, 2])
    full = fguide.evaluate_guidance(f, z0, y, obj, 0.2)
    depth = _guidance_depth(dit, f)
    for mb in (1, 2, 3):
        part = lg.evaluate_guidance_microbatched(f, z0, y, obj, 0.2, microbatch=mb)
        assert_close(part.grad, full.grad, F64, depth)
        assert_close(part.logits, full.logits, F64, depth)
        if obj.tilt is not None:
            assert part.weights is not None and full.weights is not None
            assert_close(part.weights, full.weights, F64, depth)
    with pytest.raises(ValueError, match="guidance_microbatch"):
        lg.evaluate_guidance_microbatched(f, z0, y, obj, microbatch=0)


# -- EluCD Algorithm 3 -------------------------------------------------------------------------


def _alg3_reference(
    dit: hd.PipelineModel,
    x: Tensor,
    i: int,
    n: int,
    tm: int,
    y: Tensor,
    clf: nn.Module,
    obj: fguide.Objective,
    s: float,
    big_g: float,
    sine: float,
) -> Tensor:
    """Algorithm 3 written out from its formula, on separate conditional/unconditional calls."""
    assert dit.decoder is not None
    t = torch.full((len(x),), tm)
    cond = dit.net(x, timestep=t, class_labels=y).sample
    unc = dit.net(x, timestep=t, class_labels=torch.full_like(y, 1000)).sample
    d = cond[:, :4] - unc[:, :4]
    eps_cfg = unc[:, :4] + s * d
    abar = float(np.cumprod(1 - dit.betas)[tm])
    z0 = (x - math.sqrt(1 - abar) * eps_cfg) / math.sqrt(abar)
    k = n - 1 - i
    g = _composite_grad(dit.decoder, clf, z0, y, obj, k / (n - 1), "straight_through")

    def rms(v: Tensor) -> Tensor:
        return v.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()

    c_k = max(big_g / (n + 1) * (n + 1 - k), 1e-5) + math.sin(math.pi * k / n) * big_g * sine
    return torch.cat([unc[:, :4] + s * (d - c_k * g / rms(g) * rms(d)), cond[:, 4:]], 1)


@pytest.mark.parametrize("s", [1.0, 1.5])
def test_algorithm3_output_is_its_formula(dit: hd.PipelineModel, s: float) -> None:
    proc = dit.process("10")
    clf, obj = _classifier(), fguide.objective("js", entropy=True)
    alg = lg.CFGClassifierGuidance(dit.eps_model(s), proc, dit.guidance_classifier(clf), obj, 0.3)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([2, 7, 7])
    for i in (9, 4, 0):
        tm = int(proc.timestep_map[i])
        out = alg(x, torch.full((3,), tm), y)
        ref = _alg3_reference(dit, x, i, 10, tm, y, clf, obj, s, 0.3, 0.3)
        assert_close(out, ref, F64, 2 * network_depth(dit.net) + _guidance_depth(dit, clf))
        res = alg.guide(x, x, torch.full((3,), tm), y, 0.0)  # the replayed result
        assert res.grad.shape == x.shape and alg.guide.scale == 0.0
    # G = 0 is CFG alone
    alg0 = lg.CFGClassifierGuidance(dit.eps_model(s), proc, dit.guidance_classifier(clf), obj, 0.0)  # type: ignore[arg-type]
    t = torch.full((3,), 555)
    assert_close(alg0(x, t, y), dit.eps_model(s)(x, t, y), F64, network_depth(dit.net))


def test_dit_reference_cfg_guides_three_channels(dit: hd.PipelineModel) -> None:
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    t, y = torch.tensor([500, 500]), torch.tensor([1, 2])
    cond = dit.net(x, timestep=t, class_labels=y).sample
    unc = dit.net(x, timestep=t, class_labels=torch.tensor([1000, 1000])).sample
    out = dit.eps_model(4.0, cfg_channels=3)(x, t, y)
    # one batched call against two, then u + 4 (c − u): terms up to 5 times the outputs
    depth = network_depth(dit.net) + 3
    scale = 5 * max(tolerances.magnitude(cond), tolerances.magnitude(unc))
    assert_close(out[:, :3], unc[:, :3] + 4.0 * (cond[:, :3] - unc[:, :3]), F64, depth, scale=scale)
    assert_close(out[:, 3:], cond[:, 3:], F64, depth)
    with pytest.raises(ValueError, match="cfg_channels"):
        dit.eps_model(2.0, cfg_channels=5)


def _sample_alg3(
    dit: hd.PipelineModel, indices: list[int], labels: Tensor, obj: fguide.Objective
) -> tuple[Tensor, list[fguide.StepRecord]]:
    s = lg.build_pipeline_sampling(
        dit,
        respacing="6",
        cfg_scale=1.5,
        classifier=_classifier(),
        objective=obj,
        scale=0.5,
        microbatch=2,
    )
    noise = fguide.SampleNoise(11, indices)
    z = noise.initial(s.state_shape, dtype=torch.float64)
    records: list[fguide.StepRecord] = []
    with torch.no_grad():
        x = fguide.ddpm(
            s.model,
            z,
            s.process,
            labels=labels,
            guide=s.guide,
            noise=noise,
            callback=records.append,
            clip_denoised=s.clip_denoised,
        )
    return s.to_image(x), records


def test_algorithm3_sampling_is_per_sample_and_recorded(dit: hd.PipelineModel) -> None:
    obj = fguide.objective("js", entropy=True)
    y = torch.tensor([4, 0, 8])
    full, records = _sample_alg3(dit, [0, 1, 2], y, obj)
    assert full.shape == (3, 3, 16, 16)
    for j in range(3):
        one, _ = _sample_alg3(dit, [j], y[j : j + 1], obj)
        assert dit.decoder is not None
        depth = 6 * (2 * network_depth(dit.net) + _guidance_depth(dit, _classifier()))
        assert_close(one, full[j : j + 1], F64, depth + network_depth(dit.decoder))
    # the recorder sees every step's guidance (unnormalised ‖∇S‖, confidences)
    assert len(records) == 6 and all(r.guidance is not None for r in records)
    assert all(r.grad_norm is not None and bool((r.grad_norm > 0).all()) for r in records)
    recorder = fguide.TrajectoryRecorder()
    for r in records:
        recorder(r)
    curves = recorder.curves()
    for key in ("confidence_mean", "grad_norm", "ece"):
        assert len(curves[key]) == 6 and None not in curves[key]
    # guidance changes the samples
    unguided = lg.build_pipeline_sampling(dit, respacing="6", cfg_scale=1.5)
    noise = fguide.SampleNoise(11, [0, 1, 2])
    with torch.no_grad():
        x = fguide.ddpm(
            unguided.model,
            noise.initial(unguided.state_shape, dtype=torch.float64),
            unguided.process,
            labels=y,
            noise=noise,
            clip_denoised=False,
        )
    assert (unguided.to_image(x) - full).abs().max() > 1e-3


def test_mean_form_latent_guidance_and_pixel_guidance_errors(dit: hd.PipelineModel) -> None:
    s = lg.build_pipeline_sampling(
        dit,
        respacing="4",
        cfg_scale=1.5,
        classifier=_classifier(),
        objective=fguide.objective("base"),
        guidance="mean",
        microbatch=1,
    )
    assert isinstance(s.guide, lg.MicrobatchGuide)
    noise = fguide.SampleNoise(0, [0, 1])
    with torch.no_grad():
        x = fguide.ddpm(
            s.model,
            noise.initial(s.state_shape, dtype=torch.float64),
            s.process,
            labels=torch.tensor([1, 2]),
            guide=s.guide,
            noise=noise,
            clip_denoised=False,
        )
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="objective is required"):
        lg.build_pipeline_sampling(dit, classifier=_classifier())
    alg = lg.CFGClassifierGuidance(
        dit.eps_model(1.5),  # type: ignore[arg-type]
        dit.process("4"),
        _classifier(),
        fguide.objective("base"),
        1.0,
    )
    x1 = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="timestep 500 is not a step"):
        alg(x1, torch.tensor([500]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="together with"):
        alg.guide(x1, x1, torch.tensor([999]), torch.tensor([1]), 0.0)
    with pytest.raises(ValueError, match="Algorithm 3 needs class labels"):
        lg.CFGClassifierGuidance(
            dit.eps_model(1.5),  # type: ignore[arg-type]
            dit.process("4"),
            _classifier(),
            fguide.objective("base"),
            1.0,
        )(torch.zeros(1, 4, 8, 8, dtype=torch.float64), torch.tensor([999]), None)


def cli_classifier() -> nn.Module:
    """A float32 1000-class classifier of 16x16 decoded images (import spec for the CLI)."""
    return _classifier(1000).float()


def test_fguide_sample_with_a_dit_pipeline_folder(
    dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command: CFG 1.5 plus a classifier through the decoder (Algorithm 3).
    import json

    import numpy as np

    from fguide.cli.main import main
    from fguide.io.runs import read_run

    out = tmp_path / "dit-run"
    argv = [
        "sample", "--model", str(dit_dir), "--cfg-scale", "1.5", "--classifier",
        "test_models_hf_diffusers:cli_classifier", "--scale", "0.5", "--steps", "3",
        "--num-samples", "8", "--batch-size", "4", "--shard-size", "4", "--out", str(out),
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert main([*argv, "--max-shards", "1"]) == 0  # stop after one shard, then resume
    assert read_run(out).status == "incomplete"
    assert main(argv) == 0, capsys.readouterr().err
    run = read_run(out)
    assert run.status == "complete" and run.samples is not None
    with np.load(run.samples) as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (8, 16, 16, 3) and labels.shape == (8,)  # decoded pixels
    identity = run.manifest["identity"]
    model = identity["resolved"]["model"]
    assert (model["family"], model["kind"], model["state_shape"]) == ("diffusers", "dit", [4, 8, 8])
    assert identity["cfg_scale"] == 1.5 and identity["guidance_form"] == "algorithm3"
    traj = json.loads((out / "trajectory.json").read_text())
    assert all(g is not None and g > 0 for g in traj["curves"]["grad_norm"])  # real ‖∇S‖
    # a different CFG scale into the same folder is another run: refused
    other = list(argv)
    other[other.index("--cfg-scale") + 1] = "1.0"
    assert main(other) == 2
    assert "cfg_scale: 1.5 -> 1.0" in capsys.readouterr().err
    # batch size 1: the same samples up to float rounding (per-sample noise; CFG per sample)
    one = tmp_path / "dit-one"
    assert main([*argv, "--out", str(one), "--batch-size", "1"]) == 0  # last flags win
    with np.load(one / "samples.npz") as z:
        assert np.abs(z["arr_0"].astype(int) - images.astype(int)).max() <= 1


def test_unguided_dit_run_records_the_classifier_on_decoded_images(
    dit_dir: Path, tmp_path: Path
) -> None:
    # Unguided with a classifier, the run records the classifier's calibration along the
    # trajectory; for a latent pipeline it must see Dec(x̂0) (16x16 pixels), as a guide does,
    # not the 4-channel latent x̂0 (a channel-mismatch crash before the family said so).
    import json

    from fguide.sampling import SampleConfig, run_sampling

    cfg = SampleConfig(
        out=tmp_path / "run", model=dit_dir, method="none", steps="3", num_samples=2,
        batch_size=2, device="cpu", progress=False,
        classifier="test_models_hf_diffusers:cli_classifier",
    )  # fmt: skip
    assert run_sampling(cfg).complete
    curves = json.loads((tmp_path / "run" / "trajectory.json").read_text())["curves"]
    conf = curves["confidence_mean"]
    assert len(conf) == 3 and all(c is not None and 0 < c < 1 for c in conf)


def test_resume_over_swapped_pipeline_weights_is_refused(dit_dir: Path, tmp_path: Path) -> None:
    # Two pipelines swap their transformer weight files (same names): a resumed run of either
    # is another model's run. The identity hashes every file's name with its contents.
    import shutil

    from fguide.io.runs import ConfigMismatchError
    from fguide.sampling import SampleConfig, run_sampling

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(dit_dir, a)
    shutil.copytree(dit_dir, b)
    torch.manual_seed(5)
    other = diffusers.DiTTransformer2DModel(**dict(_dit().config))
    other.save_pretrained(b / "transformer", safe_serialization=True)
    cfg = SampleConfig(
        out=tmp_path / "run", model=a, method="none", steps="2", num_samples=2, batch_size=1,
        shard_size=1, max_shards=1, device="cpu", progress=False,
    )  # fmt: skip
    assert not run_sampling(cfg).complete
    weights = Path("transformer") / "diffusion_pytorch_model.safetensors"
    wa, wb = (a / weights).read_bytes(), (b / weights).read_bytes()
    assert wa != wb
    (a / weights).write_bytes(wb)
    (b / weights).write_bytes(wa)
    with pytest.raises(ConfigMismatchError, match="model_sha256"):
        run_sampling(dataclasses.replace(cfg, max_shards=None))


def test_algorithm3_needs_an_explicit_scale(dit_dir: Path, tmp_path: Path) -> None:
    from fguide.sampling import SampleConfig, resolve_config

    cfg = SampleConfig(
        out=tmp_path, model=dit_dir, classifier="test_models_hf_diffusers:cli_classifier"
    )
    with pytest.raises(ValueError, match="scale: give scale"):
        resolve_config(cfg)
    with pytest.raises(ValueError, match="ddpm or ddim"):
        resolve_config(SampleConfig(out=tmp_path, model=dit_dir, method="none", sampler="heun"))


def test_dit_configuration_runs_on_the_tiny_pipeline(dit_dir: Path, tmp_path: Path) -> None:
    from fguide.cli.main import main
    from fguide.io.runs import read_run

    out = tmp_path / "cfg"
    argv = [
        "sample", "--config", "elucd-dit-xl2-256", "--model", str(dit_dir), "--out", str(out),
        "--classifier", "test_models_hf_diffusers:cli_classifier",
        "--scale", "0.2", "--steps", "4", "--num-samples", "2", "--device", "cpu",
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    identity = read_run(out).manifest["identity"]
    assert (identity["cfg_scale"], identity["cfg_channels"], identity["tau2"]) == (1.5, 3, 0.5)
    assert identity["sine_factor"] == 0.3
    assert identity["resolved"]["model"]["clip_denoised"] is False  # DiT's rule, not the flag


def test_pipeline_gpu_path_options(
    dit_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # --compile and --channels-last as for every family; --precision bf16 runs the transformer
    # in bf16 and --classifier-precision bf16 the decoder and classifier of the guidance: close
    # to float32, not equal to it.
    import numpy as np
    from test_sampling_run import check_compile_and_channels_last

    argv = [
        "sample", "--model", str(dit_dir), "--cfg-scale", "1.5", "--classifier",
        "test_models_hf_diffusers:cli_classifier", "--scale", "2", "--steps", "3",
        "--num-samples", "4", "--batch-size", "4", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    run, fp32 = check_compile_and_channels_last(argv, tmp_path, monkeypatch, capsys)
    for flag in ("--precision", "--classifier-precision"):
        d = np.abs(run(flag[2:], flag, "bf16") - fp32)
        assert 0 < d.max() and d.mean() < 4, (flag, d.max(), d.mean())
