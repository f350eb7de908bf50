"""The guides: the one classifier loader (every kind of guide, one probe, the weights' hash,
clear errors), and the guide-kind registry's contract, checked for every kind in
``GUIDE_KINDS``.

Each kind has a tiny spec here (a new kind adds one, or the contract fails): the spec is claimed
first by its kind (the order of ``GUIDE_KINDS`` decides); it loads through the one loader as
that kind, probed and hashed; its recorders are its declared statistics; a configuration guided
by it refuses every field another kind owns (naming it) and drops another kind's dropped fields;
the loader refuses the options only another kind takes; an unknown spec is refused naming every
kind's form.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fguide.guides import (
    GUIDE_KINDS,
    find_guide_kind,
    is_adm_classifier,
    load_classifier,
    state_dict_sha256,
    unknown_guide,
)
from fguide.models.presets import create_classifier
from fguide.models.resnet import resnet
from fguide.params import ParamError
from fguide.sampling import SampleConfig, resolve_config

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


# -- the registry's contract, for every kind -----------------------------------------------

ADM_CLASSIFIER_FLAGS = (
    "image_size=8 classifier_width=32 classifier_depth=1 "
    "classifier_attention_resolutions=4 channel_mult=1,2"
)
NAMES = [kind.name for kind in GUIDE_KINDS]
# A value for each configuration field a kind owns (set for another kind: refused).
OWNED_VALUES: dict[str, Any] = {
    "classifier_input_mode": "imagenet",
    "classifier_resize": 8,
    "classifier_flags": "image_size=8",
    "prompts": ("a cat",),
    "prompt_file": "prompts.txt",
    "target": "a cat",
}
# Load options only one kind takes (given for another kind's spec: refused).
LOAD_OPTIONS: dict[str, list[dict[str, Any]]] = {
    "resnet": [{"softplus_beta": 3.0}, {"input_mode": "imagenet"}, {"resize": 8}],
    "adm": [{"flags": {"image_size": 8}}],
    "clip": [{"prompts": ["a cat"]}, {"prompt_file": "prompts.txt"}],
    "reward": [],
    "import": [],
}


def _resnet(folder: Path) -> tuple[str, Path | None, dict[str, Any]]:
    torch.manual_seed(0)
    torch.save(resnet("resnet18", num_classes=4).state_dict(), folder / "r18.pth")
    return "resnet18", folder / "r18.pth", {}


def _adm(folder: Path) -> tuple[str, Path | None, dict[str, Any]]:
    flags = dict(kv.split("=") for kv in ADM_CLASSIFIER_FLAGS.split())
    torch.manual_seed(0)
    torch.save(create_classifier(**flags).state_dict(), folder / "adm.pt")  # type: ignore[arg-type]
    return "adm", folder / "adm.pt", {"flags": flags}


def _clip(folder: Path) -> tuple[str, Path | None, dict[str, Any]]:
    pytest.importorskip("transformers")
    from test_models_clip import _build_clip_folder

    return f"clip:{_build_clip_folder(folder / 'clip')}", None, {"prompts": ["a cat", "a dog"]}


def _reward(folder: Path) -> tuple[str, Path | None, dict[str, Any]]:
    pytest.importorskip("transformers")
    from sd_folders import build_clip_folder

    clip = build_clip_folder(folder / "clip", projection=16)
    torch.manual_seed(0)
    torch.save({"weight": torch.randn(1, 16), "bias": torch.zeros(1)}, folder / "head.pth")
    return f"reward:{clip}:{folder / 'head.pth'}", None, {}


def _import(folder: Path) -> tuple[str, Path | None, dict[str, Any]]:
    return "test_sampling_run:tiny_classifier", None, {}


TINY = {"resnet": _resnet, "adm": _adm, "clip": _clip, "reward": _reward, "import": _import}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path | None, dict]]:
    """Every registered kind's tiny spec, weight file and load options."""
    missing = [name for name in NAMES if name not in TINY]
    assert not missing, f"guide kinds without a tiny spec in this test: {missing}"
    return {name: TINY[name](tmp_path_factory.mktemp(name)) for name in NAMES}


def test_each_spec_is_claimed_first_by_its_kind(tiny: dict[str, tuple]) -> None:
    for kind in GUIDE_KINDS:
        spec = tiny[kind.name][0]
        assert find_guide_kind(spec) is kind
        claimants = [k.name for k in GUIDE_KINDS if k.claims(spec)]
        assert claimants[0] == kind.name  # a later kind may claim it too (import: any ':')


@pytest.mark.parametrize("name", NAMES)
def test_loads_as_its_kind_with_its_statistics(name: str, tiny: dict[str, tuple]) -> None:
    spec, weights, options = tiny[name]
    kind = find_guide_kind(spec)
    assert kind is not None
    loaded = load_classifier(spec, weights, image_size=8, **options)
    assert loaded.kind == loaded.description["kind"] == name
    logits = loaded(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    assert logits.shape == (2, loaded.num_classes)
    assert len(loaded.description["state_dict_sha256"]) == 64
    recorders = kind.recorders(loaded, torch.zeros(2, dtype=torch.long))
    assert [type(r) for r in recorders] == list(kind.statistics)


@pytest.mark.parametrize("field", sorted(OWNED_VALUES))
def test_a_field_one_kind_owns_is_refused_for_the_others(
    field: str, tiny: dict[str, tuple], tmp_path: Path
) -> None:
    owners = [k.name for k in GUIDE_KINDS if k.fields is not None and field in k.fields.names]
    assert len(owners) == 1, (field, owners)
    for name in NAMES:
        if name in owners:
            continue
        config = SampleConfig(
            out=tmp_path / "run", model=tmp_path / "m.pt", classifier=tiny[name][0]
        )
        setattr(config, field, OWNED_VALUES[field])
        with pytest.raises(ParamError) as err:
            resolve_config(config)
        assert field in err.value.params, (name, str(err.value))


def test_every_owned_field_is_in_this_test() -> None:
    owned = {n for k in GUIDE_KINDS if k.fields is not None for n in k.fields.names}
    assert owned == set(OWNED_VALUES)


def test_every_dropped_field_is_in_this_test() -> None:
    assert {n for k in GUIDE_KINDS for n in k.dropped} == {"softplus_beta"}


@pytest.mark.parametrize("name", NAMES)
def test_fields_another_kind_drops(name: str, tiny: dict[str, tuple], tmp_path: Path) -> None:
    spec = tiny[name][0]
    kind = find_guide_kind(spec)
    for other in GUIDE_KINDS:
        for field in other.dropped:
            config = SampleConfig(out=tmp_path / "run", model=tmp_path / "m.pt", classifier=spec)
            setattr(config, field, 3.0)
            value = getattr(resolve_config(config), field)
            assert (value is None) == (other is not kind), (name, field, value)


@pytest.mark.parametrize("name", NAMES)
def test_options_of_other_kinds_are_refused(name: str, tiny: dict[str, tuple]) -> None:
    spec, weights, options = tiny[name]
    assert set(LOAD_OPTIONS) == set(NAMES)
    for other, refused in LOAD_OPTIONS.items():
        if other == name:
            continue
        for option in refused:
            with pytest.raises(ValueError, match=f"(?i){other}|{'|'.join(option)}"):
                load_classifier(spec, weights, image_size=8, **{**options, **option})


def test_an_unknown_spec_names_every_form() -> None:
    message = unknown_guide("nonesuch")
    assert find_guide_kind("nonesuch") is None
    assert all(kind.form in message for kind in GUIDE_KINDS)
    with pytest.raises(ValueError, match="is none of"):
        load_classifier("nonesuch", image_size=8)
