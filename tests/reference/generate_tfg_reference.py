"""Generate ``tfg_reference.pt``: TFG's own guided DDIM steps on tiny networks (issue 21).

Reference: YWolfeee/Training-Free-Guidance on GitHub ("TFG: Unified Training-Free Guidance for
Diffusion Models", Ye et al., NeurIPS 2024) at commit f8d17f3ec2f0e7377dedf7b7bc62fad15f36cb77.
Its code does not enter fguide: clone it elsewhere (say /tmp/tfg, checked out at that commit)
and run this script in a separate virtual environment, from the repository root::

    python3 -m venv /work/venv-tfg
    /work/venv-tfg/bin/pip install torch==2.14.1 torchvision==0.29.1 diffusers transformers \
        datasets scipy matplotlib pytest
    /work/venv-tfg/bin/python tests/reference/generate_tfg_reference.py --tfg /tmp/tfg

(Generated with torch 2.14.1, torchvision 0.29.1, diffusers 0.42.1, transformers 5.25.0,
datasets 5.2.0, scipy 1.17.1, matplotlib 3.11.2, numpy 2.4.6, Python 3.11; TFG's modules import
these at import time although the guidance maths needs only torch. pytest: ``tfg_tiny`` takes
the weight rule from ``tests/fixture_utils.py``.) The weights and noise are rebuilt from seeds
in the test process (torch 2.13 there gives the same values: the fingerprints match).

What runs is TFG's code: its guidance classes (``methods/{base,dps,freedom,mpgd,ugd,tfg}.py``:
``guide_step``, ``_predict_x0``, ``_predict_x_prev_from_eps`` / ``_from_zero``, ``_predict_xt``,
``get_rho`` / ``get_mu`` / ``get_std``, ``tilde_get_guidance``), its ``tasks.base.BaseGuider``
and ``tasks.image_label_guidance.ImageLabelGuidance`` (``get_guidance``), the log-softmax
selection of ``tasks.networks.resnet.ResNet18.forward``, its ``diffusion.unet.openai.
get_diffusion`` (schedule, respacing) and ``diffusion.ddim.ImageSampler.sample`` (the loop of the
"run" cases), configured through ``utils.configs.Arguments``. Replaced, and only these:

* model loading: ``diffusion.unet.openai.create_model`` returns ``tests/tfg_tiny.TinyEps`` and
  ``torch.load`` returns its own state dict while ``get_diffusion`` runs; ``ResNet18`` in
  ``tasks.image_label_guidance`` builds a module whose ``_forward`` is
  ``tests/tfg_tiny.TinyClassifier`` and whose ``forward`` is TFG's ``ResNet18.forward``;
* randomness: the guidance object gets a ``noise_fn`` (the constructor argument TFG's molecule
  sampler uses) that returns ``sigma * z + x`` as TFG's default does, with z drawn from a seeded
  generator and recorded; the run cases' start x_T replaces ``diffusion.ddim.randn_tensor``;
* logging: TFG's ``logger`` package is registered without running its ``__init__`` (which
  imports torchaudio for audio logging); ``utils.utils`` (evaluators) is not imported, so the
  argument split of ``get_config`` and the class choice of ``get_guidance`` are done here.

Everything is float64 (``torch.set_default_dtype``). The image task is TFG's
``label_guidance`` with one target class for the whole batch (TFG's semantics). The process is
ADM's linear schedule, T = 1000, respaced to 5 steps ([999, 749, 500, 250, 0]).

It writes ``tfg_reference.pt`` (``torch.load(weights_only=True)``) next to this script:

* ``tfg_commit``, ``eps_seed``, ``classifier_seed`` (weights: ``tfg_tiny.eps_net(seed)``,
  ``tfg_tiny.classifier(seed)``), ``eps_fingerprint``, ``classifier_fingerprint``
  (``tfg_tiny.fingerprint``), ``ts`` (model timesteps, noisiest first), ``alpha_prod_ts``,
  ``alpha_prod_t_prevs`` (TFG's respaced ᾱ_t and ᾱ_{t−1} in loop order);
* ``cases``: a list of dicts, each with ``name``, ``method`` (TFG's ``guidance_name``),
  ``kind`` (``step``: one ``guide_step`` call at loop index ``step``; ``run``: the whole
  ``ImageSampler.sample`` loop), ``params`` (every ``Arguments`` field the method reads),
  ``labels`` [B], ``x`` (x_t of the step, or x_T of the run), ``out`` (TFG's returned x_{t−1},
  or the final sample); the noise: the z of the k-th ``noise_fn`` call is
  ``tfg_tiny.noise_draws(noise_seed, k + 1, B)[k]`` (``draws_fingerprint``: Σ z and Σ z² over
  the draws used), with ``draw_kind[k]`` (``mc``: ``get_noise``'s Monte-Carlo ε; ``ddim``: the
  DDIM step's noise in ``_predict_x_prev_from_eps``; ``renoise``: ``_predict_xt``'s re-noising
  of the recurrence), ``draw_step[k]`` (loop index) and ``draw_sigma[k]`` (the σ it was scaled
  by); for step cases ``guidance`` / ``guidance_kind``: every value TFG's ``get_guidance``
  returned, in order (``logp``: per-sample log p_y; ``grad``: its gradient w.r.t. the tensor
  passed in, x_t or x̂0); ``eps_calls`` / ``eps_samples`` and ``classifier_calls`` /
  ``classifier_samples``: the network evaluations (calls and rows) TFG made; ``clip_margin``:
  the smallest | |x̂0| − 1 | over every ε evaluation (no pixel is near the clip boundary, so
  float64 round-off cannot flip a clamp).

``--trajectories PATH`` also saves, per case, the states entering each step and the result
(not committed: for locating the first step at which an implementation departs).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TFG_COMMIT = "f8d17f3ec2f0e7377dedf7b7bc62fad15f36cb77"
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: tfg_tiny, fixture_utils

import tfg_tiny  # noqa: E402

EPS_SEED, CLASSIFIER_SEED = 1, 2
BATCH, TARGET, STEPS, STEP_INDEX = 2, 3, 5, 2
MAX_DRAWS = 48
DATA_SEED, NOISE_SEED = 21, 100
CLASSES = {
    "no": "methods.base.BaseGuidance",
    "dps": "methods.dps.DPSGuidance",
    "freedom": "methods.freedom.FreedomGuidance",
    "mpgd": "methods.mpgd.MPGDGuidance",
    "ugd": "methods.ugd.UGDGuidance",
    "tfg": "methods.tfg.TFGGuidance",
}
PARAM_FIELDS = (
    "guidance_strength", "recur_steps", "iter_steps", "rho", "mu", "sigma", "eps_bsz",
    "rho_schedule", "mu_schedule", "sigma_schedule", "eta", "clip_x0", "clip_sample_range",
    "clip_scale", "train_steps", "inference_steps", "target",
)  # fmt: skip

# (name, method, kind, Arguments overrides): TFG's defaults (utils/configs.py) unless given.
CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("no_step", "no", "step", {}),
    ("dps_step", "dps", "step", {"guidance_strength": 5.0}),
    ("dps_step_noclip", "dps", "step", {"guidance_strength": 5.0, "clip_x0": False}),
    ("dps_step_eta0", "dps", "step", {"guidance_strength": 5.0, "eta": 0.0}),
    ("dps_step_zero", "dps", "step", {"guidance_strength": 0.0}),
    ("freedom_step", "freedom", "step", {"guidance_strength": 0.5, "recur_steps": 2}),
    ("mpgd_step", "mpgd", "step", {"guidance_strength": 0.2}),
    ("mpgd_step_noclip", "mpgd", "step", {"guidance_strength": 0.2, "clip_x0": False}),
    ("mpgd_step_eta0", "mpgd", "step", {"guidance_strength": 0.2, "eta": 0.0}),
    ("mpgd_step_zero", "mpgd", "step", {"guidance_strength": 0.0}),
    ("ugd_step", "ugd", "step", {"guidance_strength": 0.3, "recur_steps": 2, "iter_steps": 3}),
    (
        "ugd_step_noclip",
        "ugd",
        "step",
        {"guidance_strength": 0.3, "iter_steps": 2, "clip_x0": False},
    ),
    (
        "tfg_step_cifar",  # scripts/cifar10_label.sh
        "tfg",
        "step",
        {"rho": 1.0, "mu": 0.25, "sigma": 0.001, "eps_bsz": 1, "iter_steps": 4},
    ),
    (
        "tfg_step_mc",
        "tfg",
        "step",
        {
            "rho": 0.5,
            "mu": 0.5,
            "sigma": 0.1,
            "eps_bsz": 3,
            "iter_steps": 2,
            "recur_steps": 2,
            "clip_x0": False,
        },
    ),
    (
        "tfg_step_schedules",
        "tfg",
        "step",
        {
            "rho": 0.8,
            "mu": 0.3,
            "sigma": 0.05,
            "eps_bsz": 2,
            "iter_steps": 1,
            "rho_schedule": "decrease",
            "mu_schedule": "constant",
            "sigma_schedule": "constant",
        },
    ),
    (
        "tfg_step_mu_only",
        "tfg",
        "step",
        {"rho": 0.0, "mu": 0.5, "sigma": 0.0, "iter_steps": 1},
    ),
    ("tfg_step_zero", "tfg", "step", {"rho": 0.0, "mu": 0.0, "sigma": 0.0}),
    ("no_run", "no", "run", {}),
    ("dps_run", "dps", "run", {"guidance_strength": 5.0}),
    ("freedom_run", "freedom", "run", {"guidance_strength": 0.5, "recur_steps": 2}),
    ("mpgd_run", "mpgd", "run", {"guidance_strength": 0.2}),
    ("ugd_run", "ugd", "run", {"guidance_strength": 0.3, "recur_steps": 2, "iter_steps": 3}),
    (
        "tfg_run_cifar",
        "tfg",
        "run",
        {"rho": 1.0, "mu": 0.25, "sigma": 0.001, "eps_bsz": 1, "iter_steps": 4},
    ),
    (
        "tfg_run_mc",
        "tfg",
        "run",
        {"rho": 0.5, "mu": 0.5, "sigma": 0.1, "eps_bsz": 2, "iter_steps": 2, "recur_steps": 2},
    ),
]


def check_commit(tfg: Path, allow_other: bool) -> None:
    """Refuse a TFG checkout at another commit (unless ``allow_other``)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(tfg), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "<not a git checkout>"
    if head != TFG_COMMIT and not allow_other:
        sys.exit(f"--tfg {tfg}: HEAD is {head}, expected {TFG_COMMIT} (--allow-other-commit)")


