"""The one defaults table: the API, the sampling configuration and the CLI agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch import nn

from fguide import defaults, objective
from fguide.cli.main import build_parser
from fguide.guides import load_classifier
from fguide.sampling import SampleConfig, resolve_config


def _resolved(**kw: object) -> SampleConfig:
    return resolve_config(SampleConfig(out=Path("o"), model=Path("m"), classifier="resnet18", **kw))


@pytest.mark.parametrize("tau1", [1.0, 2.0, 0.3])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun"])
@pytest.mark.parametrize("method", ["base", "logsoftmax", "js", "entropy"])
def test_tau2_default_is_one_per_sampler_in_api_and_config(
    tau1: float, sampler: str, method: str
) -> None:
    expected = tau1 if method == "logsoftmax" else 0.0 if sampler == "heun" else 0.5 * tau1
    assert objective(method, tau1=tau1, sampler=sampler).tau2 == expected
    steps = "10" if sampler == "heun" else "250"
    assert _resolved(method=method, tau1=tau1, sampler=sampler, steps=steps).tau2 == expected


@pytest.mark.parametrize("method", ["rkl", "fkl", "js", "hellinger"])
def test_divergence_defaults_agree(method: str) -> None:
    obj = objective(method)
    assert obj.divergence is not None
    cfg = _resolved(method=method)
    assert obj.divergence.alpha == cfg.alpha == (0.1 if method == "rkl" else 0.09)
    assert obj.divergence.eps == cfg.eps == 0.1


def test_heun_scale_follows_eluCD_per_step_count() -> None:
    assert [defaults.heun_scale(n) for n in (10, 18, 36, 250)] == [0.004, 0.004, 0.0018, 0.001]
    assert _resolved(sampler="heun", steps="36").scale == 0.0018


def _activations(net: nn.Module) -> set[object]:
    out: set[object] = set()
    for m in net.modules():
        if isinstance(m, nn.Softplus):
            out.add(m.beta)
        elif isinstance(m, nn.ReLU):
            out.add("relu")
    return out


@pytest.mark.parametrize(("sampler", "beta"), [("ddpm", 3.0), ("ddim", 3.0), ("heun", 5.0)])
def test_softplus_default_of_resnet_guides(sampler: str, beta: float) -> None:
    # The loader every command uses: sample, calibration and finetune get the same β.
    clf = load_classifier("resnet18", image_size=32, sampler=sampler, require_weights=False)
    assert _activations(clf.module) == {beta}
    assert _resolved(sampler=sampler, steps="10").softplus_beta == beta


@pytest.mark.parametrize("spelling", ["relu", "ReLU", "0", 0])
def test_relu_is_spelled_one_way(spelling: object) -> None:
    assert defaults.parse_softplus_beta(spelling) == defaults.RELU
    clf = load_classifier(
        "resnet18",
        image_size=32,
        softplus_beta=defaults.parse_softplus_beta(spelling),
        require_weights=False,
    )
    assert _activations(clf.module) == {"relu"}


def test_bad_softplus_beta_names_the_parameter() -> None:
    for bad in ("-1", "soft", float("nan")):
        with pytest.raises(ValueError, match="softplus_beta"):
            defaults.parse_softplus_beta(bad)


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return " ".join(sub.choices[command].format_help().split())  # type: ignore[union-attr]


def test_sample_help_lists_the_table_defaults() -> None:
    text = _help("sample")
    for fragment in (
        f"τ1 (default {defaults.TAU1:g})",
        f"(default {defaults.TAU2_RATIO:g} τ1",
        f"rkl {defaults.ALPHA['rkl']:g}, others {defaults.ALPHA['js']:g}",
        f"ε (default {defaults.EPS:g})",
        f"γ_sine (default {defaults.SINE_FACTOR:g}",
        f"(default {defaults.softplus_beta('ddpm'):g}; Heun {defaults.softplus_beta('heun'):g}",
    ):
        assert fragment in text, fragment


def test_same_flag_names_in_every_command() -> None:
    for command in ("sample", "calibration", "finetune"):
        text = _help(command)
        assert "--classifier-weights" in text, command
        assert re.search(r"--softplus-beta", text), command
    for command in ("calibration", "finetune"):
        assert "--bins" in _help(command), command


def test_objective_dataclass_tau2_follows_tau1() -> None:
    from fguide import Objective

    assert Objective(tau1=2.0).tau2 == 1.0 and Objective().tau2 == 0.5
    assert Objective(tau1=2.0, tau2=0.0).tau2 == 0.0
