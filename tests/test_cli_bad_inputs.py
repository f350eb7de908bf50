"""Bad inputs at the command line: exit code 2, one line on stderr, the flag named as typed.

Table-driven: each case is a command line and the words its one line must (and must not)
contain. Numbers out of range are refused by the flags' types; settings that contradict each
other by the configuration, whose errors name the API parameter (``eps``, ``shard_size``)
and reach the user as the flag (``--eps``, ``--shard-size``). A computation that diverges at
well-formed settings exits 1 instead (``finetune --lr 1e30``).
"""

from __future__ import annotations

import math
import pickle
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fguide
from fguide.cli.main import main
from fguide.models.presets import create_model
from fguide.params import ParamError
from fguide.sampling import SampleConfig, resolve_config

FLAGS = (
    "image_size=8 num_channels=32 num_res_blocks=1 channel_mult=1,2 attention_resolutions=4 "
    "num_head_channels=32 class_cond=True learn_sigma=True"
)
CKPT = "<CKPT>"  # replaced by the tiny checkpoint's path
OUT = "<OUT>"  # replaced by a fresh folder's path

SAMPLE = [
    "sample", "--out", OUT, "--model", CKPT, "--model-flags", FLAGS, "--method", "none",
    "--num-samples", "2", "--device", "cpu", "--no-progress",
]  # fmt: skip
GUIDED = [*SAMPLE, "--method", "base", "--classifier", "resnet18"]  # the last --method wins
FINETUNE = ["finetune", "--classifier", "resnet18", "--data", "d.npz", "--out", OUT]
CALIBRATION = ["calibration", "--classifier", "resnet18", "images.npz"]