def import_tfg(tfg: Path) -> types.SimpleNamespace:
    """TFG's modules, imported from the checkout (its ``logger`` package without __init__)."""
    sys.path.insert(0, str(tfg))
    logger = types.ModuleType("logger")
    logger.__path__ = [str(tfg / "logger")]
    sys.modules["logger"] = logger
    import importlib

    names = [
        "utils.configs", "tasks.base", "tasks.image_label_guidance", "tasks.networks.resnet",
        "diffusion.unet.openai", "diffusion.ddim",
    ] + sorted({c.rsplit(".", 1)[0] for c in CLASSES.values()})  # fmt: skip
    mods = {n: importlib.import_module(n) for n in names}
    return types.SimpleNamespace(mods=mods, cls={k: _attr(mods, v) for k, v in CLASSES.items()})


def _attr(mods: dict[str, Any], dotted: str) -> Any:
    module, name = dotted.rsplit(".", 1)
    return getattr(mods[module], name)


class Counter:
    """Network evaluations (calls and rows) and the ε-network's clip margin."""

    def __init__(self) -> None:
        self.eps_calls = self.eps_samples = self.cls_calls = self.cls_samples = 0
        self.clip_margin = math.inf


class CountingEps:
    """TFG's ``unet(x, t)``: the tiny ε-network, counted, with the x̂0 clip margin recorded."""

    def __init__(self, net: tfg_tiny.TinyEps, counter: Counter):
        self.net, self.counter = net, counter

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(x, t)
        c = self.counter
        c.eps_calls += 1
        c.eps_samples += x.shape[0]
        with torch.no_grad():
            abar = self.net.alphas_cumprod[torch.as_tensor(t).long()]
            x0 = (x - torch.sqrt(1 - abar) * out) / torch.sqrt(abar)
            c.clip_margin = min(c.clip_margin, float((x0.abs() - 1).abs().min()))
        return out


