"""Schedules and samplers against the reference fixtures (ADM, EluCD, EDM)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from fixture_utils import case_names, get_case

import fguide
from fguide.guidance import GuidanceResult
from fguide.samplers import elucd_sine_boost
from fguide.schedules import make_process, space_timesteps

F64 = dict(atol=1e-9, rtol=1e-9)


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
            torch.testing.assert_close(rescaled.model_timesteps(t), value.double(), **F64)
        elif key in _DERIVED:  # arrays fguide does not use: their closed form from ᾱ
            torch.testing.assert_close(
                torch.from_numpy(_DERIVED[key](proc.alphas_cumprod)), value, atol=1e-12, rtol=1e-10
            )
        else:
            torch.testing.assert_close(
                torch.from_numpy(getattr(proc, key)), value, atol=1e-12, rtol=1e-10
            )
        compared += 1
    assert compared == len(exp)


# ---------------------------------------------------------------- p_mean_variance.pt

PMV = "p_mean_variance.pt"


@pytest.mark.parametrize("case_name", case_names(PMV))
def test_p_mean_variance(case_name: str) -> None:
    case = get_case(PMV, case_name)
    proc = _process(case["config"])
    inp, exp = case["inputs"], case["expected"]
    assert proc.model_timesteps(inp["t"]).tolist() == exp["model_timesteps"].tolist()
    for clip, suffix in ((True, "_clip"), (False, "_noclip")):
        out = proc.p_mean_variance(inp["model_output"], inp["x_t"], inp["t"], clip)
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            torch.testing.assert_close(getattr(out, key), exp[key + suffix], **F64)
        out32 = proc.p_mean_variance(
            inp["model_output"].float(), inp["x_t"].float(), inp["t"], clip
        )
        torch.testing.assert_close(out32.mean, exp["mean" + suffix].float(), atol=1e-5, rtol=1e-4)


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
        torch.testing.assert_close(final, exp["final"], **F64)
        assert len(records) == len(exp["x"])
        for k, rec in enumerate(records):
            entering = inp["x_T"] if k == 0 else exp["x"][k - 1]
            torch.testing.assert_close(rec.x, entering, **F64)
            torch.testing.assert_close(rec.x0, exp["pred_xstart"][k], **F64)
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
    torch.testing.assert_close(torch.cat(rows), exp["sample"], **F64)
    torch.testing.assert_close(torch.cat(x0s), exp["pred_xstart"], **F64)
    if kind == "ddim_step":
        abar = torch.from_numpy(proc["alphas_cumprod"])[t]
        torch.testing.assert_close(abar, exp["alpha_bar"], **F64)
        torch.testing.assert_close(
            torch.from_numpy(proc["alphas_cumprod_prev"])[t], exp["alpha_bar_prev"], **F64
        )
        eps = proc.eps_from_x0(inp["x_t"], t, out.pred_xstart)
        torch.testing.assert_close(eps, exp["eps_rederived"], **F64)
    if kind == "p_sample_step_condition_mean":
        torch.testing.assert_close(out.mean + out.variance * inp["grad"], exp["cond_mean"], **F64)
    if kind == "ddim_step_condition_score":
        torch.testing.assert_close(torch.cat(x0s), exp["cond_pred_xstart"], **F64)


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
        torch.testing.assert_close(final, exp["final"], **F64)
        for k, rec in enumerate(records):
            torch.testing.assert_close(rec.x0, exp["pred_xstart"][k], **F64)
            if k > 0:
                torch.testing.assert_close(rec.x, exp["x"][k - 1], **F64)
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
    torch.testing.assert_close(rec.x0, exp["pred_xstart"], **F64)
    torch.testing.assert_close(rec.guidance.logits, exp["logits"], **F64)
    torch.testing.assert_close(obj.score(rec.guidance.logits, inp["y"]), exp["score"], **F64)
    torch.testing.assert_close(rec.guidance.grad * cfg["classifier_scale"], exp["grad_x0"], **F64)
    torch.testing.assert_close(sample, exp["sample"], **F64)
    # fguide's sine boost a_t from the reference's σ²_max after the step: EluCD's add value
    sigma2_max = torch.tensor([exp["max_variance_after"]] * 2, dtype=torch.float64)
    add = elucd_sine_boost(t, proc.num_steps, sigma2_max, cfg["gamma_factor"])
    assert add.tolist() == pytest.approx([exp["add_value"]] * 2, rel=1e-12)


def test_per_sample_variance_tracking_matches_reference_for_first_sample() -> None:
    """fguide's default tracks σ²_max per sample: identical to EluCD's for sample 0."""
    case = get_case(ELUCD, case_names(ELUCD)[-1])
    cfg, inp = case["config"], case["inputs"]
    if case["kind"] != "elucd_p_sample_loop":
        pytest.skip("no trajectory case")
    proc = _process(cfg)
    obj = fguide.objective("base", tau1=1.0, tau2=cfg["marginal_temperature_tau2"])
    guide = fguide.ClassifierGuide(_fixture_resnet(cfg), obj, scale=cfg["classifier_scale"])
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
    torch.testing.assert_close(outs["per_sample"][0], outs["first_sample"][0], **F64)
    single = fguide.ddpm(
        _StandIn(True),
        inp["x_T"][1:2],
        proc,
        labels=inp["y"][1:2],
        guide=guide,
        noise=_Replay(inp["noise"][:, 1:2]),
        sine_factor=cfg["gamma_factor"],
    )
    torch.testing.assert_close(outs["per_sample"][1:2], single, **F64)


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
    if case["kind"] == "karras_sigmas":
        torch.testing.assert_close(sig, exp["t_steps"], atol=1e-12, rtol=1e-12)
        return
    if case["kind"] == "heun_step":
        assert cfg["S_churn"] == 0.0
        i = cfg["step_index"]
        assert float(sig[i]) == pytest.approx(float(inp["t_cur"]), rel=1e-14)
        # run one step: a two-point grid [t_cur, t_next] started from x_cur / t_cur
        grid = torch.stack([inp["t_cur"], inp["t_next"]]).double()
        records: list[fguide.StepRecord] = []
        out = fguide.heun(_edm_standin, inp["x_cur"] / inp["t_cur"], grid, callback=records.append)
        torch.testing.assert_close(out, exp["x_next"], **F64)
        torch.testing.assert_close(records[0].x0, exp["denoised"], **F64)
        return
    if case["kind"] == "heun_trajectory":
        torch.testing.assert_close(sig, exp["t_steps"], atol=1e-12, rtol=1e-12)
        records = []
        out = fguide.heun(_edm_standin, inp["latents"], sig, callback=records.append)
        torch.testing.assert_close(out, exp["final"], **F64)
        for k, rec in enumerate(records):
            torch.testing.assert_close(rec.x, exp["x_cur"][k], **F64)
        return
    assert case["kind"] == "elucd_edm_guided"
    classifier = _fixture_resnet({**cfg, "num_classes": cfg["num_classes"]})
    obj = fguide.objective("base", tau1=cfg["joint_temperature"], tau2=cfg["uncond_temperature"])
    guide = fguide.ClassifierGuide(classifier, obj, scale=cfg["max_guidance"])
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
    torch.testing.assert_close(out, exp["final"], **F64)
    for step in exp["steps"]:
        rec = records[step["step_index"]]
        assert rec.guidance is not None
        torch.testing.assert_close(rec.x, step["x_hat"], **F64)
        torch.testing.assert_close(rec.x0, step["denoised"], **F64)
        torch.testing.assert_close(rec.guidance.logits, step["logits"], **F64)
        torch.testing.assert_close(rec.guidance.grad, step["raw_grad"], **F64)


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
    torch.testing.assert_close(rescaled.model_timesteps(t), expected, atol=1e-12, rtol=0)
    # what the sampler hands the network at each step
    seen: list[torch.Tensor] = []

    def model(x: torch.Tensor, t_model: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        seen.append(t_model.clone())
        return torch.zeros_like(x)

    fguide.ddim(model, torch.zeros(2, 1, 2, 2, dtype=torch.float64), rescaled)
    assert len(seen) == len(kept)
    for t_model, k_expected in zip(seen, expected.flip(0), strict=True):
        torch.testing.assert_close(t_model, k_expected.expand(2), atol=1e-12, rtol=0)
