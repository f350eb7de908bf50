"""Schedules and samplers against the reference fixtures (ADM, EluCD, EDM)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tolerances
import torch
from fixture_utils import case_names, get_case
from tolerances import network_depth

import fguide
from fguide.guidance import GuidanceResult
from fguide.samplers import elucd_sine_boost
from fguide.schedules import make_process, space_timesteps

F64 = torch.float64


def _close(actual: Any, expected: Any, depth: float, scale: float | None = None) -> None:
    tolerances.assert_close(actual, expected, F64, depth, scale=scale)


def _schedule_scale(key: str, value: Any, proc: fguide.Process) -> float:
    """The schedule's arrays are functions of ᾱ_t, on the scale of their values or 1; those
    that divide by 1 − ᾱ_t or take its log (posterior coefficients and variances) see its
    rounding (eps on the scale 1) relative to 1 − ᾱ_t, as small as β_0."""
    scale = max(1.0, tolerances.magnitude(value))
    if key.startswith("posterior") or key.startswith("log_one_minus"):
        scale /= float(1 - proc.alphas_cumprod.max())
    return scale


def _x0_scale(proc: fguide.Process, x_t: torch.Tensor, out: torch.Tensor) -> float:
    """x̂0 = sqrt(1/ᾱ) x_t − sqrt(1/ᾱ − 1) ε cancels terms of size sqrt(1/ᾱ_min)·|x_t|, |ε|."""
    amplification = float(proc.sqrt_recip_alphas_cumprod.max())
    return amplification * max(tolerances.magnitude(x_t), tolerances.magnitude(out), 1.0)


def _depth(cfg: dict, steps: int = 1, net: int = 0) -> int:
    """The schedule (ᾱ_t: a product of up to T factors), then per sampler step its ~10
    operations and the network's stages."""
    return int(cfg.get("diffusion_steps", 1000)) + steps * (10 + net)


def _process(cfg: dict) -> fguide.Process:
    var = cfg.get("model_var_type")
    if var is None:
        var = (
            "learned_range"
            if cfg.get("learn_sigma")
            else ("fixed_small" if cfg.get("sigma_small") else "fixed_large")
        )
    return make_process(
        cfg.get("noise_schedule", "linear"),
        cfg["diffusion_steps"],
        cfg.get("timestep_respacing", ""),
        var,
        cfg.get("rescale_timesteps", False),
    )


# ---------------------------------------------------------------- diffusion_schedules.pt

SCHED = "diffusion_schedules.pt"
_DERIVED = {
    "alphas_cumprod_next": lambda ac: np.append(ac[1:], 0.0),
    "log_one_minus_alphas_cumprod": lambda ac: np.log(1.0 - ac),
}


@pytest.mark.parametrize("case_name", case_names(SCHED))
def test_diffusion_schedules(case_name: str) -> None:
    case = get_case(SCHED, case_name)
    cfg, exp = case["config"], case["expected"]
    if case["kind"] == "invalid_respacing":
        assert exp["raises"] == "ValueError"
        with pytest.raises(ValueError, match="timestep_respacing"):
            _process(cfg)
        return
    proc = _process(cfg)
    depth = _depth(cfg)
    compared = 0
    for key, value in exp.items():
        if key == "timestep_map":
            assert proc.timestep_map.tolist() == value.tolist()
        elif key == "num_timesteps":
            assert proc.num_steps == value
        elif key == "model_timesteps_rescaled":
            rescaled = make_process(
                cfg["noise_schedule"],
                cfg["diffusion_steps"],
                cfg["timestep_respacing"],
                rescale_timesteps=True,
            )
            t = torch.arange(proc.num_steps)
            _close(rescaled.model_timesteps(t), value.double(), depth)
        elif key in _DERIVED:  # arrays fguide does not use: their closed form from ᾱ
            derived = _DERIVED[key](proc.alphas_cumprod)
            _close(derived, value, depth, scale=_schedule_scale(key, value, proc))
        else:
            _close(getattr(proc, key), value, depth, scale=_schedule_scale(key, value, proc))
        compared += 1
    assert compared == len(exp)


# ---------------------------------------------------------------- p_mean_variance.pt

