"""Per-step diagnostics along a sampling trajectory (the paper's Figure 1, EluCD's Fig. 1).

:class:`TrajectoryRecorder` is a sampler callback. At every step it records, over the samples
seen: the classifier's mean confidence in the target softmax(f)_y, the mean of the top 25% of
those confidences, the mean guidance-gradient norm ‖∇S‖, the fraction of samples whose
gradient norm is below a threshold (guidance vanished), the largest tilt weight, and the
classifier's calibration (ECE, accuracy) against the target labels. Batches, processes and
runs merge by summing, so the per-step means are exact over the whole run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from fguide.guidance import GuidanceResult
from fguide.metrics.calibration import TrajectoryCalibration
from fguide.samplers import StepRecord

_SUMS = ("n", "conf_sum", "grad_sum", "grad_n", "vanished", "max_weight")


class TrajectoryRecorder:
    """Sampler callback accumulating per-step confidence, gradient norm and calibration.

    Confidence and calibration come from the guidance's own logits (the classifier on its
    guidance input). When ``classifier`` and ``labels`` are given they come instead from that
    classifier on the step's x0 estimate, at every step: unguided runs then have curves too,
    and every method is measured by the same yardstick. ``vanish_threshold`` defines "guidance
    vanished": ‖∇S_i‖ < threshold.

    Each step's statistics are computed on the logits' device (softmax(f)_y, max_k softmax(f)_k,
    1[argmax f = y], ‖∇S‖, max w) and kept there; :meth:`finalize` reads all pending steps
    back in one transfer. Every reading method finalizes first, so a batch costs one host read
    whatever its number of steps.
    """

    def __init__(
        self,
        labels: Tensor | None = None,
        classifier: Callable[[Tensor], Tensor] | None = None,
        vanish_threshold: float = 1e-3,
        n_bins: int = 10,
    ):
        self.labels = labels
        self.classifier = classifier
        self.vanish_threshold = vanish_threshold
        self.calibration = TrajectoryCalibration(n_bins)
        self.sums: dict[int, dict[str, float]] = {}
        self.confidences: dict[int, list[np.ndarray]] = {}
        self.t: dict[int, float] = {}
        self._pending: list[tuple[int, Tensor, bool, bool]] = []

    def __call__(self, rec: StepRecord) -> None:
        res = rec.guidance
        if self.classifier is not None and self.labels is not None:
            with torch.no_grad():
                logits = self.classifier(rec.x0)
            labels = self.labels
        elif res is not None:
            logits, labels = res.logits, res.labels
        else:
            return
        self._pending.append((rec.step, *_step_stats(logits, labels, rec.t, res)))

    def finalize(self) -> None:
        """Fold the pending steps' device statistics into the host sums (one transfer)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        rows = torch.cat([p[1].flatten() for p in pending]).cpu().numpy()  # the one read
        at = 0
        for step, stats, has_grad, has_weights in pending:
            b = (stats.numel() - 2) // 4
            v = rows[at : at + stats.numel()]
            at += stats.numel()
            conf, conf_max, correct, norm = (
                v[:b],
                v[b : 2 * b],
                v[2 * b : 3 * b] > 0.5,
                v[3 * b : 4 * b],
            )
            t_mean, max_weight = float(v[4 * b]), float(v[4 * b + 1])
            s = self.sums.setdefault(step, dict.fromkeys(_SUMS, 0.0))
            s["n"] += b
            s["conf_sum"] += float(conf.sum())
            self.confidences.setdefault(step, []).append(conf)
            self.t[step] = t_mean
            self.calibration.update_confidences(step, conf_max, correct, float(conf.sum()))
            if has_grad:
                s["grad_sum"] += float(norm.sum())
                s["grad_n"] += b
                s["vanished"] += float((norm < self.vanish_threshold).sum())
                if has_weights:
                    s["max_weight"] = max(s["max_weight"], max_weight)

    @property
    def steps(self) -> list[int]:
        self.finalize()
        return sorted(self.sums)

    def merge(self, other: TrajectoryRecorder) -> None:
        """Add another recorder's observations (another batch, shard or process)."""
        self.finalize()
        other.finalize()
        for k, o in other.sums.items():
            s = self.sums.setdefault(k, dict.fromkeys(_SUMS, 0.0))
            for key in _SUMS:
                s[key] = max(s[key], o[key]) if key == "max_weight" else s[key] + o[key]
            self.confidences.setdefault(k, []).extend(other.confidences[k])
            self.t[k] = other.t[k]
        self.calibration.merge(other.calibration)

    def state(self) -> dict[str, NDArray[Any]]:
        """Compact per-step sums and confidences as arrays (one row per step), for saving.

        Memory is one float per sample and step (the confidences that top-25% needs), never
        the logits.
        """
        steps = self.steps
        if not steps:
            return {"steps": np.zeros(0, dtype=np.int64)}
        cal = {f"cal_{k}": v for k, v in self.calibration.state().items() if k != "steps"}
        return {
            "steps": np.asarray(steps, dtype=np.int64),
            "t": np.asarray([self.t[k] for k in steps], dtype=np.float64),
            "sums": np.asarray([[self.sums[k][n] for n in _SUMS] for k in steps]),
            "target_conf": np.stack([np.concatenate(self.confidences[k]) for k in steps]),
            **cal,
        }

    @classmethod
    def from_state(
        cls, state: dict[str, NDArray[Any]], vanish_threshold: float = 1e-3
    ) -> TrajectoryRecorder:
        """Inverse of :meth:`state`."""
        rec = cls(vanish_threshold=vanish_threshold)
        if len(state["steps"]) == 0:
            return rec
        for j, k in enumerate(state["steps"].tolist()):
            rec.sums[k] = dict(zip(_SUMS, (float(v) for v in state["sums"][j]), strict=True))
            rec.confidences[k] = [state["target_conf"][j]]
            rec.t[k] = float(state["t"][j])
        cal = {k[len("cal_") :]: v for k, v in state.items() if k.startswith("cal_")}
        rec.calibration = TrajectoryCalibration.from_state({"steps": state["steps"], **cal})
        return rec

    def curves(self) -> dict[str, list[float | None]]:
        """Per-step curves, one value per recorded step (None where undefined)."""
        out: dict[str, list[float | None]] = {
            "step": [],
            "t": [],
            "confidence_mean": [],
            "confidence_top25": [],
            "grad_norm": [],
            "vanished_fraction": [],
            "max_tilt_weight": [],
            "ece": [],
            "accuracy": [],
        }
        for k in self.steps:
            s = self.sums[k]
            conf = np.sort(np.concatenate(self.confidences[k]))[::-1]
            top = conf[: max(1, math.ceil(len(conf) / 4))]
            cal = self.calibration.step_stats(k)
            out["step"].append(k)
            out["t"].append(self.t[k])
            out["confidence_mean"].append(s["conf_sum"] / s["n"])
            out["confidence_top25"].append(float(top.mean()))
            out["grad_norm"].append(s["grad_sum"] / s["grad_n"] if s["grad_n"] else None)
            out["vanished_fraction"].append(s["vanished"] / s["grad_n"] if s["grad_n"] else None)
            out["max_tilt_weight"].append(s["max_weight"] if s["max_weight"] > 0 else None)
            out["ece"].append(float(cal["ece"]))
            out["accuracy"].append(float(cal["accuracy"]))
        return out

    def summary(self) -> dict[str, float | None]:
        """Integral ECE, mean vanished fraction, largest tilt weight over the run."""
        self.finalize()
        c = self.curves()
        van = [v for v in c["vanished_fraction"] if v is not None]
        weights = [w for w in c["max_tilt_weight"] if w is not None]
        return {
            "integral_ece": self.calibration.integral_ece if self.sums else None,
            "vanished_mean": float(np.mean(van)) if van else None,
            "max_tilt_weight": max(weights) if weights else None,
            "final_confidence_mean": c["confidence_mean"][-1] if self.sums else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "vanish_threshold": self.vanish_threshold,
            "n_bins": self.calibration.n_bins,
            "summary": self.summary(),
            "curves": self.curves(),
        }

    def save(self, path: str | Path) -> Path:
        from fguide.io.files import atomic_write_json

        return atomic_write_json(path, self.to_dict())


