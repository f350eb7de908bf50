"""``fguide demo``'s flags: each one applies to the chosen world or is refused in one line, before
anything is computed; explicit values win over ``--quick``/``--full``; ``--help`` states every
default."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import pytest

import fguide.worlds.digits_run as digits_run
from fguide.cli import demo as demo_cli
from fguide.cli.main import build_parser, main
from fguide.worlds.demo import DemoConfig
from fguide.worlds.digits import DigitsConfig
from fguide.worlds.workers import default_workers


class Computed(Exception):
    """Raised by the stand-ins of the computing entry points, with the configuration given."""

    def __init__(self, config: Any, out: Path | None = None) -> None:
        super().__init__("computed")
        self.config = config
        self.out = out


@pytest.fixture
def no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both worlds' computing entry points raise Computed instead of running."""

    def gmm(config: DemoConfig, **kw: Any) -> Any:
        raise Computed(config)

    def digits(out: Path, config: DigitsConfig, **kw: Any) -> Any:
        raise Computed(config, out)

    monkeypatch.setattr(demo_cli, "run_demo", gmm)
    monkeypatch.setattr(digits_run, "run_digits_world", digits)


def _exit_code(argv: list[str]) -> int:
    """The exit code of ``fguide ARGV``, whether argparse (SystemExit) or the command refused."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return int(exit_info.code or 0)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


REFUSED = [
    # flags of the other world
    (["--cache-dir", "c"], "--cache-dir"),
    (["--full"], "--full"),
    (["--family"], "--family"),
    (["--workers", "0"], "--workers"),
    (["--world", "digits", "--workers", "0"], "--workers"),
    (["--quick", "--full"], "--full"),
    (["--world", "digits", "--dims", "3"], "--dims"),
    (["--world", "digits", "--quick", "--sharpness", "4"], "--sharpness"),
    (["--world", "digits", "--quick", "--full"], "--full"),
    # values out of range
    (["--per-class", "0"], "--per-class"),
    (["--quick", "--per-class", "1"], "--per-class"),
    (["--world", "digits", "--per-class", "0"], "--per-class"),
    (["--steps", "0"], "--steps"),
    (["--world", "digits", "--steps", "1001"], "--steps"),
    (["--dims", "2", "1"], "--dims"),
    (["--seed", "-1"], "--seed"),
    (["--world", "digits", "--seed", "-2"], "--seed"),
    (["--sharpness", "0.5"], "--sharpness"),
    (["--sharpness", "nan"], "--sharpness"),
    (["--sharpness", "inf"], "--sharpness"),
    # method names of the other world
    (["--methods", "adm_cg"], "--methods"),
    # a name of neither world (a family row's variant that does not exist)
    (["--methods", "dps", "freedom_k3"], "--methods"),
    (["--world", "digits", "--methods", "base", "exact"], "--methods"),
]


@pytest.mark.parametrize(("argv", "flag"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
@pytest.mark.usefixtures("no_compute")
def test_flags_that_do_not_apply_are_refused_before_computing(
    argv: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _exit_code(["demo", "--out", str(out), *argv]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("fguide demo: error:") and flag in line
    assert not out.exists()  # refused before the output folder was made


@pytest.mark.parametrize("world", ["gmm", "digits"])
@pytest.mark.usefixtures("no_compute")
def test_out_that_is_a_file_is_refused_before_computing(
    world: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "results.txt"
    target.write_text("a user's file")
    for out in (target, target / "sub"):
        assert main(["demo", "--world", world, "--quick", "--out", str(out)]) == 2
        line = _one_line(capsys.readouterr().err)
        assert "--out" in line and str(out) in line
    assert target.read_text() == "a user's file"


@pytest.mark.parametrize("world", ["gmm", "digits"])
@pytest.mark.usefixtures("no_compute")
def test_unwritable_out_is_refused_before_computing(
    world: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # root writes into read-only folders: a refused temporary file stands for one
    def refuse(*args: Any, dir: Any = None, **kw: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = tmp_path / "ro"
    assert main(["demo", "--world", world, "--quick", "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--out" in line and "Permission denied" in line


def _config(argv: list[str], tmp_path: Path) -> Any:
    with pytest.raises(Computed) as info:
        main(["demo", "--out", str(tmp_path / "out"), *argv])
    return info.value.config


@pytest.mark.usefixtures("no_compute")
def test_gmm_flags_apply_and_win_over_quick(tmp_path: Path) -> None:
    quick = DemoConfig.quick()
    assert _config(["--quick"], tmp_path) == quick
    c = _config(
        ["--quick", "--dims", "2", "16", "--steps", "7", "--per-class", "3", "--seed", "4"],
        tmp_path,
    )
    expected = dataclasses.replace(
        quick, dims=(2, 16), steps=7, samples_per_class=3, seed=4, validation_seed=5
    )
    assert c == expected
    c = _config(["--sharpness", "2", "--methods", "none", "tilted"], tmp_path)
    assert c == DemoConfig(sharpness=2.0, methods=("none", "tilted"))
    c = _config(["--methods", "tfg", "freedom_k10", "exact"], tmp_path)  # family rows
    assert c == DemoConfig(methods=("tfg", "freedom_k10", "exact"))
    assert _config([], tmp_path) == DemoConfig()


@pytest.mark.usefixtures("no_compute")
def test_digits_flags_apply_and_win_over_quick_and_full(tmp_path: Path) -> None:
    argv = ["--world", "digits", "--cache-dir", str(tmp_path / "c")]
    default = DigitsConfig()
    assert _config(argv, tmp_path) == default
    full = DigitsConfig.full_config()
    assert _config([*argv, "--full"], tmp_path) == full
    c = _config(
        [*argv, "--quick", "--steps", "4", "--per-class", "3", "--methods", "none", "base"],
        tmp_path,
    )
    quick = DigitsConfig.quick_config()
    assert c == quick.with_(sample_steps=4, num_samples=30, methods=("none", "base"))
    c = _config([*argv, "--full", "--seed", "2"], tmp_path)
    assert c == full.with_(seed=2, seeds=tuple(2 + s for s in full.seeds))


@pytest.mark.usefixtures("no_compute")
def test_digits_family_is_opt_in(tmp_path: Path) -> None:
    # The default run keeps the paper's rows (its time budget); --family appends the five
    # training-free rows, to the default rows or to --methods, once each.
    argv = ["--world", "digits", "--cache-dir", str(tmp_path / "c")]
    family = ("dps", "freedom", "mpgd", "ugd", "tfg")
    default = DigitsConfig().methods
    assert not set(family) & set(default) and "base" in default and "adm_cg" in default
    assert _config([*argv, "--family"], tmp_path).methods == (*default, *family)
    c = _config([*argv, "--family", "--methods", "base", "mpgd"], tmp_path)
    assert c.methods == ("base", "mpgd", "dps", "freedom", "ugd", "tfg")


@pytest.mark.parametrize("workers", [None, 1, 3])
def test_gmm_workers_reach_the_job(
    workers: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given: dict[str, Any] = {}

    def gmm(config: DemoConfig, **kw: Any) -> Any:
        given.update(kw)
        raise Computed(config)

    monkeypatch.setattr(demo_cli, "run_demo", gmm)
    flag = [] if workers is None else ["--workers", str(workers)]
    for quick, default in (([], default_workers()), (["--quick"], 1)):
        with pytest.raises(Computed):
            main(["demo", "--out", str(tmp_path / "o"), *quick, *flag])
        assert given["workers"] == (default if workers is None else workers)


@pytest.mark.parametrize("workers", [None, 1, 3])
def test_digits_workers_reach_the_job(
    workers: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given: dict[str, Any] = {}

    def digits(out: Path, config: DigitsConfig, **kw: Any) -> Any:
        given.update(kw)
        raise Computed(config, out)

    monkeypatch.setattr(digits_run, "run_digits_world", digits)
    flag = [] if workers is None else ["--workers", str(workers)]
    for quick, default in (([], default_workers()), (["--quick"], 1)):
        with pytest.raises(Computed):
            main(["demo", "--world", "digits", "--out", str(tmp_path / "o"), *quick, *flag])
        assert given["workers"] == (default if workers is None else workers)


def _demo_options() -> list[argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    demo = sub.choices["demo"]
    return [a for a in demo._actions if a.option_strings and a.dest != "help"]


def test_help_states_every_default_and_uses_the_shared_metavars() -> None:
    options = _demo_options()
    assert {a.dest for a in options} >= {"seed", "dims", "sharpness", "steps", "per_class"}
    for action in options:
        flag = action.option_strings[0]
        assert action.help and "default" in action.help or action.nargs == 0, flag
    metavars = {a.option_strings[0]: a.metavar for a in options}
    assert metavars["--out"] == "DIR" and metavars["--cache-dir"] == "DIR"
    assert metavars["--seed"] == metavars["--per-class"] == metavars["--workers"] == "N"
    assert metavars["--steps"] == "STEPS"  # as fguide sample's
    # the stated defaults are the configurations' own
    helps = {a.option_strings[0]: a.help or "" for a in options}
    g, d = DemoConfig(), DigitsConfig()
    assert (
        f"default gmm {g.steps}" in helps["--steps"]
        and f"digits {d.sample_steps}" in helps["--steps"]
    )
    assert f"default gmm {g.samples_per_class}" in helps["--per-class"]
    assert f"digits {d.num_samples // 10}" in helps["--per-class"]
    assert f"default {g.sharpness:g}" in helps["--sharpness"]
    assert f"default {' '.join(map(str, g.dims))}" in helps["--dims"]