PMV = "p_mean_variance.pt"


@pytest.mark.parametrize("case_name", case_names(PMV))
def test_p_mean_variance(case_name: str) -> None:
    case = get_case(PMV, case_name)
    proc = _process(case["config"])
    inp, exp = case["inputs"], case["expected"]
    depth = _depth(case["config"])
    assert proc.model_timesteps(inp["t"]).tolist() == exp["model_timesteps"].tolist()
    x0_scale = _x0_scale(proc, inp["x_t"], inp["model_output"])
    pmv_scale = dict(mean=x0_scale, pred_xstart=x0_scale, variance=None, log_variance=None)
    for clip, suffix in ((True, "_clip"), (False, "_noclip")):
        out = proc.p_mean_variance(inp["model_output"], inp["x_t"], inp["t"], clip)
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            _close(getattr(out, key), exp[key + suffix], depth, scale=pmv_scale[key])
        out32 = proc.p_mean_variance(
            inp["model_output"].float(), inp["x_t"].float(), inp["t"], clip
        )
        scale = _x0_scale(proc, inp["x_t"], inp["model_output"])
        tolerances.assert_close(out32.mean, exp["mean" + suffix], torch.float32, depth, scale=scale)


# ---------------------------------------------------------------- ddim_steps.pt

STEPS = "ddim_steps.pt"