class NoiseRecorder:
    """TFG's ``noise_fn(x, sigma)`` = sigma · z + x, z the next of ``tfg_tiny.noise_draws``."""

    KINDS = {"get_noise": "mc", "_predict_x_prev_from_eps": "ddim", "_predict_xt": "renoise"}

    def __init__(self, seed: int):
        self.seed = seed
        self.pool = tfg_tiny.noise_draws(seed, MAX_DRAWS, BATCH)
        self.step = -1
        self.kinds: list[str] = []
        self.steps: list[int] = []
        self.sigmas: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: Any, **kwargs: Any) -> torch.Tensor:
        z = self.pool[len(self.kinds)]
        if z.shape != x.shape:
            raise RuntimeError(f"noise_fn asked for {tuple(x.shape)}, the draws are {z.shape}")
        self.kinds.append(self._caller())
        self.steps.append(self.step)
        self.sigmas.append(float(sigma))
        return sigma * z + x

    def _caller(self) -> str:
        frame = sys._getframe(2)
        while frame is not None:
            kind = self.KINDS.get(frame.f_code.co_name)
            if kind is not None:
                return kind
            frame = frame.f_back  # type: ignore[assignment]
        raise RuntimeError("noise_fn called from an unexpected place")


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def make_args(tfg: types.SimpleNamespace, method: str, overrides: dict[str, Any]) -> Any:
    """TFG's ``Arguments`` for the tiny label-guidance task, split as ``get_config`` does."""
    args = tfg.mods["utils.configs"].Arguments(
        data_type="image",
        task="label_guidance",
        image_size=tfg_tiny.IMAGE_SHAPE[-1],
        model_name_or_path="openai_cifar10_tiny.pt",  # 'openai' + 'cifar10': no learned σ
        train_steps=tfg_tiny.TRAIN_STEPS,
        inference_steps=STEPS,
        seed=0,
        device="cpu",
        per_sample_batch_size=BATCH,
        num_samples=BATCH,
        guidance_name=method,
        target=str(TARGET),
        guide_network="resnet_tiny",  # 'resnet': TFG's ResNet18 branch (patched below)
    )
    for k, v in overrides.items():
        if not hasattr(args, k):
            raise KeyError(f"TFG's Arguments has no field {k!r}")
        setattr(args, k, v)
    args.device = torch.device(args.device)
    args.tasks = args.task.split("+")
    args.guide_networks = args.guide_network.split("+")
    args.targets = args.target.split("+")
    return args


