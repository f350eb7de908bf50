"""ClassifierGuide: labels validated once per batch; check modes of evaluate_guidance."""

from __future__ import annotations

import pytest
import torch

import fguide
from fguide.guidance import check_labels, evaluate_guidance


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))


def test_labels_are_validated_with_a_clear_error() -> None:
    logits = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\).*\[0, 5\]"):
        check_labels(logits, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="labels must have shape"):
        check_labels(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        check_labels(logits, torch.tensor([0.0, 1.0, 2.0]))
    check_labels(logits, torch.tensor([0, 4, 2]))


def test_the_guide_checks_labels_on_the_first_call_only(monkeypatch: pytest.MonkeyPatch) -> None:
    guide = fguide.ClassifierGuide(_net(), fguide.objective("base"), 1.0)
    x, labels = torch.randn(3, 3, 2, 2), torch.tensor([0, 1, 4])
    seen: list[object] = []
    original = fguide.guidance.check_labels
    monkeypatch.setattr(
        fguide.guidance, "check_labels", lambda f, y: seen.append(y) or original(f, y)
    )
    for _ in range(3):
        guide(x, x, torch.zeros(3), labels, 0.5)
    assert seen == [labels]
    other = torch.tensor([0, 1, 9])
    with pytest.raises(ValueError, match="labels must lie"):
        guide(x, x, torch.zeros(3), other, 0.5)


def test_check_modes_agree_on_the_gradient() -> None:
    net, x, y = _net(), torch.randn(3, 3, 2, 2), torch.tensor([0, 1, 4])
    obj = fguide.objective("js", alpha=0.09, eps=0.1)
    grads = [evaluate_guidance(net, x, y, obj, 0.3, check=c).grad for c in (True, "labels", False)]
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)
    torch.testing.assert_close(grads[0], grads[2], atol=0, rtol=0)
    bad = torch.nn.Sequential(_net(), torch.nn.Hardtanh(float("nan"), float("nan")))
    with pytest.raises(ValueError, match="not finite"):
        evaluate_guidance(bad, x, y, obj, check=True)
