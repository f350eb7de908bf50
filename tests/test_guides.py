"""The one classifier loader: every kind of guide, one probe, the weights' hash, clear errors."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from fguide.guides import is_adm_classifier, load_classifier, state_dict_sha256
from fguide.models.presets import create_classifier
from fguide.models.resnet import resnet

ADM_FLAGS = dict(
    image_size=16,
    classifier_width=32,
    classifier_depth=1,
    classifier_attention_resolutions="8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
    channel_mult="1,2",
)


@pytest.fixture
def spec_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    mod = types.ModuleType("fguide_test_specs")

    def linear(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 7))

    class TimeAware(nn.Module):
        time_aware = True

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.lin(x.mean((2, 3))) * (1 + t.float()[:, None])

    mod.linear = linear  # type: ignore[attr-defined]
    mod.linear_other = lambda: linear(1)  # type: ignore[attr-defined]
    mod.time_aware = TimeAware  # type: ignore[attr-defined]
    mod.not_a_module = lambda: 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fguide_test_specs", mod)
    return mod


def test_import_spec_probe_and_hash(spec_module: types.ModuleType) -> None:
    a = load_classifier("fguide_test_specs:linear", image_size=16)
    assert (a.kind, a.time_aware, a.num_classes) == ("import", False, 7)
    b = load_classifier("fguide_test_specs:linear_other", image_size=16)
    # The hash identifies the weights in use, not the spec's name.
    assert a.description["state_dict_sha256"] != b.description["state_dict_sha256"]
    again = load_classifier("fguide_test_specs:linear", image_size=16)
    assert again.description["state_dict_sha256"] == a.description["state_dict_sha256"]
    t = load_classifier("fguide_test_specs:time_aware", image_size=16)
    assert t.time_aware and t.num_classes == 4
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(t(x, torch.tensor([0, 3])), t.module(x, torch.tensor([0, 3])))


def test_state_dict_hash_sees_one_changed_value() -> None:
    net = nn.Linear(3, 2)
    before = state_dict_sha256(net)
    with torch.no_grad():
        net.bias[1] += 1e-7
    assert state_dict_sha256(net) != before


def test_resnet_from_file_and_adm_preset(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(resnet("resnet18", num_classes=5).state_dict(), path)
    clf = load_classifier("resnet18", path, image_size=32)
    assert (clf.kind, clf.num_classes, clf.time_aware) == ("resnet", 5, False)
    assert clf.description["weights"] == str(path)
    exported = clf.state_dict_to_save()
    assert set(exported) == set(torch.load(path, weights_only=True))

    adm_path = tmp_path / "adm.pt"
    torch.manual_seed(0)
    torch.save(create_classifier(**ADM_FLAGS).state_dict(), adm_path)  # type: ignore[arg-type]
    adm = load_classifier("adm", adm_path, image_size=16, flags=ADM_FLAGS)
    assert (adm.kind, adm.time_aware, adm.num_classes, adm.image_size) == ("adm", True, 1000, 16)
    assert is_adm_classifier("128x128_classifier") and not is_adm_classifier("resnet50")


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("resnet19", {}, "is none of resnet18"),
        ("resnet18", {}, "needs --classifier-weights"),
        ("fguide_test_specs:not_a_module", {}, "must be or return a torch.nn.Module"),
        ("fguide_test_specs:linear", {"image_size": 8}, "fails on a [1, 3, 8, 8] image batch"),
        ("fguide_test_specs:linear", {"softplus_beta": 3.0}, "apply to ResNet classifiers only"),
        ("fguide_test_specs:linear", {"flags": {"image_size": 16}}, "ADM classifiers only"),
        ("adm", {"flags": ADM_FLAGS, "image_size": 32, "require_weights": False}, "takes 16x16"),
    ],
)
def test_errors_name_the_problem(
    spec_module: types.ModuleType, spec: str, kwargs: dict[str, object], message: str
) -> None:
    kw: dict[str, object] = {"image_size": 16, **kwargs}
    with pytest.raises(ValueError) as err:
        load_classifier(spec, **kw)  # type: ignore[arg-type]
    assert message in str(err.value)


def test_missing_weight_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="classifier_weights: file not found"):
        load_classifier("resnet18", tmp_path / "nope.pth", image_size=32)
