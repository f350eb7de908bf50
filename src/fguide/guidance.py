"""The guidance gradient: closed-form coefficients, then ONE vector-Jacobian product.

g = ∇_x S = Jᵀ c with c = ∂S/∂f from :class:`fguide.objectives.Objective` and J = ∂f/∂x the
classifier's Jacobian at its input x (the x0 estimate for EluCD-style off-the-shelf
classifiers, x_t for ADM's noise-aware classifier). Whatever the method, this is one forward
with gradient and one backward: the regularisers cost a softmax, not a second backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from fguide.objectives import Objective, check_labels

ClassifierFn = Callable[..., Tensor]


@dataclass
class GuidanceResult:
    """One evaluation of the guidance: the (unscaled) gradient and what produced it."""

    grad: Tensor
    """g = ∇_x S (per sample, same shape as the classifier input; tilt weights included)."""
    logits: Tensor
    """f(x), detached."""
    labels: Tensor
    weights: Tensor | None = None
    """Tilt weights w_i (mean one per group), or None."""

    def confidence(self) -> Tensor:
        """softmax(f)_y: the classifier's probability of the target class."""
        return torch.softmax(self.logits.float(), -1).gather(-1, self.labels[:, None]).squeeze(-1)

    def grad_norm(self) -> Tensor:
        """‖g_i‖₂ per sample."""
        return self.grad.flatten(1).float().norm(dim=1)


def coefficient_vjp(out: Tensor, x_in: Tensor, coeff: Tensor) -> Tensor:
    """Jᵀc, the gradient of Σ c·out with respect to ``x_in``: a scalar's backward, which equals
    ``autograd.grad(out, x_in, grad_outputs=c)`` bit for bit (∂/∂out of Σ c·out is 1·c = c)
    without the ``grad_outputs`` check that imports sympy (~0.25 s, ~36 MiB at start-up)."""
    (grad,) = torch.autograd.grad((out * coeff.to(out.dtype)).sum(), x_in)
    return grad


def classifier_dtype(classifier: object) -> torch.dtype | None:
    """The one floating dtype of a module's parameters and buffers (a wrapper's ``.model`` or
    ``.module`` counts), or None: not a module, no floating tensors, or several dtypes (a
    network that casts its own input, such as ADM's fp16 torso)."""
    for obj in (
        classifier,
        getattr(classifier, "model", None),
        getattr(classifier, "module", None),
    ):
        if isinstance(obj, nn.Module):
            tensors = (*obj.parameters(), *obj.buffers())
            dtypes = {t.dtype for t in tensors if t.is_floating_point()}
            return dtypes.pop() if len(dtypes) == 1 else None
    return None


def evaluate_guidance(
    classifier: ClassifierFn,
    x: Tensor,
    labels: Tensor,
    objective: Objective,
    progress: float = 0.0,
    timesteps: Tensor | None = None,
    *,
    check: bool | Literal["labels"] = True,
) -> GuidanceResult:
    """Logits f(x), coefficients c = ∂S/∂f (no grad), then g = Jᵀc by one backward pass.

    ``timesteps`` is passed as the classifier's second argument (noise-aware classifiers).
    ``x`` is cast to the classifier's dtype (:func:`classifier_dtype`) and the gradient comes
    back in ``x``'s: a float64 sampler state can be guided by a float32 classifier.
    ``check`` validates labels and logits (clear errors for out-of-range labels and
    non-finite logits; this reads values back from the device); ``"labels"`` checks only the
    shapes and the label range (the samplers check the gradient for non-finite values on the
    device); ``False`` checks nothing.
    """
    dtype = classifier_dtype(classifier) or x.dtype
    with torch.enable_grad():
        x_in = x.detach().to(dtype).requires_grad_(True)
        logits = classifier(x_in) if timesteps is None else classifier(x_in, timesteps)
        if check == "labels":
            check_labels(logits.detach(), labels)
        elif check:
            objective.check_inputs(logits.detach(), labels)
        with torch.no_grad():
            coeff, weights = objective.coefficients_and_weights(logits.detach(), labels, progress)
        grad = coefficient_vjp(logits, x_in, coeff).to(x.dtype)
    return GuidanceResult(grad=grad, logits=logits.detach(), labels=labels, weights=weights)


def guidance_gradient(
    classifier: ClassifierFn,
    x0: Tensor,
    labels: Tensor,
    objective: Objective,
    progress: float = 0.0,
    timesteps: Tensor | None = None,
) -> Tensor:
    """g = ∇_{x0} S(f(x0), y): the guidance gradient of ``objective`` for ``classifier``.

    >>> import fguide, torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    >>> g = fguide.guidance_gradient(net, torch.randn(2, 3, 2, 2), torch.tensor([0, 4]),
    ...                              fguide.objective("js", alpha=0.09, eps=0.1))
    >>> g.shape
    torch.Size([2, 3, 2, 2])
    """
    return evaluate_guidance(classifier, x0, labels, objective, progress, timesteps).grad


class Guide(Protocol):
    """What a sampler calls once per step: returns the unscaled guidance and exposes its scale.

    ``x_t`` is the current state, ``x0`` the (detached) estimate of the clean sample, ``t`` the
    timestep the networks receive (or σ for EDM), ``progress`` u ∈ [0, 1] over the run.
    """

    scale: float

    def __call__(
        self, x_t: Tensor, x0: Tensor, t: Tensor, labels: Tensor, progress: float
    ) -> GuidanceResult: ...


class LabelsCheck:
    """The ``check`` a guide passes to :func:`evaluate_guidance`: ``"labels"`` on the first call
    with a given labels tensor (once per batch: the samplers pass the same tensor every step),
    nothing afterwards, so that later steps read nothing back from the device; non-finite
    gradients are caught by the samplers' device-side check."""

    def __init__(self) -> None:
        self._passed: Tensor | None = None

    def mode(self, labels: Tensor) -> Literal["labels"] | bool:
        return False if labels is self._passed else "labels"

    def passed(self, labels: Tensor) -> None:
        """Record that ``labels`` passed the check (a failed check is repeated next call)."""
        self._passed = labels


@dataclass
class ClassifierGuide:
    """Guidance by a classifier and an objective, with classifier scale γ.

    ``input="x0"``: the classifier sees the x0 estimate (EluCD, off-the-shelf classifiers);
    ``input="xt"``: it sees x_t and, when ``time_aware``, the timestep (ADM's noise-aware
    classifier, classic classifier guidance).
    """

    classifier: ClassifierFn
    objective: Objective
    scale: float = 1.0
    input: Literal["x0", "xt"] = "x0"
    time_aware: bool = False
    _labels: LabelsCheck = field(default_factory=lambda: LabelsCheck(), init=False, repr=False)

    def __call__(
        self, x_t: Tensor, x0: Tensor, t: Tensor, labels: Tensor, progress: float
    ) -> GuidanceResult:
        x = x0 if self.input == "x0" else x_t
        res = evaluate_guidance(
            self.classifier,
            x,
            labels,
            self.objective,
            progress,
            timesteps=t if self.time_aware else None,
            check=self._labels.mode(labels),
        )
        self._labels.passed(labels)
        return res