def make_sampler(tfg: types.SimpleNamespace, args: Any, counter: Counter) -> Any:
    """TFG's ``ImageSampler`` with the tiny ε-network in place of its UNet checkpoint."""
    net = tfg_tiny.eps_net(EPS_SEED)
    openai = tfg.mods["diffusion.unet.openai"]
    with (
        patched(openai, "create_model", lambda **kwargs: net),
        patched(torch, "load", lambda *a, **k: net.state_dict()),
    ):
        sampler = tfg.mods["diffusion.ddim"].ImageSampler(args)
    sampler.unet = CountingEps(net, counter)
    return sampler


def make_guidance(
    tfg: types.SimpleNamespace, args: Any, noise: NoiseRecorder, counter: Counter
) -> Any:
    """TFG's guidance class for ``args.guidance_name`` with the tiny classifier as its guide."""
    resnet_forward = tfg.mods["tasks.networks.resnet"].ResNet18.forward
    cls_net = tfg_tiny.classifier(CLASSIFIER_SEED)

    class TinyTFGClassifier(torch.nn.Module):
        forward = resnet_forward  # TFG's log-softmax selection of the target class

        def __init__(self, targets: Any, guide_network: str | None = None):
            super().__init__()
            self.net, self.target = cls_net, targets

        def _forward(self, x: torch.Tensor) -> torch.Tensor:
            counter.cls_calls += 1
            counter.cls_samples += x.shape[0]
            return self.net(x)

    with patched(tfg.mods["tasks.image_label_guidance"], "ResNet18", TinyTFGClassifier):
        return tfg.cls[args.guidance_name](args, noise_fn=noise)


