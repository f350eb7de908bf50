"""The training-free methods against TFG's own code (tests/reference/tfg_reference.pt).

The reference comes from ``tests/reference/generate_tfg_reference.py``: TFG's ``guide_step`` and
sampling loop (YWolfeee/Training-Free-Guidance at the commit the file names) run on the tiny
float64 networks of ``tests/tfg_tiny.py``, with every noise draw recorded. Each case is run here
through fguide's samplers (``ddim`` with the case's η; also ``ddpm``, whose ``fixed_small``
step is DDIM(η = 1), where η = 1) with the same draws, in two modes where they apply:

* ``tfg_clip``: DPS, FreeDoM, MPGD and UGD with ``tfg_clip=True`` (TFG's clip handling) — every
  case, clip on or off;
* ``consistent``: fguide's default (the sampler's clip applied consistently), where it coincides
  with TFG's code: unguided and TFG cases as they are, DPS and FreeDoM with the clip off (TFG's
  code never clips them), MPGD and UGD on their clip-off cases.

Noise: fguide draws once per update also where the draw is unused (η = 0, the last step), and
draws no time-travel noise after a step's last repeat (TFG does, and discards it); the replay
below is TFG's recorded sequence with those two differences (:func:`_replay_draws`), and every
draw it serves must be used.

Tolerance (:mod:`tolerances`): the largest intermediates are x̂0 = sqrt(1/ᾱ_t) x_t − ... at the
noisiest step run (scale max|x| · sqrt(1/ᾱ_t)); the depth counts, per network evaluation, the
ε-network's and the classifier's rounding stages twice (forward and backward) plus 20 for the
step's formulas, times the evaluations the case makes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tfg_tiny
import tolerances
import torch
from fixture_utils import assert_close_float64
from tolerances import network_depth
from torch import Tensor

import fguide
from fguide import training_free as tf

REF = Path(__file__).parent / "reference" / "tfg_reference.pt"
DATA: dict[str, Any] = torch.load(REF, weights_only=True)
EPS = tfg_tiny.eps_net(DATA["eps_seed"])
CLS = tfg_tiny.classifier(DATA["classifier_seed"])
N = len(DATA["ts"])
PROC = fguide.make_process("linear", tfg_tiny.TRAIN_STEPS, str(N), variance_type="fixed_small")
OBJ = fguide.objective("logsoftmax")  # TFG's log softmax(f)_y
CASES = {c["name"]: c for c in DATA["cases"]}
BASELINES = ("dps", "freedom", "mpgd", "ugd")


def _runs() -> list[tuple[str, str, str]]:
    """(case, sampler, mode) for every case: see the module docstring."""
    out = []
    for name, case in CASES.items():
        p = case["params"]
        modes = []
        if case["method"] in BASELINES:
            modes.append("tfg_clip")
        if case["method"] in ("no", "tfg", "dps", "freedom") or not p["clip_x0"]:
            modes.append("consistent")
        for sampler in ("ddim", "ddpm") if p["eta"] == 1.0 else ("ddim",):
            out += [(name, sampler, mode) for mode in modes]
    return out


def test_networks_noise_and_process_are_the_references() -> None:
    assert torch.equal(tfg_tiny.fingerprint(EPS), DATA["eps_fingerprint"]), "ε-network weights"
    assert torch.equal(tfg_tiny.fingerprint(CLS), DATA["classifier_fingerprint"]), "classifier"
    sched = PROC.tensors("cpu", torch.float64)
    assert torch.equal(torch.flip(sched.timesteps, [0]), DATA["ts"])
    for ours, theirs in (
        (sched.alphas_cumprod, DATA["alpha_prod_ts"]),
        (sched.alphas_cumprod_prev, DATA["alpha_prod_t_prevs"]),
    ):  # ᾱ from the respaced β vs TFG's products: a few roundings of values ≤ 1
        assert_close_float64(torch.flip(ours, [0]), theirs, depth=N)
    for case in CASES.values():
        n = len(case["draw_kind"])
        used = tfg_tiny.noise_draws(case["noise_seed"], n, case["x"].shape[0])
        assert torch.equal(torch.stack([used.sum(), used.pow(2).sum()]), case["draws_fingerprint"])


def _method(case: dict[str, Any], mode: str) -> tf.GuidanceMethod | None:
    p, m = case["params"], case["method"]
    s, raw = p["guidance_strength"], mode == "tfg_clip"
    if m == "dps":
        return tf.DPS(CLS, OBJ, scale=s, tfg_clip=raw)
    if m == "freedom":
        return tf.FreeDoM(
            CLS, OBJ, scale=s, recurrence=p["recur_steps"], schedule=p["rho_schedule"], tfg_clip=raw
        )
    if m == "mpgd":
        return tf.MPGD(CLS, OBJ, scale=s, tfg_clip=raw)
    if m == "ugd":  # TFG's iter_steps − 1 is UGD's m
        return tf.UGD(
            CLS,
            OBJ,
            scale=s,
            recurrence=p["recur_steps"],
            backward_steps=p["iter_steps"] - 1,
            tfg_clip=raw,
        )
    if m == "tfg":
        return tf.TFG(
            CLS,
            OBJ,
            rho=p["rho"],
            mu=p["mu"],
            gamma=p["sigma"],
            mc_samples=p["eps_bsz"],
            recurrence=p["recur_steps"],
            iterations=p["iter_steps"],
            rho_schedule=p["rho_schedule"],
            mu_schedule=p["mu_schedule"],
            gamma_schedule=p["sigma_schedule"],
        )
    assert m == "no"
    return None


def _replay_draws(case: dict[str, Any], sampler: str) -> list[Tensor]:
    """fguide's draw sequence from TFG's: per step and repeat, the Monte-Carlo draws, the
    update's draw (a dummy where TFG drew none: zeros at η = 0 and for DDPM's masked last-step
    draw, NaN for DDIM's unused one) and the time-travel draw except after the last repeat."""
    z = tfg_tiny.noise_draws(case["noise_seed"], len(case["draw_kind"]), case["x"].shape[0])
    steps: dict[int, list[tuple[str, Tensor]]] = {}
    for i, (kind, step) in enumerate(zip(case["draw_kind"], case["draw_step"], strict=True)):
        steps.setdefault(step, []).append((kind, z[i]))
    dummy = (
        torch.zeros_like(case["x"])
        if case["params"]["eta"] == 0 or sampler == "ddpm"
        else torch.full_like(case["x"], math.nan)
    )
    first = case.get("step", 0)
    out: list[Tensor] = []
    for k in range(first, first + 1 if case["kind"] == "step" else N):
        repeats: list[list[tuple[str, Tensor]]] = [[]]
        for kind, draw in steps.get(k, []):
            repeats[-1].append((kind, draw))
            if kind == "renoise":  # TFG ends every repeat of a recurrence loop with one
                repeats.append([])
        if not repeats[-1] and len(repeats) > 1:
            repeats.pop()
        for r, rep in enumerate(repeats):
            kinds = dict(rep)
            out += [draw for kind, draw in rep if kind == "mc"]
            out.append(kinds.get("ddim", dummy))
            if "renoise" in kinds and r < len(repeats) - 1:
                out.append(kinds["renoise"])
    return out