def _step_stats(
    logits: Tensor, labels: Tensor, t: Tensor, res: GuidanceResult | None
) -> tuple[Tensor, bool, bool]:
    """One step's statistics as one device tensor [4B + 2]: softmax(f)_y, max_k softmax(f)_k,
    1[argmax f = y], ‖∇S‖ (0 without guidance), mean t, max w (0 without tilt).

    Softmax in float64 where the device has it (the per-step sums are then those of the host
    implementation to round-off); no host read.
    """
    with torch.no_grad():
        wide = torch.float32 if logits.device.type == "mps" else torch.float64
        logp = torch.log_softmax(logits.detach().to(wide), -1)
        labels = labels.to(logits.device)
        conf = logp.gather(-1, labels[:, None]).squeeze(-1).exp()
        conf_max = logp.max(-1).values.exp()
        correct = (logits.detach().argmax(-1) == labels).to(wide)
        zero = conf.new_zeros(())
        norm = res.grad_norm().to(wide) if res is not None else torch.zeros_like(conf)
        weight = (
            res.weights.detach().max().to(wide)
            if res is not None and res.weights is not None
            else zero
        )
        t_mean = t.detach().to(device=logits.device, dtype=wide).mean()
        stats = torch.cat([conf, conf_max, correct, norm, t_mean[None], weight[None]])
    return stats, res is not None, res is not None and res.weights is not None


