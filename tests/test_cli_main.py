"""The CLI-wide error rule: a user error ends in one line naming the path and exit code 2;
the traceback only with ``--debug`` (or FGUIDE_DEBUG=1)."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pytest
import torch

from fguide.cli.main import error_message, main
from fguide.models.presets import create_model

FLAGS = (
    "image_size=8 num_channels=32 num_res_blocks=1 channel_mult=1,2 attention_resolutions=4 "
    "num_head_channels=32 class_cond=True learn_sigma=True"
)


class _Boom:
    """Unpickling this would create a marker file: the loaders must never execute it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(create_model(**dict(kv.split("=") for kv in FLAGS.split())).state_dict(), path)
    return path


def _sample(out: Path, model: Path, *extra: str) -> list[str]:
    return [
        "sample", "--out", str(out), "--model", str(model), "--model-flags", FLAGS,
        "--method", "none", "--steps", "2", "--num-samples", "2", "--device", "cpu",
        "--no-progress", *extra,
    ]  # fmt: skip


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_malicious_pickle_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(pickle.dumps(_Boom(marker)))
    assert main(_sample(tmp_path / "run", bad)) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(bad) in line
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0, 100])
def test_empty_or_truncated_checkpoint(
    tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str], cut: int
) -> None:
    bad = tmp_path / "cut.pt"
    bad.write_bytes(ckpt.read_bytes()[:cut])
    assert main(_sample(tmp_path / "run", bad)) == 2
    assert _one_line(capsys.readouterr().err).startswith("fguide sample: error:")


def test_out_is_a_file_or_empty(
    tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    assert main(_sample(target, ckpt)) == 2
    assert str(target) in _one_line(capsys.readouterr().err)
    assert target.read_text() == "x"
    assert main(_sample(Path(""), ckpt)) == 2
    assert "out" in _one_line(capsys.readouterr().err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder(tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert main(_sample(ro / "run", ckpt)) == 2
    assert "ro" in _one_line(capsys.readouterr().err)


def test_bad_values_name_the_flag(
    tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for extra, word in (
        (["--seed", "-1"], "--seed"),
        (["--sampler", "ddim", "--eta", "nan"], "--eta"),
    ):
        with pytest.raises(SystemExit) as exit_info:  # refused as the flags are parsed
            main(_sample(tmp_path / "run", ckpt, *extra))
        assert exit_info.value.code == 2
        assert word in _one_line(capsys.readouterr().err)


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError):
        main(["--debug", *_sample(tmp_path / "run", tmp_path / "missing.pt")])
    monkeypatch.setenv("FGUIDE_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(_sample(tmp_path / "run", tmp_path / "missing.pt"))


def test_error_classes() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/x/y.pt")
    assert "no space left on device writing /x/y.pt" in str(error_message(full))
    torch_write = RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter")
    assert "damaged file or full disk" in str(error_message(torch_write))
    assert error_message(RuntimeError("a bug")) is None  # bugs keep their traceback
    assert error_message(TypeError("a bug")) is None
