"""``fguide weights``: the table's facts hang together, downloads are resumable, verified and
atomic (served by a local HTTP server started here: nothing is fetched from outside), and
``--weights-dir`` finds a configuration's files by name."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fguide import weights
from fguide.cli.main import build_parser, main
from fguide.cli.sample import config_from_args
from fguide.sampling.configs import PAPER_CONFIGS
from fguide.weights import REGISTRY, RemoteFile, WeightEntry, missing_files, resolve_inception

DATA = bytes(range(256)) * 1200  # 307,200 bytes
SHA = hashlib.sha256(DATA).hexdigest()


@dataclass
class _State:
    files: dict[str, bytes] = field(default_factory=dict)
    cut_once: set[str] = field(default_factory=set)
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            rng = self.headers.get("Range")
            state.requests.append((self.path, rng))
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404, "Not Found")
                return
            start = 0
            if rng and not state.ignore_range:
                m = re.fullmatch(r"bytes=(\d+)-", rng)
                assert m is not None, rng
                start = int(m.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path in state.cut_once:  # announce the whole body, send half, hang up
                state.cut_once.discard(self.path)
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, _State]]:
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    state = _State()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", state
    finally:
        srv.shutdown()
        srv.server_close()


def _registry(monkeypatch: pytest.MonkeyPatch, *entries: WeightEntry) -> None:
    monkeypatch.setattr(weights, "REGISTRY", {e.name: e for e in entries})


def _file(base: str, name: str, sha: str | None = SHA, size: int | None = len(DATA)) -> WeightEntry:
    return WeightEntry(name, "model", (RemoteFile(name, f"{base}/{name}", size, sha),))


def _download(dest: Path, *names: str) -> list[str]:
    return ["weights", "download", *names, "--dir", str(dest), "--no-progress"]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_download_file_and_folder(
    server: tuple[str, _State], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, state = server
    state.files.update({"/w.pth": DATA, "/f/sub/a.bin": DATA[:1000], "/f/b.json": b"{}"})
    folder = WeightEntry(
        "f",
        "model",
        (
            RemoteFile(
                "sub/a.bin", f"{base}/f/sub/a.bin", 1000, hashlib.sha256(DATA[:1000]).hexdigest()
            ),
            RemoteFile("b.json", f"{base}/f/b.json", 2, hashlib.sha256(b"{}").hexdigest()),
        ),
        folder=True,
    )
    _registry(monkeypatch, _file(base, "w.pth"), folder)
    assert main(_download(tmp_path, "w.pth", "f")) == 0
    assert (tmp_path / "w.pth").read_bytes() == DATA
    assert (tmp_path / "f" / "sub" / "a.bin").read_bytes() == DATA[:1000]
    assert (tmp_path / "f" / "b.json").read_bytes() == b"{}"
    assert not list(tmp_path.rglob("*.part"))
    assert [r for _, r in state.requests] == [None, None, None]
    # A second run finds every file present and verified: nothing is fetched again.
    assert main(_download(tmp_path, "w.pth", "f")) == 0
    assert len(state.requests) == 3


@pytest.mark.parametrize("ignore_range", [False, True])
def test_resume_after_the_connection_is_cut(
    server: tuple[str, _State],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    ignore_range: bool,
) -> None:
    base, state = server
    state.files["/w.pth"] = DATA
    state.cut_once.add("/w.pth")
    _registry(monkeypatch, _file(base, "w.pth"))
    assert main(_download(tmp_path, "w.pth")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "w.pth" in line and "rerun" in line
    part = tmp_path / "w.pth.part"
    assert not (tmp_path / "w.pth").exists() and part.read_bytes() == DATA[: len(DATA) // 2]
    state.ignore_range = ignore_range  # a server that answers a Range request with 200
    assert main(_download(tmp_path, "w.pth")) == 0
    assert state.requests[-1] == ("/w.pth", f"bytes={len(DATA) // 2}-")
    assert (tmp_path / "w.pth").read_bytes() == DATA and not part.exists()


def test_corrupted_download_is_refused(
    server: tuple[str, _State],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, state = server
    bad = bytearray(DATA)
    bad[1234] ^= 1
    state.files["/w.pth"] = bytes(bad)
    _registry(monkeypatch, _file(base, "w.pth"))
    assert main(_download(tmp_path, "w.pth")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "w.pth" in line and SHA in line and hashlib.sha256(bad).hexdigest() in line
    assert list(tmp_path.iterdir()) == []  # nothing at the target, no partial file


def test_404_is_named_in_one_line(
    server: tuple[str, _State],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, _ = server
    _registry(monkeypatch, _file(base, "gone.pth"))
    assert main(_download(tmp_path, "gone.pth")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "404" in line and f"{base}/gone.pth" in line
    assert list(tmp_path.iterdir()) == []


def test_unverified_file_needs_the_flag_and_prints_its_hash(
    server: tuple[str, _State],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, state = server
    state.files["/u.pt"] = DATA
    _registry(monkeypatch, _file(base, "u.pt", sha=None, size=None))
    assert main(_download(tmp_path, "u.pt")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "u.pt" in line and "--allow-unverified" in line
    assert state.requests == [] and list(tmp_path.iterdir()) == []
    assert main([*_download(tmp_path, "u.pt"), "--allow-unverified"]) == 0
    assert SHA in capsys.readouterr().out
    assert (tmp_path / "u.pt").read_bytes() == DATA


def test_a_different_file_at_the_target_is_kept(
    server: tuple[str, _State],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, state = server
    state.files["/w.pth"] = DATA
    _registry(monkeypatch, _file(base, "w.pth"))
    (tmp_path / "w.pth").write_bytes(b"mine")
    assert main(_download(tmp_path, "w.pth")) == 2
    assert str(tmp_path / "w.pth") in _one_line(capsys.readouterr().err)
    assert (tmp_path / "w.pth").read_bytes() == b"mine" and state.requests == []


def test_the_table_names_every_configuration_file() -> None:
    for name, cfg in PAPER_CONFIGS.items():
        assert cfg.model_file is not None, name  # --weights-dir finds every model
        for needed in (cfg.model_file, cfg.weights):
            if needed is not None:
                assert name in REGISTRY[needed].configs, (name, needed)
    assert any(e.role == "inception" for e in REGISTRY.values())
    for e in REGISTRY.values():
        # a CLIP folder ends up loadable: its config and its safetensors weights, downloaded
        # or made locally
        if e.role == "clip":
            paths = {f.path for f in e.files} | {p for p, _ in e.local_only}
            assert {"config.json", "model.safetensors"} <= paths, e.name
    for e in REGISTRY.values():
        for f in e.files:
            assert f.url.startswith("https://") and not f.path.endswith(".bin"), f
            # Hugging Face files are pinned to a commit; a folder's URL ends in the file's path
            if f.url.startswith("https://huggingface.co/"):
                assert re.search(r"/resolve/[0-9a-f]{40}/", f.url), f
            assert not e.folder or f.url.endswith("/" + f.path), f
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256), f
            # torchvision's and pytorch-fid's file names carry their SHA-256's first 8 digits
            tag = re.search(r"-([0-9a-f]{8})\.pth$", f.path)
            if tag and f.sha256 is not None:
                assert f.sha256.startswith(tag.group(1)), f


def test_list_shows_unknown_and_urls(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "list", "adm-cg-128"]) == 0
    out = capsys.readouterr().out
    assert "size unknown, SHA-256 unknown" in out
    assert REGISTRY["128x128_classifier.pt"].files[0].url in out
    assert "resnet50" not in out  # only the configuration's files


def _touch_entry(root: Path, name: str) -> None:
    e = REGISTRY[name]
    paths = [e.target(root, f) for f in e.files] + [root / name / p for p, _ in e.local_only]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"placeholder")


def _sample_args(*argv: str) -> object:
    return build_parser().parse_args(["sample", "--out", "o", *argv])


def test_weights_dir_finds_a_configurations_files(tmp_path: Path) -> None:
    for name in REGISTRY:
        _touch_entry(tmp_path, name)
    w = str(tmp_path)
    cfg = config_from_args(_sample_args("--config", "elucd-r101-128", "--weights-dir", w))
    assert cfg.model == tmp_path / "128x128_diffusion.pt"
    assert cfg.classifier_weights == tmp_path / "resnet101-cd907fc2.pth"
    cfg = config_from_args(_sample_args("--config", "elucd-dit-xl2-256", "--weights-dir", w))
    assert cfg.model == tmp_path / "DiT-XL-2-256"
    for name, folder in (
        ("sd15", "stable-diffusion-v1-5"),
        ("sd15-ddim", "stable-diffusion-v1-5"),
        ("sdxl", "stable-diffusion-xl-base-1.0"),
    ):
        cfg = config_from_args(_sample_args("--config", name, "--weights-dir", w))
        assert cfg.model == tmp_path / folder, name
    cfg = config_from_args(_sample_args("--config", "elucd-clip-256", "--weights-dir", w))
    assert cfg.model == tmp_path / "256x256_diffusion_uncond.pt"
    assert cfg.classifier == f"clip:{tmp_path / 'clip-vit-large-patch14-336'}"
    mine = tmp_path / "mine.pt"
    cfg = config_from_args(
        _sample_args("--config", "elucd-r50-128", "--weights-dir", w, "--model", str(mine))
    )
    assert cfg.model == mine and cfg.classifier_weights == tmp_path / "resnet50-11ad3fa6.pth"


def test_a_missing_file_names_the_download_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _touch_entry(tmp_path, "128x128_diffusion.pt")
    argv = ["sample", "--config", "js-r101-128", "--weights-dir", str(tmp_path), "--out", "o"]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(tmp_path / "resnet101-cd907fc2.pth") in line
    assert f"fguide weights download resnet101-cd907fc2.pth --dir {tmp_path}" in line
    _touch_entry(tmp_path, "clip-vit-large-patch14-336")
    (tmp_path / "clip-vit-large-patch14-336" / "model.safetensors").unlink()
    _touch_entry(tmp_path, "256x256_diffusion_uncond.pt")
    assert main([*argv[:2], "elucd-clip-256", *argv[3:]]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "model.safetensors not found" in line and "save_pretrained" in line
    assert "fguide weights download" not in line  # nothing downloadable is missing


def test_evaluate_finds_the_inception_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fguide weights download pt_inception"):
        resolve_inception(None, tmp_path)
    alt = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    alt.write_bytes(b"x")
    assert resolve_inception(None, tmp_path) == alt
    main_file = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    main_file.write_bytes(b"x")
    assert resolve_inception(None, tmp_path) == main_file
    assert resolve_inception(tmp_path / "mine.pth", tmp_path) == tmp_path / "mine.pth"
    assert resolve_inception(None, None) is None


# The components of SD 1.5's and SDXL's model_index.json on the Hub (SD 1.5's also names a
# safety checker and feature extractor, which fguide never loads nor downloads).
_SD_INDEX = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
}
_SD15_INDEX = {
    **_SD_INDEX,
    "scheduler": ["diffusers", "PNDMScheduler"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
}
_SDXL_INDEX = {
    **_SD_INDEX,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
}


def test_sd_folder_entries_hold_the_files_fguide_loads(tmp_path: Path) -> None:
    """Each SD configuration's folder entry lists exactly the files fguide loads and hashes from
    a pipeline folder of its kind (sd_pipeline_files), no more (no .bin, fp16 or
    safety checker) and no fewer."""
    from fguide.models.sd_folder import sd_pipeline_files

    kinds = {"sd15": ("StableDiffusionPipeline", _SD15_INDEX)}
    kinds["sdxl"] = ("StableDiffusionXLPipeline", _SDXL_INDEX)
    for config, (pipeline, components) in kinds.items():
        entry = REGISTRY[str(PAPER_CONFIGS[config].model_file)]
        _touch_entry(tmp_path, entry.name)
        root = tmp_path / entry.name
        index = {"_class_name": pipeline, **components}
        (root / "model_index.json").write_text(json.dumps(index))
        loaded = {p.relative_to(root).as_posix() for p in sd_pipeline_files(root)}
        assert loaded == {f.path for f in entry.files}, config


def test_sd_config_finds_a_saved_pipeline_folder_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--config sd15 --weights-dir D resolves the model to D/stable-diffusion-v1-5, a folder
    as StableDiffusionPipeline.save_pretrained writes it holding every file the entry lists;
    without it, one line names the folder and the download command."""
    from sd_folders import build_sd_folder

    from fguide.models.sd_folder import sd_pipeline_kind

    name = "stable-diffusion-v1-5"
    folder = build_sd_folder(tmp_path / "w" / name)
    capsys.readouterr()  # building's own warnings and progress
    weights_dir = folder.parent
    # Every weight and config file the entry lists is where save_pretrained puts it. The Hub's
    # tokenizer/ holds the four files of the slow format; transformers >= 5 saves
    # tokenizer.json instead: add those (this test resolves the folder, it does not load it).
    missing = missing_files(REGISTRY[name], weights_dir)
    assert all(Path(m).parent == folder / "tokenizer" for m in missing), missing
    for m in missing:
        Path(m).write_text("{}")
    for config in ("sd15", "sd15-ddim"):
        cfg = config_from_args(_sample_args("--config", config, "--weights-dir", str(weights_dir)))
        assert cfg.model == folder and sd_pipeline_kind(cfg.model) == "sd"
    out = str(tmp_path / "o")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    argv = ["sample", "--config", "sd15", "--weights-dir", str(weights_dir), "--out", out]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(folder / "unet" / "diffusion_pytorch_model.safetensors") in line
    assert f"fguide weights download {name} --dir {weights_dir}" in line
    shutil.rmtree(folder)
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{folder} not found" in line
    assert f"fguide weights download {name} --dir {weights_dir}" in line
    # No --model and no --weights-dir: the folder, its layout and how to get it.
    assert main(["sample", "--config", "sd15", "--out", out]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--model is required" in line and f"loads {name}" in line
    assert "diffusers layout" in line and f"fguide weights download {name} --dir DIR" in line
    assert not (tmp_path / "o").exists()