# -- statistics beside the classifier's (CLIP score; later reward, guide confidence) ------------


class StepStatistic:
    """A per-step statistic recorded beside the classifier's: a sampler callback keeping, per
    step, sums of :attr:`columns` over the samples seen (the first column counts them).

    A subclass says what it sums (:meth:`step_sums`, on the device) and what it reports: each
    curve of :attr:`curve_columns` is Σ column / Σ n per step, :attr:`summary_of` names a
    summary key holding a curve's last value, :attr:`definition` a text stored beside the
    curves. Like :class:`TrajectoryRecorder`, the sums stay on the device until
    :meth:`finalize` reads them back in one transfer; batches, shards and processes merge by
    summing, and the state is stored under ``{name}_steps`` / ``{name}_sums``, beside the
    trajectory recorder's keys, so that a run folder merges any statistic without knowing it
    (:func:`merge_statistic_states`).
    """

    name: str = "statistic"
    columns: tuple[str, ...] = ("n",)
    curve_columns: tuple[tuple[str, str], ...] = ()
    """(curve name, column), in the order written to ``trajectory.json``."""
    summary_of: tuple[str, str] | None = None
    """(summary key, curve): the summary holds the curve's last value."""
    definition: tuple[str, str] | None = None
    """(curve, text): what the curve means, stored in ``trajectory.json`` as
    ``<curve>_definition``; ``fguide calibration`` draws each defined curve."""

    def __init__(self) -> None:
        self.sums: dict[int, dict[str, float]] = {}
        self._pending: list[tuple[int, int, Tensor]] = []  # (step, n, column sums) on device

    def step_sums(self, rec: StepRecord) -> tuple[int, Tensor] | None:
        """(number of samples, [sum of each column after the first]) of one step, or None to
        skip it."""
        raise NotImplementedError

    def __call__(self, rec: StepRecord) -> None:
        row = self.step_sums(rec)
        if row is not None:
            self._pending.append((rec.step, row[0], row[1]))

    def finalize(self) -> None:
        """Fold the pending steps' device sums into the host sums (one transfer)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = torch.stack([p[2] for p in pending]).cpu().tolist()  # the one read
        for (step, n, _), row in zip(pending, values, strict=True):
            s = self.sums.setdefault(step, dict.fromkeys(self.columns, 0.0))
            s[self.columns[0]] += n
            for key, v in zip(self.columns[1:], row, strict=True):
                s[key] += v

    @property
    def steps(self) -> list[int]:
        self.finalize()
        return sorted(self.sums)

    def merge(self, other: StepStatistic) -> None:
        """Add another recorder's observations (another batch, shard or process)."""
        self.finalize()
        other.finalize()
        for k, o in other.sums.items():
            s = self.sums.setdefault(k, dict.fromkeys(self.columns, 0.0))
            for key in self.columns:
                s[key] += o[key]

    def state(self) -> dict[str, NDArray[Any]]:
        """Per-step sums as arrays under ``{name}_``-prefixed keys, so that they can be stored
        in the same dict (npz) as :meth:`TrajectoryRecorder.state` without a clash."""
        steps = self.steps
        return {
            f"{self.name}_steps": np.asarray(steps, dtype=np.int64),
            f"{self.name}_sums": np.asarray(
                [[self.sums[k][n] for n in self.columns] for k in steps], dtype=np.float64
            ).reshape(len(steps), len(self.columns)),
        }

    def _restore(self, state: dict[str, NDArray[Any]]) -> StepStatistic:
        """Fill from :meth:`state` (other keys are ignored; no ``{name}_steps``: empty)."""
        if f"{self.name}_steps" not in state:
            return self
        sums = state[f"{self.name}_sums"]
        if len(self.columns) == 1:  # a statistic read back generically: its width from the file
            self.columns = ("n", *(f"col{j}" for j in range(1, sums.shape[1])))
        for j, k in enumerate(state[f"{self.name}_steps"].tolist()):
            self.sums[k] = dict(zip(self.columns, (float(v) for v in sums[j]), strict=True))
        return self

    @classmethod
    def from_state(cls, state: dict[str, NDArray[Any]]) -> StepStatistic:
        """Inverse of :meth:`state` (a subclass whose constructor takes arguments overrides it)."""
        return cls()._restore(state)

    @classmethod
    def restored(cls, state: dict[str, NDArray[Any]], name: str) -> StepStatistic:
        """The statistic ``name`` of ``state`` as plain sums (merging needs no subclass)."""
        rec = StepStatistic()
        rec.name = name
        return rec._restore(state)

    def curves(self) -> dict[str, list[float]]:
        """``step`` and each curve, one value per recorded step."""
        steps = self.steps
        out = {"step": [float(k) for k in steps]}
        for curve, column in self.curve_columns:
            out[curve] = [self.sums[k][column] / self.sums[k][self.columns[0]] for k in steps]
        return out

    def add_to(self, trajectory: dict[str, Any]) -> dict[str, Any]:
        """Add the curves to a :meth:`TrajectoryRecorder.to_dict` result, in place: each curve
        aligned with ``curves["step"]`` (None at a step without a value), the summary value
        and the definition."""
        curves = trajectory.setdefault("curves", {})
        steps = curves.get("step") or self.steps
        curves.setdefault("step", list(steps))
        mine = self.curves()
        at = {int(k): i for i, k in enumerate(mine["step"])}
        for key, _ in self.curve_columns:
            curves[key] = [mine[key][at[int(k)]] if int(k) in at else None for k in steps]
        if self.summary_of is not None:
            key, curve = self.summary_of
            trajectory.setdefault("summary", {})[key] = mine[curve][-1] if self.sums else None
        if self.definition is not None:
            trajectory[f"{self.definition[0]}_definition"] = self.definition[1]
        return trajectory


