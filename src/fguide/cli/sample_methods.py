"""``fguide sample``'s flags of the training-free family (``--guidance-method`` and each
method's hyper-parameters); their defaults are :mod:`fguide.defaults`' rows, with the sources
the README cites."""

from __future__ import annotations

import argparse

from fguide import defaults as D
from fguide.config import PARAM_RANGES as R
from fguide.training_free import METHODS
from fguide.training_free_step import SCHEDULES

__all__ = ["add_guidance_method_flags"]

PAPERS = (
    "DPS: Chung et al. ICLR 2023; FreeDoM: Yu et al. ICCV 2023; MPGD: He et al. ICLR 2024; "
    "UGD: Bansal et al. ICLR 2024; TFG: Ye et al. NeurIPS 2024"
)


def add_guidance_method_flags(p: argparse.ArgumentParser) -> None:
    """The ``training-free guidance`` group: the method, its strength's meaning, K, m, TFG's."""
    g = p.add_argument_group(
        "training-free guidance",
        "--method stays the objective; --guidance-method picks the update rule. Defaults: TFG's "
        "code (Ye et al. 2024, YWolfeee/Training-Free-Guidance @ f8d17f3). ddpm/ddim only; "
        "classifiers of x̂0 only.",
    )
    g.add_argument(
        "--guidance-method",
        choices=["elucd", *METHODS],
        help="the update rule: elucd (EluCD's mean shift, default), dps (gradient through the "
        "denoiser), freedom (that, with time-travel), mpgd (a step on x̂0), ugd (forward + "
        f"backward guidance, self-recurrence), tfg (TFG's unified step) ({PAPERS}); --scale is "
        "the strength of dps, freedom, mpgd, ugd (ζ, ρ̄, s, s; default "
        f"{D.DPS_SCALE:g}, TFG's guidance_strength) and a gain on tfg's (--rho, --mu) "
        f"(default {D.TFG_SCALE:g})",
    )
    g.add_argument(
        "--recurrence",
        type=R["recurrence"],
        metavar="K",
        help="freedom, ugd, tfg: repeats of each step (time-travel, self-recurrence) "
        f"(default {D.FREEDOM_RECURRENCE}: none, TFG's recur_steps; FreeDoM's ImageNet "
        "code: 10 within 500:800)",
    )
    g.add_argument(
        "--recurrence-window",
        metavar="LO:HI",
        help="freedom, ugd: the original timesteps (inclusive) where --recurrence applies "
        "(default: every step)",
    )
    g.add_argument(
        "--backward-steps",
        type=R["backward_steps"],
        metavar="M",
        help="ugd: backward-guidance ascent steps on x̂0 "
        f"(default {D.UGD_BACKWARD_STEPS}, TFG's iter_steps - 1)",
    )
    g.add_argument(
        "--rho", type=R["rho"], metavar="X", help=f"tfg: ρ̄, the x_t step (default {D.TFG_RHO:g})"
    )
    g.add_argument(
        "--mu", type=R["mu"], metavar="X", help=f"tfg: μ̄, the x̂0 step (default {D.TFG_MU:g})"
    )
    g.add_argument(
        "--gamma",
        type=R["gamma"],
        metavar="X",
        help=f"tfg: γ̄, the Monte-Carlo smoothing noise (default {D.TFG_GAMMA:g})",
    )
    g.add_argument(
        "--mc-samples",
        type=R["mc_samples"],
        metavar="N",
        help=f"tfg: Monte-Carlo draws M (default {D.TFG_MC_SAMPLES})",
    )
    g.add_argument(
        "--iterations",
        type=R["iterations"],
        metavar="N",
        help=f"tfg: x̂0 ascent steps N_iter (default {D.TFG_ITERATIONS})",
    )
    g.add_argument(
        "--rho-schedule",
        choices=list(SCHEDULES),
        help=f"freedom, tfg: ρ's schedule over the steps (default {D.TFG_RHO_SCHEDULE})",
    )
    g.add_argument(
        "--mu-schedule",
        choices=list(SCHEDULES),
        help=f"tfg: μ's schedule (default {D.TFG_MU_SCHEDULE})",
    )
    g.add_argument(
        "--gamma-schedule",
        choices=["decrease", "constant"],
        help=f"tfg: γ's schedule (default {D.TFG_GAMMA_SCHEDULE})",
    )
    g.add_argument(
        "--tfg-clip",
        action="store_const",
        const=True,
        help="dps, freedom, mpgd, ugd: TFG's clip handling (its published numbers) instead of "
        "the sampler's clip applied consistently",
    )
