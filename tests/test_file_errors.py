"""A wrong, empty or damaged file given to a command ends in one line that names the flag, the
file and what the file should be, exit code 2 (issue 23 §3). Every file is made here."""

from __future__ import annotations

import argparse
import io
import struct
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fguide.cli.file_flags import name_flag
from fguide.cli.main import main
from fguide.models.presets import create_model

FLAGS = (
    "image_size=8 num_channels=32 num_res_blocks=1 channel_mult=1,2 attention_resolutions=4 "
    "num_head_channels=32 class_cond=True learn_sigma=True"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ADM checkpoint, 8x8 images, and the bad files."""
    d = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    model = create_model(**dict(kv.split("=") for kv in FLAGS.split()))
    torch.save(model.state_dict(), d / "tiny.pt")
    np.savez(d / "images.npz", np.zeros((4, 8, 8, 3), np.uint8), np.arange(4))
    (d / "empty.pt").write_bytes(b"")
    (d / "empty.pkl").write_bytes(b"")
    np.savez(d / "array.npz", a=np.zeros(3))
    (d / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1000)}, buf)
    (d / "cut.pt").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    nvlabs = b"\x8c\x17torch_utils.persistence\x8c\x1b_reconstruct_persistent_obj\x93"
    (d / "huge.pkl").write_bytes(b"\x80\x04" + nvlabs + b"\x8e" + struct.pack("<Q", 2**62) + b"x")
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 3))
    torch.save(other.state_dict(), d / "other_net.pt")
    (d / "guide_mod.py").write_text(
        textwrap.dedent(
            """
            import torch
            def make():
                return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
            """
        )
    )
    return {p.name: p for p in d.iterdir()}


def _sample(f: dict[str, Path], model: str, *extra: str) -> list[str]:
    extra = extra or ("--method", "none")
    out = f["tiny.pt"].parent / f"run-{len(extra)}-{model}"
    flags = [] if model.endswith(".pkl") else ["--model-flags", FLAGS]
    sampler = ["--sampler", "heun"] if model.endswith(".pkl") else []
    return [
        "sample", "--out", str(out), "--model", str(f[model]), *flags, *sampler,
        "--steps", "2", "--num-samples", "2", "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def _evaluate(f: dict[str, Path], weights: str) -> list[str]:
    return [
        "evaluate", "--inception-weights", str(f[weights]), "--out", str(f[weights].parent / "ev"),
        "--device", "cpu", "--no-cache", "--no-progress", str(f["images.npz"]),
        str(f["images.npz"]),
    ]  # fmt: skip


def _guide(f: dict[str, Path], weights: str) -> list[str]:
    return _sample(f, "tiny.pt", "--classifier", "guide_mod:make", "--classifier-weights",
                   str(f[weights]))  # fmt: skip


# (argv builder, flag, bad file, what the message must say about it)
CASES: dict[str, tuple[Callable[[dict[str, Path]], list[str]], str, str, str]] = {
    "model_empty_pt": (lambda f: _sample(f, "empty.pt"), "--model", "empty.pt", "is empty"),
    "model_empty_pkl": (lambda f: _sample(f, "empty.pkl"), "--model", "empty.pkl", "is empty"),
    "model_npz": (lambda f: _sample(f, "array.npz"), "--model", "array.npz", "NumPy .npz"),
    "model_random": (lambda f: _sample(f, "random.bin"), "--model", "random.bin", "not a PyTorch"),
    "model_cut": (lambda f: _sample(f, "cut.pt"), "--model", "cut.pt", "truncated or damaged"),
    "model_huge_opcode": (
        lambda f: _sample(f, "huge.pkl"),
        "--model",
        "huge.pkl",
        "BINBYTES8 declares",
    ),
    "classifier_empty": (
        lambda f: _sample(
            f, "tiny.pt", "--classifier", "resnet18", "--classifier-weights", str(f["empty.pt"])
        ),  # fmt: skip
        "--classifier-weights",
        "empty.pt",
        "is empty",
    ),
    "classifier_other_network": (
        lambda f: _guide(f, "other_net.pt"),
        "--classifier-weights",
        "other_net.pt",
        "does not fit the given Sequential",
    ),
    "inception_empty": (
        lambda f: _evaluate(f, "empty.pt"),
        "--inception-weights",
        "empty.pt",
        "is empty",
    ),  # fmt: skip
    "inception_random": (
        lambda f: _evaluate(f, "random.bin"),
        "--inception-weights",
        "random.bin",
        "not a PyTorch",
    ),
    "trajectory_binary": (
        lambda f: [
            "calibration",
            "--trajectory",
            str(f["random.bin"]),
            "--out",
            str(f["random.bin"].parent / "cal"),
        ],  # fmt: skip
        "--trajectory",
        "random.bin",
        "not JSON text",
    ),
}
EXPECTED = {
    "--model": "expected an ",  # ADM checkpoint, NVlabs pickle or pipeline folder
    "--classifier-weights": "",  # a torchvision ResNet / the given module: said per case
    "--inception-weights": "expected the FID Inception-v3 weights",
    "--trajectory": "expected the trajectory.json",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_file_error_names_flag_file_and_content(
    files: dict[str, Path],
    case: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    build, flag, name, what = CASES[case]
    monkeypatch.syspath_prepend(str(files["guide_mod.py"].parent))
    assert main(build(files)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.split(": error: ", 1)[1].startswith(f"{flag}: "), line
    assert str(files[name]) in line and what in line, line
    assert EXPECTED[flag] in line, line


def test_name_flag_matches_whole_paths_only(tmp_path: Path) -> None:
    """The flag is named for its file, a file inside its folder, or a leading config-field
    name; not for a longer path that merely starts with its value."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(["--model", str(tmp_path / "m.pt"), "--out", str(tmp_path / "o")])
    args._parser = parser
    err = ValueError()
    m = str(tmp_path / "m.pt")
    assert name_flag(args, err, f"{m}: empty") == f"--model: {m}: empty"
    assert name_flag(args, err, f"model: {m}: empty") == f"--model: {m}: empty"
    assert name_flag(args, err, f"refusing to load {m}: x") == f"--model: refusing to load {m}: x"
    assert name_flag(args, err, f"{m}2: empty") == f"{m}2: empty"
    inside = f"{tmp_path / 'o' / 'a.json'}: bad"
    assert name_flag(args, err, inside) == f"--out: {inside}"
    assert name_flag(args, err, f"--model {m} is bad") == f"--model {m} is bad"
    gone = FileNotFoundError(2, "No such file", m)
    assert name_flag(args, gone, "No such file") == "--model: No such file"