def statistic_names(state: dict[str, NDArray[Any]]) -> list[str]:
    """The names of the :class:`StepStatistic` states stored in ``state`` (its ``*_steps``)."""
    return [k[: -len("_steps")] for k in state if k.endswith("_steps") and k != "steps"]


def merge_statistic_states(states: list[dict[str, NDArray[Any]]]) -> dict[str, NDArray[Any]]:
    """Every :class:`StepStatistic` found in ``states``, merged in the given order (so equal
    inputs give equal floats), as one state."""
    merged: dict[str, StepStatistic] = {}
    for s in states:
        for name in statistic_names(s):
            rec = StepStatistic.restored(s, name)
            if name in merged:
                merged[name].merge(rec)
            else:
                merged[name] = rec
    return {k: v for rec in merged.values() for k, v in rec.state().items()}


@dataclass
class TrajectoryCurves:
    """One run's per-step curves (None where a value is undefined, e.g. unguided steps)."""

    label: str
    source: Path
    curves: dict[str, list[float | None]]
    summary: dict[str, Any] = field(default_factory=dict)
    definitions: dict[str, str] = field(default_factory=dict)
    """The run's extra per-step statistics (e.g. ``clip_score``): curve → what it means."""

    @property
    def steps(self) -> list[float]:
        return [float(s) for s in self.curves["step"] if s is not None]


def load_trajectory(path: str | Path) -> dict[str, Any]:
    """Read a trajectory JSON written by :meth:`TrajectoryRecorder.save`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory diagnostics not found: {path}")
    expected = "the trajectory.json a sampling run writes (or the run's folder)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not JSON text ({err}); expected {expected}") from None
    if not isinstance(data, dict) or "curves" not in data:
        raise ValueError(
            f"{path}: not a trajectory diagnostics file (no 'curves'); expected {expected}"
        )
    return data
