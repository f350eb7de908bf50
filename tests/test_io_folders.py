"""Folders owned by an fguide job (fguide.io.folders): check first, lock second, own files only.

The commands' own tests exercise the mechanism through the CLI (test_finetune_job,
test_sampling_run, test_evaluation_quality, test_cli_calibration, test_demo); here: its rules,
one by one.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from fguide.cli.main import COMMANDS, error_message
from fguide.io import folders
from fguide.io.files import RECORD, atomic_write, atomic_write_text

FILES = ("result.json", "plot_*.png", "parts")


def test_a_users_folder_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "result.json").write_text("my result")
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match=r"--out .*mine holds files .*\(notes.txt, result.json\)"):
        folders.claim_folder(out, "job", FILES)
    # Checked before locking: no lock file, no record left in the user's folder.
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "result.json"]


def test_a_job_owns_what_it_wrote_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with folders.claim_folder(out, "job", FILES) as owned:
        atomic_write_text(out / "result.json", "1")
        atomic_write_text(out / "plot_a.png", "png")
        (out / "parts").mkdir()
        (out / "parts" / "p0").write_text("part")
    record = json.loads((out / RECORD).read_text())
    assert (record["kind"], record["files"], record["token"]) == ("job", sorted(FILES), owned.token)
    (out / ".DS_Store").write_text("a file browser's")  # never written by fguide: no matter
    with folders.claim_folder(out, "job", FILES):  # a rerun overwrites its own files
        atomic_write_text(out / "result.json", "2")
    assert (out / "result.json").read_text() == "2"
    assert folders.folder_kind(out) == "job"
    with pytest.raises(ValueError, match=r"is a fguide job folder; fguide other does not"):
        folders.claim_folder(out, "other", FILES)
    (out / "model.pt").write_text("dropped in by the user")
    with pytest.raises(ValueError, match=r"no fguide run wrote there \(model.pt\)"):
        folders.claim_folder(out, "job", FILES)


def test_only_temporaries_carrying_the_folders_token_are_deleted(tmp_path: Path) -> None:
    out = tmp_path / "run"
    token = folders.claim_folder(out, "job", FILES, hold=False).token
    (out / "parts").mkdir()
    ours = [out / f".result.json.fg-{token}-k1ll3d.tmp", out / "parts" / f".p0.fg-{token}-x.tmp"]
    theirs = [out / ".result.json.foo.tmp", out / ".result.json.fg-0123abcd-x.tmp"]
    for p in (*ours, *theirs):
        p.write_text("partial")
    # A write into the folder names its temporary file with the token.
    seen: list[str] = []
    atomic_write_text(out / "result.json", "x")
    atomic_write(out / "plot_b.png", lambda f: seen.extend(p.name for p in out.iterdir()))
    assert any(n.startswith(".plot_b.png.fg-" + token + "-") for n in seen)
    folders.claim_folder(out, "job", FILES, hold=False)
    assert not any(p.exists() for p in ours)
    assert all(p.read_text() == "partial" for p in theirs)  # a user's look-alikes survive


def test_a_folder_of_an_earlier_version_is_adopted_by_its_main_file(tmp_path: Path) -> None:
    old = tmp_path / "eval"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"evaluator": "fguide-evaluator 1 (...)"}))
    folders.claim_folder(old, "evaluate", ("metrics.json",), hold=False)
    assert folders.folder_kind(old) == "evaluate" and (old / RECORD).is_file()
    users = tmp_path / "users"
    users.mkdir()
    (users / "metrics.json").write_text(json.dumps({"fid": 3.0}))  # not fguide's
    with pytest.raises(ValueError, match=r"\(metrics.json\)"):
        folders.claim_folder(users, "evaluate", ("metrics.json",))
    assert folders.folder_kind(users) is None


def test_the_full_disk_message_says_what_each_command_keeps() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/x/y")
    messages = {c: str(error_message(full, command=c)) for c in COMMANDS}
    assert len(set(messages.values())) == len(COMMANDS)  # one statement per command
    assert "shards are kept" in messages["sample"] and "checkpoint" in messages["finetune"]
    assert all("finished work is kept" not in m for m in messages.values())
