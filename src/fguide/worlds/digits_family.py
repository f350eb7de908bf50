"""The training-free family in the digits world (issue 21): its rows, their cost, the plot.

Each family method (:data:`FAMILY`) is a row of the digits table that guides with the
off-the-shelf classifier on x̂0 and the ``logsoftmax`` objective (TFG's log p(y | x̂0)), so
that it and the ``logsoftmax`` row (EluCD's mean shift with the same score) differ only in
the update rule. Its strength is chosen once by its own sweep over
:attr:`~fguide.worlds.digits.DigitsConfig.family_scale_grid` on the validation seed (the
strengths' units differ by orders of magnitude between methods), then it runs on the
evaluation seeds like every row.

Cost columns, for every row: CPU seconds per sample (the CPU time of the row's evaluation
runs, in the processes that ran them, over their samples: run set-up and file writes
included, the same for every row) and network evaluations per sample, counted by
:func:`count_evaluations` on a small batch of the row's own configuration: forward rows of the
ε-network and of the classifier, and the rows a backward pass went through.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor

from fguide.config import SampleConfig
from fguide.worlds.digits import FAMILY_METHODS

__all__ = [
    "FAMILY",
    "add_costs",
    "count_evaluations",
    "family_kwargs",
    "plot_quality_vs_cost",
    "sweep_point",
]

FAMILY = FAMILY_METHODS
"""The training-free methods as table rows (their default hyper-parameters: TFG's)."""


def family_kwargs(method: str) -> dict[str, Any]:
    """``SampleConfig`` fields of a family row: the method on the ``logsoftmax`` objective."""
    return {"method": "logsoftmax", "guidance_method": method}


_COUNTS = ("eps_forward", "eps_backward", "classifier_forward", "classifier_backward")
T = TypeVar("T")


class _Counted:
    """Counts the rows of every forward call of ``fn`` and of the backward passes through its
    output (a hook on the output's gradient)."""

    def __init__(self, fn: Callable[..., Tensor], counts: dict[str, float], name: str) -> None:
        self.fn, self.counts, self.name = fn, counts, name

    def _add(self, key: str, rows: int) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + rows

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = self.fn(x, *args, **kwargs)
        self._add(f"{self.name}_forward", x.shape[0])
        if out.requires_grad:
            out.register_hook(lambda g: self._add(f"{self.name}_backward", g.shape[0]))
        return out

    def __getattr__(self, name: str) -> Any:  # the wrapped network's attributes (its dtype)
        return getattr(self.fn, name)


def count_evaluations(config: SampleConfig, samples: int = 2) -> dict[str, float]:
    """Network evaluations per sample of ``config`` (``fguide sample``'s build and sampler on
    ``samples`` samples): ε-network and classifier forward rows, and backward rows."""
    from fguide.families import build_components
    from fguide.sampling import resolve_config, sample_batch, sample_labels

    c = resolve_config(dataclasses.replace(config, num_samples=samples))
    comp = build_components(c, "cpu")
    counts: dict[str, float] = {}
    assert comp.model is not None
    comp.model = _Counted(comp.model, counts, "eps")
    if comp.guide is not None:
        clf = _Counted(comp.guide.classifier, counts, "classifier")
        comp.guide = dataclasses.replace(comp.guide, classifier=clf)
    labels = sample_labels(comp.label_mode, c.seed, range(samples), comp.num_classes)
    sample_batch(comp, c, range(samples), labels)
    return {k: counts.get(k, 0.0) / samples for k in _COUNTS}


def sweep_point(fn: Callable[..., T], *args: Any) -> T | None:
    """``fn(*args)``, or None where the strength makes the samples diverge (a non-finite
    state: that grid point scores NaN in the sweep, rather than ending the world)."""
    from fguide.samplers import NonFiniteGuidanceError

    try:
        return fn(*args)
    except NonFiniteGuidanceError:
        return None


def plot_quality_vs_cost(methods: Mapping[str, Any], path: Path) -> None:
    """Class FD (log) against CPU seconds per sample and against network evaluations per
    sample, one marker per row; the unguided row as a horizontal reference."""
    from fguide.plots import _figure, save_figure

    fig = _figure(11, 4.2)
    panels = (
        ("cpu_seconds_per_sample", "CPU seconds per sample"),
        ("passes_per_sample", "network passes per sample (ε-net + classifier, fwd + bwd)"),
    )
    for j, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, j + 1)
        for name, r in methods.items():
            cost = r.get("cost") or {}
            y, x = r["mean"].get("fd_class"), cost.get(key)
            if key == "passes_per_sample" and cost:
                x = sum(cost[k] for k in _COUNTS)
            if y is None or x is None:
                continue
            if r["method"] == "none":
                ax.axhline(y, color="grey", ls="--", lw=1, label="none (unguided)")
                continue
            family = r.get("guidance_method", "elucd") != "elucd"
            ax.scatter(
                [x], [y], marker="s" if family else "o", color="tab:red" if family else "tab:blue"
            )
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("class FD (lower is better)")
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("quality against cost (squares: training-free family; circles: EluCD mean shift)")
    fig.tight_layout()
    save_figure(fig, path)


def add_costs(
    table: dict[str, Any],
    row_cpu: Mapping[str, float],
    runs: Mapping[str, tuple[str, Path | None]],
    config_of: Callable[[str, float, Path | None], SampleConfig],
    samples: int,
) -> None:
    """Each row's ``cost`` (in place): CPU seconds per sample of its evaluation runs (``row_cpu``
    over ``samples``), and its network evaluations per sample counted on 2 samples of its own
    configuration (``config_of(method, scale, weights)``; in this process); and its
    ``guidance_method``."""
    for row, (method, weights) in runs.items():
        counts = count_evaluations(config_of(method, table[row]["scale"], weights))
        table[row]["cost"] = {
            "cpu_seconds_per_sample": row_cpu.get(row, float("nan")) / samples,
            "nfe_per_sample": counts["eps_forward"] + counts["classifier_forward"],
            **counts,
        }
        table[row]["guidance_method"] = method if method in FAMILY else "elucd"
