"""A scalar reward as a guide: ``reward:CLIP_FOLDER:HEAD_FILE``, r(x) = h(unit CLIP image
embedding of x) with h a linear stack read from HEAD_FILE (an aesthetic-score style head;
:mod:`fguide.models.clip_reward`). Its one output is r as a [B, 1] "logit"; the objective is
S = r (:func:`~fguide.models.clip_reward.reward_objective`: ``base`` and ``tilted`` apply, the
others are refused by name). A run guided by it records the mean reward per step
(:class:`RewardRecorder`): the confidence softmax over one output is 1 and says nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from fguide.diagnostics import StepStatistic
from fguide.guides.base import GuideKind, LoadedClassifier, LoadOptions, finish_loading
from fguide.io.files import sha256_file
from fguide.models.clip_reward import REWARD_PREFIX, parse_reward_spec, reward_objective
from fguide.objectives import Objective
from fguide.samplers import StepRecord

__all__ = ["RewardKind", "RewardRecorder"]


class RewardRecorder(StepStatistic):
    """Sampler callback: per step, the mean reward r of the step's x̂0.

    ``from_guidance=True`` reads r off the guidance logits (free: the reward head is the guide);
    otherwise the head runs on x̂0 (through ``view``, a latent model's decoder) without
    gradient. Batches, shards and processes merge by summing.
    """

    name = "reward"
    columns = ("n", "reward_sum")
    curve_columns = (("reward", "reward_sum"),)
    summary_of = ("final_reward", "reward")
    definition = ("reward", "mean over samples of the reward head's r(x0) (its one output)")

    def __init__(
        self,
        head: nn.Module | None = None,
        *,
        from_guidance: bool = False,
        view: Callable[[Tensor], Tensor] | None = None,
    ):
        super().__init__()
        self.head, self.from_guidance, self.view = head, from_guidance, view

    def step_sums(self, rec: StepRecord) -> tuple[int, Tensor] | None:
        """(n, [Σ r]) of the step's samples, on the device."""
        if self.from_guidance:
            if rec.guidance is None:
                return None
            r = rec.guidance.logits[:, 0].double()
        else:
            assert self.head is not None
            with torch.no_grad():
                x0 = rec.x0 if self.view is None else self.view(rec.x0)
                r = self.head(x0)[:, 0].double()
        return len(r), r.sum()[None]

    @classmethod
    def from_state(cls, state: dict[str, NDArray[Any]]) -> RewardRecorder:
        """Inverse of :meth:`state` (other keys are ignored; no ``reward_steps``: empty)."""
        rec = cls()
        rec._restore(state)
        return rec


class RewardKind(GuideKind):
    """A scalar reward head on CLIP image embeddings (one output; labels all 0)."""

    name = "reward"
    form = "'reward:CLIP_FOLDER:HEAD_FILE'"
    statistics = (RewardRecorder,)

    def claims(self, spec: str) -> bool:
        return spec.startswith(REWARD_PREFIX)

    def objective(self, objective: Objective) -> Objective:
        """S = r: ``base`` and ``tilted`` apply; any other method is a ValueError naming it."""
        return reward_objective(objective)

    def load(self, spec: str, path: Path | None, options: LoadOptions) -> LoadedClassifier:
        from fguide.models.clip_reward import load_reward_head

        if path is not None:
            raise ValueError(
                "classifier_weights: a reward guide reads its weights from its CLIP folder "
                "and head file (reward:CLIP_FOLDER:HEAD_FILE)"
            )
        folder, head_file = parse_reward_spec(spec)
        if not head_file.is_file():
            raise FileNotFoundError(f"--guide {spec!r}: reward head file not found: {head_file}")
        head = load_reward_head(folder, head_file, device=options.device)
        desc = {"spec": spec, "head_file": str(head_file), "head_sha256": sha256_file(head_file)}
        return finish_loading(head, spec, self.name, False, path, options, desc)

    def recorders(
        self,
        loaded: LoadedClassifier,
        labels: Tensor,
        *,
        guided: bool = False,
        view: Callable[[Tensor], Tensor] | None = None,
    ) -> list[StepStatistic]:
        return [RewardRecorder(loaded.module, from_guidance=guided, view=view)]