class _Stop(Exception):
    pass


class _Replay:
    """Serves the draws in order; a call past the end (the next step) stops the sampler."""

    def __init__(self, draws: list[Tensor]):
        self.draws, self.used, self.next_state = draws, 0, None

    def __call__(self, like: Tensor) -> Tensor:
        if self.used == len(self.draws):
            self.next_state = like.clone()
            raise _Stop
        self.used += 1
        return self.draws[self.used - 1].clone()


class _Counted:
    """Counts calls and rows of a network; for a step case, stops at the next step's first call
    (its input is the step's output)."""

    def __init__(self, net: Callable[..., Tensor], stop_unless_t: int | None = None):
        self.net, self.stop_unless_t = net, stop_unless_t
        self.calls = self.rows = 0
        self.next_state: Tensor | None = None

    def __call__(self, x: Tensor, t: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        if self.stop_unless_t is not None and t is not None and int(t[0]) != self.stop_unless_t:
            self.next_state = x.detach().clone()
            raise _Stop
        self.calls += 1
        self.rows += x.shape[0]
        return self.net(x) if t is None else self.net(x, t, labels)


def _run(name: str, sampler: str, mode: str) -> tuple[Tensor, _Replay, _Counted, _Counted]:
    case = CASES[name]
    p = case["params"]
    replay = _Replay(_replay_draws(case, sampler))
    start = N - 1 - case["step"] if case["kind"] == "step" else None
    eps = _Counted(EPS, None if start is None else int(PROC.timestep_map[start]))
    clf = _Counted(CLS)
    method = _method(case, mode)
    if method is not None:
        method = dataclasses.replace(method, classifier=clf)  # counted
    clip = p["clip_x0"] and not (mode == "consistent" and case["method"] in ("dps", "freedom"))
    kw: dict[str, Any] = {"eta": p["eta"]} if sampler == "ddim" else {}
    fn = fguide.ddim if sampler == "ddim" else fguide.ddpm
    try:
        out = fn(
            eps,
            case["x"].clone(),
            PROC,
            labels=case["labels"],
            guide=method,
            noise=replay,
            clip_denoised=clip,
            start_step=start,
            **kw,
        )
    except _Stop:
        out = eps.next_state if eps.next_state is not None else replay.next_state
    assert out is not None
    return out, replay, eps, clf


def _tolerance_inputs(case: dict[str, Any]) -> tuple[float, float]:
    """(scale, depth) of the module docstring's rule."""
    k0 = case.get("step", 0)
    scale = float(case["x"].abs().max()) / math.sqrt(float(DATA["alpha_prod_ts"][k0]))
    per_eval = 2 * (network_depth(EPS) + network_depth(CLS)) + 20
    evals = case["eps_calls"] + case["classifier_calls"]
    return scale, per_eval * evals


def _expected_evaluations(case: dict[str, Any]) -> tuple[int, int]:
    """fguide's ε-network and classifier calls: per step and repeat one ε evaluation (with its
    backward where the method differentiates the denoiser) and one classifier evaluation per
    gradient: DPS, FreeDoM 1; MPGD 1; UGD 1 + m; TFG [ρ ≠ 0] + N_iter [μ ≠ 0]."""
    p, m = case["params"], case["method"]
    steps = 1 if case["kind"] == "step" else N
    repeats = p["recur_steps"] if m in ("no", "freedom", "ugd", "tfg") else 1
    per = {
        "no": 0,
        "dps": 1,
        "freedom": 1,
        "mpgd": 1,
        "ugd": p["iter_steps"],
        "tfg": int(p["rho"] != 0) + p["iter_steps"] * int(p["mu"] != 0),
    }[m]
    return steps * repeats, steps * repeats * per


@pytest.mark.parametrize(("name", "sampler", "mode"), _runs())
def test_reproduces_tfg(name: str, sampler: str, mode: str) -> None:
    case = CASES[name]
    out, replay, eps, clf = _run(name, sampler, mode)
    assert replay.used == len(replay.draws), "every TFG draw is used, in order"
    scale, depth = _tolerance_inputs(case)
    tolerances.assert_close(out, case["out"], torch.float64, depth=depth, scale=scale, msg=name)
    eps_calls, clf_calls = _expected_evaluations(case)
    assert (eps.calls, clf.calls) == (eps_calls, clf_calls)
    assert eps.calls <= case["eps_calls"]  # never more network work than TFG's code


def test_clip_handling_is_the_only_difference_from_tfg_at_zero_strength() -> None:
    # TFG's MPGD and DPS at strength 0 are not its unguided step (their (x̂0, ε) pair ignores
    # the clip); fguide's consistent methods at strength 0 are (property tests: bit for bit).
    no = CASES["no_step"]["out"]
    for name in ("mpgd_step_zero", "dps_step_zero"):
        assert (CASES[name]["out"] - no).abs().max() > 1e-3
    assert torch.equal(CASES["tfg_step_zero"]["out"], no)
    out, _, _, _ = _run("mpgd_step_zero", "ddim", "consistent")
    ref, _, _, _ = _run("no_step", "ddim", "consistent")
    assert torch.equal(out, ref)
