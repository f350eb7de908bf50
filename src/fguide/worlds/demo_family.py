"""The training-free family's rows in the Gaussian-mixture demo, and what each row costs.

:data:`FAMILY` names the demo's rows of :mod:`fguide.training_free` (each with the objective
``logsoftmax``, TFG's log p(y | x̂0), so that a family row and the demo's ``logsoftmax`` row
differ only in the update rule) and builds each at a strength. A strength is one number per
method (DPS ζ, FreeDoM ρ̄, MPGD s, UGD s, TFG's gain g on (ρ̄, μ̄) = (1, 0.25)·g with its other
defaults), so that the demo chooses it by one sweep over a wide grid, every grid point in one
sampler call (the methods' ``gains``).

:class:`Counted` and :class:`Cost` measure a sampler call: the network evaluations (rows that
entered the ε-network and the guiding classifier, and the rows whose graph was kept for a
backward pass) and the CPU time of the call's thread without its callbacks (the demo's
trajectory recorders are measurements, not the method).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fguide import defaults
from fguide import training_free as tf
from fguide.guidance import ClassifierFn
from fguide.objectives import objective
from fguide.samplers import StepRecord

__all__ = [
    "FAMILY",
    "STRENGTH_GRID",
    "Cost",
    "Counted",
    "FamilyRow",
    "family_method",
]

STRENGTH_GRID = tuple(0.25 * 2.0**j for j in range(-12, 6))
"""The family's strength sweep: TFG's search grid 0.25·2^j (``searching.py``, up to 8),
extended down to 0.25·2^-12: the methods' units differ by orders of magnitude."""


@dataclass(frozen=True)
class FamilyRow:
    """One demo row of the family: how to build it at a strength, and what it is."""

    build: Callable[..., tf.GuidanceMethod]
    """(classifier, objective, strength, gains) → the method."""
    about: str
    cost: float = 1.0
    """Roughly its CPU time against DPS's (measured), to start the costliest jobs first."""


def _tfg(c: ClassifierFn, o: Any, s: float, g: Tensor | None) -> tf.GuidanceMethod:
    # at strength 0 nothing guides, and the Monte-Carlo draws would only shift the noise
    # stream: without them the row is the unguided sampler, as every family row at 0
    gamma = defaults.TFG_GAMMA if s != 0 else 0.0
    return tf.TFG(c, o, rho=s * defaults.TFG_RHO, mu=s * defaults.TFG_MU, gamma=gamma, gains=g)


FAMILY: dict[str, FamilyRow] = {
    "dps": FamilyRow(
        lambda c, o, s, g: tf.DPS(c, o, scale=s, gains=g), "DPS: ζ ∇_{x_t} log p_y / NLL"
    ),
    "freedom": FamilyRow(lambda c, o, s, g: tf.FreeDoM(c, o, scale=s, gains=g), "FreeDoM ρ̄, K = 1"),
    "freedom_k10": FamilyRow(
        lambda c, o, s, g: tf.FreeDoM(c, o, scale=s, recurrence=10, window=(500, 800), gains=g),
        "FreeDoM with time-travel K = 10 at t in [500, 800] (FreeDoM's ImageNet setting)",
        3.0,
    ),
    "mpgd": FamilyRow(lambda c, o, s, g: tf.MPGD(c, o, scale=s, gains=g), "MPGD: a step on x̂0"),
    "ugd": FamilyRow(lambda c, o, s, g: tf.UGD(c, o, scale=s, gains=g), "UGD forward, K = 1"),
    "ugd_k3m3": FamilyRow(
        lambda c, o, s, g: tf.UGD(c, o, scale=s, recurrence=3, backward_steps=3, gains=g),
        "UGD with self-recurrence K = 3 and m = 3 backward steps",
        4.5,
    ),
    "tfg": FamilyRow(_tfg, "TFG's defaults (γ̄ 0.001, M 1, N_iter 4), (ρ̄, μ̄) = (1, 0.25)·g", 2.0),
}
"""The family's demo rows by name (the demo's ``--methods`` names)."""


def family_method(
    name: str, classifier: ClassifierFn, strength: float, gains: Tensor | None = None
) -> tf.GuidanceMethod:
    """The row ``name`` of :data:`FAMILY` at ``strength`` (``gains``: per-sample multipliers)."""
    return FAMILY[name].build(classifier, objective("logsoftmax"), strength, gains)


class Counted:
    """A network wrapper counting the rows it evaluates, and the rows evaluated with a graph
    kept for a backward pass (grad enabled and an input that requires it)."""

    def __init__(self, net: Callable[..., Tensor]):
        self.net = net
        self.model = net  # classifier_dtype looks through ``model``
        self.rows = 0
        self.grad_rows = 0

    def __call__(self, x: Tensor, *args: Any) -> Tensor:
        self.rows += x.shape[0]
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_rows += x.shape[0]
        return self.net(x, *args)


@dataclass
class Cost:
    """What a row's sampler calls cost, summed over calls: network rows and CPU seconds."""

    samples: int = 0
    eps: int = 0
    eps_backward: int = 0
    classifier: int = 0
    classifier_backward: int = 0
    cpu_s: float = 0.0
    callbacks_s: float = field(default=0.0, repr=False)

    def excluding(
        self, callback: Callable[[StepRecord], None] | None
    ) -> Callable[[StepRecord], None] | None:
        """``callback`` with its own CPU time taken out of this cost's (see :meth:`measure`)."""
        if callback is None:
            return None
        inner = callback

        def call(rec: StepRecord) -> None:
            start = time.thread_time()
            inner(rec)
            self.callbacks_s += time.thread_time() - start

        return call

    @contextmanager
    def measure(self, nets: tuple[Counted, Counted], samples: int) -> Iterator[None]:
        """Add the block's network rows (ε-network, classifier) and thread CPU time, less the
        callbacks', for ``samples`` samples. The demo runs torch on this one thread."""
        eps, clf = nets
        before = (eps.rows, eps.grad_rows, clf.rows, clf.grad_rows)
        callbacks, start = self.callbacks_s, time.thread_time()
        yield
        self.cpu_s += time.thread_time() - start - (self.callbacks_s - callbacks)
        self.samples += samples
        self.eps += eps.rows - before[0]
        self.eps_backward += eps.grad_rows - before[1]
        self.classifier += clf.rows - before[2]
        self.classifier_backward += clf.grad_rows - before[3]

    def share(self, samples: int, of: int) -> Cost:
        """The part of this cost that ``samples`` of its ``of`` rows take (a batched call's
        rows all cost the same: the same networks, steps and guidance)."""
        f = samples / of
        return Cost(
            samples,
            round(self.eps * f),
            round(self.eps_backward * f),
            round(self.classifier * f),
            round(self.classifier_backward * f),
            self.cpu_s * f,
        )

    def __iadd__(self, other: Cost) -> Cost:
        self.samples += other.samples
        self.eps += other.eps
        self.eps_backward += other.eps_backward
        self.classifier += other.classifier
        self.classifier_backward += other.classifier_backward
        self.cpu_s += other.cpu_s
        return self

    def per_sample(self) -> dict[str, float]:
        """Network evaluations and CPU seconds per sample (the table's and plot's columns)."""
        n = max(self.samples, 1)
        return {
            "eps_evals": self.eps / n,
            "eps_backward": self.eps_backward / n,
            "classifier_evals": self.classifier / n,
            "classifier_backward": self.classifier_backward / n,
            "nfe": (self.eps + self.classifier) / n,
            "cpu_s": self.cpu_s / n,
        }