# (command line, words the line must contain, words it must not contain)
CASES: list[tuple[list[str], tuple[str, ...], tuple[str, ...]]] = [
    # issue 23 §3: the respacing and the counts speak the flags' language
    ([*SAMPLE, "--steps", "0"], ("--steps", "'0'"), ("timestep_respacing",)),
    ([*SAMPLE, "--steps", "5000"], ("--steps", "cannot divide"), ("timestep_respacing",)),
    ([*SAMPLE, "--steps", "x"], ("--steps",), ()),
    ([*SAMPLE, "--sampler", "heun", "--steps", "1"], ("--steps", "Heun"), ()),
    ([*SAMPLE, "--num-samples", "0"], ("--num-samples", ">= 1"), ("num_samples",)),
    # issue 22 §1: non-finite and out-of-range numbers at the boundary
    ([*SAMPLE, "--tau2", "inf"], ("--tau2", "finite"), ("--scale",)),
    ([*SAMPLE, "--alpha", "inf"], ("--alpha", "finite"), ("--scale",)),
    ([*SAMPLE, "--lam-max", "nan"], ("--lam-max", "finite"), ("--scale",)),
    ([*SAMPLE, "--scale", "nan"], ("--scale", "finite"), ()),
    ([*SAMPLE, "--softplus-beta", "inf"], ("--softplus-beta",), ()),
    (["evaluate", "ref.npz", "samples.npz", "--image-size", "-3"], ("--image-size",), ()),
    (["evaluate", "ref.npz", "samples.npz", "--image-size", "0"], ("--image-size",), ()),
    (["evaluate", "ref.npz", "samples.npz", "--workers", "0"], ("--workers",), ()),
    ([*FINETUNE, "--workers", "-1"], ("--workers", ">= 0"), ()),
    ([*FINETUNE, "--lr", "nan"], ("--lr",), ()),
    ([*FINETUNE, "--lr", "0"], ("--lr", "> 0"), ()),
    ([*FINETUNE, "--holdout", "0"], ("--holdout",), ()),
    ([*FINETUNE, "--beta", "inf"], ("--beta",), ()),
    ([*CALIBRATION, "--batch-size", "0"], ("--batch-size",), ()),
    ([*CALIBRATION, "--seed", "-1"], ("--seed",), ()),
    ([*CALIBRATION, "--diffusion-steps", "0"], ("--diffusion-steps",), ()),
    ([*CALIBRATION, "--noise-t", "clean,5000"], ("--noise-t", "5000"), ()),
    # settings that contradict each other: the configuration's errors, spelled as flags
    ([*GUIDED, "--eps", "0.1"], ("--eps", "--method 'base'"), ("error: eps",)),
    ([*GUIDED, "--t-tilt", "-0.2", "--tilt-group", "3"], ("--shard-size", "--tilt-group"), ()),
    ([*GUIDED, "--lam-max", "0.3"], ("--lam-max", "--entropy"), ("lam_max",)),
    ([*SAMPLE, "--s-churn", "1"], ("--s-churn", "Heun"), ("s_churn",)),
    # a sampler's own setting given for another sampler (it would be dropped silently)
    ([*GUIDED, "--sampler", "ddim", "--sine-factor", "0.3"], ("--sine-factor", "'ddim'"), ()),
    (
        [*GUIDED, "--sampler", "ddim", "--variance-tracking", "first_sample"],
        ("--variance-tracking", "ddpm"),
        ("variance_tracking",),
    ),
    ([*GUIDED, "--guidance-input", "denoised"], ("--guidance-input", "heun", "'ddpm'"), ()),
    ([*SAMPLE, "--eta", "0.5"], ("--eta", "ddim", "'ddpm'"), ()),
    ([*SAMPLE, "--cfg-scale", "2"], ("--cfg-scale", "--model DIR"), ("cfg_scale",)),
    ([*SAMPLE, "--labels", "abc"], ("--labels",), ()),
    (
        [*GUIDED, "--classifier", "x:y", "--classifier-resize", "8"],
        ("--classifier-resize", "--classifier-input-mode"),
        ("classifier_resize",),
    ),
    # argparse's own errors: one line, pointing to the command's --help
    (["sample", "--steps"], ("--steps", "expected one argument", "see fguide sample --help"), ()),
    (["sample", "--bogus"], ("unrecognized arguments: --bogus", "fguide sample --help"), ()),
    (["finetune"], ("--classifier", "--data", "--out", "fguide finetune --help"), ()),
    (["nonesuch"], ("invalid choice", "see fguide --help"), ()),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(create_model(**dict(kv.split("=") for kv in FLAGS.split())).state_dict(), path)
    return path


def _run(argv: list[str]) -> int:
    """``main``'s exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return int(exit_info.code or 0)


@pytest.mark.parametrize(
    ("argv", "words", "absent"), CASES, ids=[" ".join(c[0][-2:]) for c in CASES]
)
def test_bad_input_is_one_line_naming_the_flag(
    argv: list[str],
    words: tuple[str, ...],
    absent: tuple[str, ...],
    ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [str(ckpt) if a == CKPT else str(tmp_path / "run") if a == OUT else a for a in argv]
    assert _run(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    for word in absent:
        assert word not in lines[0], lines[0]


def test_the_api_keeps_its_parameter_names(tmp_path: Path) -> None:
    cfg = SampleConfig(out=tmp_path, model=tmp_path / "m.pt", classifier="resnet18", eps=0.1)
    with pytest.raises(ParamError, match=r"^eps is a divergence parameter; method 'base'") as e:
        resolve_config(cfg)
    assert e.value.params == ("eps", "method")
    again = pickle.loads(pickle.dumps(e.value))  # errors cross process boundaries intact
    assert isinstance(again, ParamError) and str(again) == str(e.value)
    assert (
        again.spelled(str.upper) == "EPS is a divergence parameter; METHOD 'base' has no divergence"
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tau1": math.inf}, "tau1"),
        ({"tau2": math.inf}, "tau2"),
        ({"alpha": math.inf}, "alpha"),
        ({"entropy": True, "lam_max": math.nan}, "lam_max"),
        ({"entropy": True, "lam_min": math.inf}, "lam_min"),
    ],
)
def test_the_objective_refuses_non_finite_parameters(kwargs: dict[str, Any], name: str) -> None:
    """The API's own check (the CLI refuses these earlier, as it parses the flags)."""
    with pytest.raises(ParamError, match="finite") as e:
        fguide.objective("js", **kwargs)
    assert name in e.value.params


@pytest.mark.parametrize("steps", ["0", "x", "10,,5", "ddim0", "ddimx"])
def test_the_respacing_is_checked_before_any_file_is_read(tmp_path: Path, steps: str) -> None:
    cfg = SampleConfig(out=tmp_path, model=tmp_path / "not-read.pt", method="none", steps=steps)
    with pytest.raises(ParamError) as e:
        resolve_config(cfg)
    assert e.value.params == ("steps",)


MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def clean4():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    """
)


def test_diverged_training_exits_1_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--lr 1e30`` is a well-formed value whose training diverges: exit 1, not 2, naming
    the step and the learning rate."""
    module = tmp_path / "tinyclf.py"
    module.write_text(MODULE)
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8), np.arange(16) % 4)
    argv = [
        "finetune", "--classifier", f"{module}:clean4", "--data", str(data),
        "--out", str(tmp_path / "run"), "--iterations", "4", "--batch-size", "4",
        "--holdout", "4", "--no-progress", "--workers", "0", "--lr", "1e30",
    ]  # fmt: skip
    assert _run(argv) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "diverged" in lines[0] and "non-finite loss at step" in lines[0]
    assert "--lr 1e+30" in lines[0]


def test_a_named_configuration_on_another_sampler_drops_its_sampler_settings() -> None:
    """``--config elucd-r101-128 --sampler ddim``: the configuration's DDPM sine boost does not
    apply to DDIM and goes with its sampler (not refused as if the user had given it); the same
    configuration on its own sampler keeps it, and an explicit --sine-factor with DDIM is still
    refused."""
    from fguide.sampling.configs import apply_paper_config

    out, model = Path("run"), Path("m.pt")
    own = apply_paper_config("elucd-r101-128", {})
    assert own["sampler"] == "ddpm" and own["sine_factor"] == 0.3
    ddim = apply_paper_config("elucd-r101-128", {"sampler": "ddim"})
    assert "sine_factor" not in ddim
    c = resolve_config(SampleConfig(out=out, model=model, **ddim))
    assert (c.sampler, c.sine_factor, c.variance_tracking) == ("ddim", None, None)
    explicit = apply_paper_config("elucd-r101-128", {"sampler": "ddim", "sine_factor": 0.3})
    with pytest.raises(ParamError, match="sine_factor applies to sampler ddpm or heun"):
        resolve_config(SampleConfig(out=out, model=model, **explicit))