class _Fixed:
    """An ε-model returning a stored output (single-step cases)."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.out


class _StandIn:
    """The fixtures' closed-form UNet stand-in: ε = tanh(x/2)·s/1000 (+ v = sin(x + s/1000))."""

    def __init__(self, learn_sigma: bool):
        self.learn_sigma = learn_sigma

    def __call__(self, x: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        s = s.to(x).reshape(-1, 1, 1, 1)
        eps = torch.tanh(0.5 * x) * (s / 1000.0)
        return torch.cat([eps, torch.sin(x + s / 1000.0)], 1) if self.learn_sigma else eps


class _FixedGuide:
    """Returns a fixed gradient (or the fixtures' closed-form cond_fn of x_t)."""

    def __init__(self, grad: torch.Tensor | None = None, scale: float = 1.0):
        self.grad, self.scale = grad, scale

    def __call__(self, x_t, x0, t, labels, progress) -> GuidanceResult:  # type: ignore[no-untyped-def]
        if self.grad is not None:
            g = self.grad
        else:
            g = -0.2 * torch.tanh(x_t) * (1.0 + t.to(x_t).reshape(-1, 1, 1, 1) / 1000.0)
        return GuidanceResult(grad=g, logits=torch.zeros(len(x_t), 2), labels=labels)


class _Replay:
    """A noise source replaying stored draws: one per call."""

    def __init__(self, draws: torch.Tensor):
        self.draws, self.k = draws, 0

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        out = self.draws[self.k] if self.draws.ndim == like.ndim + 1 else self.draws
        self.k += 1
        return out


@pytest.mark.parametrize("case_name", case_names(STEPS))
def test_ddim_and_ddpm_steps(case_name: str) -> None:
    case = get_case(STEPS, case_name)
    cfg, inp, exp = case["config"], case["inputs"], case["expected"]
    proc = _process(cfg)
    kind = case["kind"]
    depth = _depth(cfg, steps=proc.num_steps)
    if kind.endswith("trajectory"):
        assert proc.timestep_map.tolist() == inp["timestep_map"].tolist()
        records: list[fguide.StepRecord] = []
        model = _StandIn(cfg["learn_sigma"])
        kw = dict(
            labels=torch.zeros(len(inp["x_T"]), dtype=torch.long),
            guide=_FixedGuide() if cfg["guided"] else None,
            noise=_Replay(inp["noise"]),
            callback=records.append,
            clip_denoised=cfg["clip_denoised"],
        )
        if kind == "ddim_trajectory":
            final = fguide.ddim(model, inp["x_T"], proc, eta=cfg["eta"], **kw)
        else:
            final = fguide.ddpm(model, inp["x_T"], proc, sine_factor=0.0, **kw)
        _close(final, exp["final"], depth)
        assert len(records) == len(exp["x"])
        for k, rec in enumerate(records):
            entering = inp["x_T"] if k == 0 else exp["x"][k - 1]
            _close(rec.x, entering, depth)
            _close(rec.x0, exp["pred_xstart"][k], depth)
        return
    # Single step at respaced index t, per row, through the real sampler started at t: the
    # state entering its second step is the first step's output.
    t = inp["t"]
    out = proc.p_mean_variance(inp["model_output"], inp["x_t"], t, cfg["clip_denoised"])
    rows, x0s = [], []
    for b in range(len(t)):
        tb = int(t[b])
        records = []
        first_noise = inp["noise"][b : b + 1]
        kw = dict(
            labels=torch.zeros(1, dtype=torch.long),
            guide=_FixedGuide(inp["grad"][b : b + 1]) if "grad" in inp else None,
            noise=_Replay(torch.cat([first_noise[None], torch.zeros(tb, *first_noise.shape)])),
            callback=_stop_after_two(records),
            clip_denoised=cfg["clip_denoised"],
        )
        model = _Fixed(inp["model_output"][b : b + 1])
        final = None
        try:
            if kind.startswith("ddim"):
                final = fguide.ddim(
                    model, inp["x_t"][b : b + 1], proc, eta=cfg["eta"], start_step=tb, **kw
                )
            else:
                final = fguide.ddpm(
                    model, inp["x_t"][b : b + 1], proc, sine_factor=0.0, start_step=tb, **kw
                )
        except _Stop:
            pass
        rows.append(records[1].x if tb > 0 else final)
        x0s.append(records[0].x0)
    _close(torch.cat(rows), exp["sample"], depth)
    _close(torch.cat(x0s), exp["pred_xstart"], depth)
    if kind == "ddim_step":
        abar = torch.from_numpy(proc["alphas_cumprod"])[t]
        _close(abar, exp["alpha_bar"], depth)
        _close(torch.from_numpy(proc["alphas_cumprod_prev"])[t], exp["alpha_bar_prev"], depth)
        eps = proc.eps_from_x0(inp["x_t"], t, out.pred_xstart)
        _close(eps, exp["eps_rederived"], depth)
    if kind == "p_sample_step_condition_mean":
        _close(out.mean + out.variance * inp["grad"], exp["cond_mean"], depth)
    if kind == "ddim_step_condition_score":
        _close(torch.cat(x0s), exp["cond_pred_xstart"], depth)


class _Stop(Exception):
    pass


def _stop_after_two(records: list) -> Callable[[fguide.StepRecord], None]:
    def callback(rec: fguide.StepRecord) -> None:
        records.append(rec)
        if len(records) == 2:
            raise _Stop

    return callback


# ---------------------------------------------------------------- elucd_guided_steps.pt

ELUCD = "elucd_guided_steps.pt"


def _fixture_resnet(cfg: dict) -> torch.nn.Module:
    from fixture_utils import fixture_state_dict

    from fguide.models.resnet import Bottleneck, ResNet, resnet

    arch, beta = cfg["classifier_arch"], cfg["softplus_beta"]
    if arch == "resnet_bottleneck_1111":
        net = ResNet(Bottleneck, (1, 1, 1, 1), cfg["num_classes"], beta)
    else:
        net = resnet(arch, num_classes=cfg["num_classes"], softplus_beta=beta)
    net = net.double()
    net.load_state_dict(fixture_state_dict(net, cfg.get("fixture_init_seed", 0)))
    return net.eval()


@pytest.mark.parametrize("case_name", case_names(ELUCD))
def test_elucd_guided_ddpm(case_name: str) -> None:
    case = get_case(ELUCD, case_name)
    cfg, inp, exp = case["config"], case["inputs"], case["expected"]
    proc = _process(cfg)
    assert proc.timestep_map.tolist() == inp["timestep_map"].tolist()
    classifier = _fixture_resnet(cfg)
    tau1 = cfg["joint_temperature_tau1"]
    obj = fguide.objective("base", tau1=tau1, tau2=tau1 * cfg["margin_temperature_discount"])
    assert obj.tau2 == cfg["marginal_temperature_tau2"]
    guide = fguide.ClassifierGuide(classifier, obj, scale=cfg["classifier_scale"])
    model = _StandIn(cfg["learn_sigma"])
    # per step: the classifier's gradient (forward and back) and the step's operations
    depth = _depth(cfg, proc.num_steps, net=2 * network_depth(classifier))
    records: list[fguide.StepRecord] = []
    kw = dict(
        labels=inp["y"],
        guide=guide,
        clip_denoised=cfg["clip_denoised"],
        sine_factor=cfg["gamma_factor"],
        variance_tracking="first_sample",  # EluCD's batch coupling, as the reference ran
    )
    if case["kind"] == "elucd_p_sample_loop":
        assert cfg["max_variance_init"] == 0.0
        final = fguide.ddpm(
            model, inp["x_T"], proc, noise=_Replay(inp["noise"]), callback=records.append, **kw
        )
        _close(final, exp["final"], depth)
        for k, rec in enumerate(records):
            _close(rec.x0, exp["pred_xstart"][k], depth)
            if k > 0:
                _close(rec.x, exp["x"][k - 1], depth)
        return
    # single step at respaced index t (all rows share t here), max variance carried in
    t = int(inp["t"][0])
    assert (inp["t"] == t).all()
    first_noise = inp["noise"]
    kw["max_variance"] = float(inp["max_variance_before"])
    kw["start_step"] = t
    try:
        final = fguide.ddpm(
            model,
            inp["x_t"],
            proc,
            callback=_stop_after_two(records),
            noise=_Replay(torch.cat([first_noise[None], torch.zeros(t, *first_noise.shape)])),
            **kw,
        )
    except _Stop:
        final = None
    sample = records[1].x if t > 0 else final
    rec = records[0]
    assert rec.guidance is not None
    _close(rec.x0, exp["pred_xstart"], depth)
    _close(rec.guidance.logits, exp["logits"], depth)
    _close(obj.score(rec.guidance.logits, inp["y"]), exp["score"], depth)
    _close(rec.guidance.grad * cfg["classifier_scale"], exp["grad_x0"], depth)
    _close(sample, exp["sample"], depth)
    # fguide's sine boost a_t from the reference's σ²_max after the step: EluCD's add value
    sigma2_max = torch.tensor([exp["max_variance_after"]] * 2, dtype=torch.float64)
    add = elucd_sine_boost(t, proc.num_steps, sigma2_max, cfg["gamma_factor"])
    _close(add, [exp["add_value"]] * 2, depth=4)  # sin(π i/n)·σ²_max·γ


def test_per_sample_variance_tracking_matches_reference_for_first_sample() -> None:
    """fguide's default tracks σ²_max per sample: identical to EluCD's for sample 0."""
    case = get_case(ELUCD, case_names(ELUCD)[-1])
    cfg, inp = case["config"], case["inputs"]
    if case["kind"] != "elucd_p_sample_loop":
        pytest.skip("no trajectory case")
    proc = _process(cfg)
    obj = fguide.objective("base", tau1=1.0, tau2=cfg["marginal_temperature_tau2"])
    classifier = _fixture_resnet(cfg)
    guide = fguide.ClassifierGuide(classifier, obj, scale=cfg["classifier_scale"])
    depth = _depth(cfg, proc.num_steps, net=2 * network_depth(classifier))
    outs = {}
    for mode in ("per_sample", "first_sample"):
        outs[mode] = fguide.ddpm(
            _StandIn(True),
            inp["x_T"],
            proc,
            labels=inp["y"],
            guide=guide,
            noise=_Replay(inp["noise"]),
            sine_factor=cfg["gamma_factor"],
            variance_tracking=mode,
        )
    _close(outs["per_sample"][0], outs["first_sample"][0], depth)
    single = fguide.ddpm(
        _StandIn(True),
        inp["x_T"][1:2],
        proc,
        labels=inp["y"][1:2],
        guide=guide,
        noise=_Replay(inp["noise"][:, 1:2]),
        sine_factor=cfg["gamma_factor"],
    )
    _close(outs["per_sample"][1:2], single, depth)


# ---------------------------------------------------------------- edm_heun.pt

EDM = "edm_heun.pt"


def _edm_standin(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    s = sigma.to(x).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x / torch.sqrt(1 + s**2))


@pytest.mark.parametrize("case_name", case_names(EDM))
def test_edm_heun(case_name: str) -> None:
    case = get_case(EDM, case_name)
    cfg, exp = case["config"], case["expected"]
    inp = case.get("inputs", {})
    sig = fguide.karras_sigmas(cfg["num_steps"], cfg["sigma_min"], cfg["sigma_max"], cfg["rho"])
    # Heun: two evaluations and ~10 operations per step, on the scale σ_max·|x|
    depth = 2 * cfg["num_steps"] * 10
    if case["kind"] == "karras_sigmas":
        _close(sig, exp["t_steps"], depth=4)  # (a + i·b)^ρ
        return
    if case["kind"] == "heun_step":
        assert cfg["S_churn"] == 0.0
        i = cfg["step_index"]
        _close(sig[i], inp["t_cur"], depth=4)
        # run one step: a two-point grid [t_cur, t_next] started from x_cur / t_cur
        grid = torch.stack([inp["t_cur"], inp["t_next"]]).double()
        records: list[fguide.StepRecord] = []
        out = fguide.heun(_edm_standin, inp["x_cur"] / inp["t_cur"], grid, callback=records.append)
        _close(out, exp["x_next"], depth)
        _close(records[0].x0, exp["denoised"], depth)
        return
    if case["kind"] == "heun_trajectory":
        _close(sig, exp["t_steps"], depth=4)
        records = []
        out = fguide.heun(_edm_standin, inp["latents"], sig, callback=records.append)
        _close(out, exp["final"], depth)
        for k, rec in enumerate(records):
            _close(rec.x, exp["x_cur"][k], depth)
        return
    assert case["kind"] == "elucd_edm_guided"
    classifier = _fixture_resnet({**cfg, "num_classes": cfg["num_classes"]})
    obj = fguide.objective("base", tau1=cfg["joint_temperature"], tau2=cfg["uncond_temperature"])
    guide = fguide.ClassifierGuide(classifier, obj, scale=cfg["max_guidance"])
    depth = 2 * cfg["num_steps"] * (10 + 2 * network_depth(classifier))
    records = []
    out = fguide.heun(
        _edm_standin,
        inp["latents"],
        sig,
        labels=inp["y"],
        guide=guide,
        callback=records.append,
        sine_factor=cfg["add_factor"],
    )
    _close(out, exp["final"], depth)
    for step in exp["steps"]:
        rec = records[step["step_index"]]
        assert rec.guidance is not None
        _close(rec.x, step["x_hat"], depth)
        _close(rec.x0, step["denoised"], depth)
        _close(rec.guidance.logits, step["logits"], depth)
        _close(rec.guidance.grad, step["raw_grad"], depth)


@pytest.mark.parametrize("num_train_steps", [50, 250, 4000])
def test_rescaled_timesteps_are_k_times_1000_over_T(num_train_steps: int) -> None:
    """ADM's _scale_timesteps: the network sees k_t · 1000/T when rescaling, k_t otherwise
    (every fixture has T = 1000, where both agree)."""
    kept = space_timesteps(num_train_steps, "10")
    plain = make_process("linear", num_train_steps, "10", "fixed_large", False)
    rescaled = make_process("linear", num_train_steps, "10", "fixed_large", True)
    t = torch.arange(len(kept))
    k = torch.tensor(kept, dtype=torch.int64)
    assert torch.equal(plain.model_timesteps(t), k)
    expected = torch.tensor([ki * 1000 / num_train_steps for ki in kept], dtype=torch.float64)
    _close(rescaled.model_timesteps(t), expected, depth=2)  # k · 1000 / T
    # what the sampler hands the network at each step
    seen: list[torch.Tensor] = []

    def model(x: torch.Tensor, t_model: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        seen.append(t_model.clone())
        return torch.zeros_like(x)

    fguide.ddim(model, torch.zeros(2, 1, 2, 2, dtype=torch.float64), rescaled)
    assert len(seen) == len(kept)
    for t_model, k_expected in zip(seen, expected.flip(0), strict=True):
        _close(t_model, k_expected.expand(2), depth=2)