def record_guidance(guidance: Any) -> tuple[list[torch.Tensor], list[str]]:
    """Wrap the guider's ``get_guidance`` to record every value it returns."""
    values: list[torch.Tensor] = []
    kinds: list[str] = []
    inner = guidance.guider.get_guidance

    def get_guidance(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = inner(*args, **kwargs)
        values.append(out.detach().clone())
        kinds.append("logp" if kwargs.get("return_logp") else "grad")
        return out

    guidance.guider.get_guidance = get_guidance
    return values, kinds


def track_steps(guidance: Any, noise: NoiseRecorder, states: list[torch.Tensor]) -> None:
    """Tell the noise recorder the loop index; record the state entering each step."""
    inner = guidance.guide_step

    def guide_step(x: torch.Tensor, t: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        noise.step = t
        states.append(x.detach().clone())
        return inner(x, t, *args, **kwargs)

    guidance.guide_step = guide_step


@functools.cache
def step_input(abar: float) -> torch.Tensor:
    """x_t = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) z, x0 uniform in (−0.9, 0.9); one tensor for every step
    case (stored once)."""
    g = torch.Generator().manual_seed(DATA_SEED)
    shape = (BATCH, *tfg_tiny.IMAGE_SHAPE)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 1.8 - 0.9
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * z


@functools.cache
def run_start() -> torch.Tensor:
    """x_T of every run case (stored once)."""
    g = torch.Generator().manual_seed(DATA_SEED + 1)
    return torch.randn((BATCH, *tfg_tiny.IMAGE_SHAPE), generator=g, dtype=torch.float64)


def run_case(
    tfg: types.SimpleNamespace, spec: tuple[str, str, str, dict[str, Any]]
) -> tuple[dict[str, Any], torch.Tensor]:
    """One reference case through TFG's code; also the states entering each step."""
    name, method, kind, overrides = spec
    counter = Counter()
    noise = NoiseRecorder(seed=NOISE_SEED)  # one pool: cases that draw alike are comparable
    args = make_args(tfg, method, overrides)
    sampler = make_sampler(tfg, args, counter)
    guidance = make_guidance(tfg, args, noise, counter)
    values, value_kinds = record_guidance(guidance)
    states: list[torch.Tensor] = []
    track_steps(guidance, noise, states)
    quiet = contextlib.redirect_stdout(io.StringIO())  # FreeDoM and UGD print max|x| per step
    if kind == "step":
        x = step_input(float(sampler.alpha_prod_ts[STEP_INDEX]))
        with quiet:
            out = guidance.guide_step(
                x.clone(), STEP_INDEX, sampler.unet, sampler.ts, sampler.alpha_prod_ts,
                sampler.alpha_prod_t_prevs, sampler.eta,
            )  # fmt: skip
    else:
        x = run_start()
        with quiet, patched(tfg.mods["diffusion.ddim"], "randn_tensor", lambda **k: x.clone()):
            out = sampler.sample(sample_size=BATCH, guidance=guidance)
    used = noise.pool[: len(noise.kinds)]
    case: dict[str, Any] = {
        "name": name,
        "method": method,
        "kind": kind,
        "params": {k: getattr(args, k) for k in PARAM_FIELDS},
        "labels": torch.full((BATCH,), TARGET, dtype=torch.long),
        "x": x,
        "out": out.detach(),
        "noise_seed": noise.seed,
        "draws_fingerprint": torch.stack([used.sum(), used.pow(2).sum()]),
        "draw_kind": noise.kinds,
        "draw_step": noise.steps,
        "draw_sigma": torch.tensor(noise.sigmas, dtype=torch.float64),
        "eps_calls": counter.eps_calls,
        "eps_samples": counter.eps_samples,
        "classifier_calls": counter.cls_calls,
        "classifier_samples": counter.cls_samples,
        "clip_margin": counter.clip_margin,
    }
    if kind == "step":
        case["step"] = STEP_INDEX
        case["guidance"] = values
        case["guidance_kind"] = value_kinds
    return case, torch.stack([*states, out.detach()])


def describe(case: dict[str, Any]) -> str:
    return (
        f"{case['name']:<20} draws {len(case['draw_kind']):>2}  eps {case['eps_calls']:>2} calls"
        f"/{case['eps_samples']:>3} rows  cls {case['classifier_calls']:>2}/"
        f"{case['classifier_samples']:>3}  max|out| {float(case['out'].abs().max()):7.3f}"
        f"  |out − x| {float((case['out'] - case['x']).abs().max()):7.3f}"
        f"  clip margin {case['clip_margin']:.2e}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tfg", type=Path, required=True, help="TFG checkout")
    parser.add_argument("--allow-other-commit", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "tfg_reference.pt")
    parser.add_argument(
        "--trajectories",
        type=Path,
        help="also save {case name: states entering each step, then the result} here (debugging)",
    )
    opts = parser.parse_args(argv)
    check_commit(opts.tfg, opts.allow_other_commit)
    torch.set_default_dtype(torch.float64)
    tfg = import_tfg(opts.tfg.resolve())
    results = [run_case(tfg, spec) for spec in CASES]
    cases = [case for case, _ in results]
    for case in cases:
        print(describe(case))
        if not case["clip_margin"] > 1e-6:
            sys.exit(f"{case['name']}: a pixel of x̂0 lies within 1e-6 of the clip boundary")
    probe = make_sampler(tfg, make_args(tfg, "no", {}), Counter())
    data = {
        "tfg_commit": TFG_COMMIT,
        "eps_seed": EPS_SEED,
        "classifier_seed": CLASSIFIER_SEED,
        "eps_fingerprint": tfg_tiny.fingerprint(tfg_tiny.eps_net(EPS_SEED)),
        "classifier_fingerprint": tfg_tiny.fingerprint(tfg_tiny.classifier(CLASSIFIER_SEED)),
        "ts": probe.ts.clone(),
        "alpha_prod_ts": probe.alpha_prod_ts.clone().double(),
        "alpha_prod_t_prevs": probe.alpha_prod_t_prevs.clone().double(),
        "cases": cases,
    }
    torch.save(data, opts.out)
    if opts.trajectories is not None:
        torch.save({c["name"]: traj for c, traj in results}, opts.trajectories)
    print(f"wrote {opts.out} ({os.path.getsize(opts.out) / 1024:.0f} KiB, {len(cases)} cases)")


if __name__ == "__main__":
    main()
