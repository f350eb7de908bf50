"""Malformed diffusers pipeline and CLIP folders: each ends in one error naming the file and what
is wrong, before diffusers or transformers build anything (issue 22 §1). Tiny folders are
saved here; each case copies one and breaks one file."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from test_models_clip import PROMPTS, _build_clip_folder  # noqa: E402

from fguide.cli.main import main  # noqa: E402
from fguide.models import hf_diffusers as hd  # noqa: E402
from fguide.models.clip import load_clip_head  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        latent_channels=4, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
    )  # fmt: skip
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    diffusers.DiTPipeline(transformer=dit, vae=vae, scheduler=sched).save_pretrained(
        root / "dit", safe_serialization=True
    )
    unet = diffusers.UNet2DModel(
        sample_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
    )  # fmt: skip
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(
        root / "unet", safe_serialization=True
    )
    _build_clip_folder(root / "clip")
    return {p.name: p for p in root.iterdir()}


def _json(name: str, **changes: Any) -> Callable[[Path], str]:
    """Set fields of the JSON file ``name`` (``a__b`` sets a nested field); returns the file."""

    def edit(d: Path) -> str:
        data = json.loads((d / name).read_text())
        for key, value in changes.items():
            *outer, last = key.split("__")
            target = data
            for k in outer:
                target = target[k]
            target[last] = value
        (d / name).write_text(json.dumps(data))
        return name

    return edit


def _write(name: str, data: bytes) -> Callable[[Path], str]:
    def edit(d: Path) -> str:
        (d / name).write_bytes(data)
        return name

    return edit


def _cut(name: str, keep: int = 100) -> Callable[[Path], str]:
    return lambda d: _write(name, (d / name).read_bytes()[:keep])(d)


def _weights(name: str, drop: int = 0, add: bool = False) -> Callable[[Path], str]:
    """Drop the first ``drop`` tensors of a safetensors file, or add one it should not have."""

    def edit(d: Path) -> str:
        sd = load_file(d / name)
        for k in sorted(sd)[:drop]:
            del sd[k]
        if add:
            sd["extra.weight"] = torch.zeros(3)
        save_file(sd, d / name)
        return name

    return edit


JUNK = os.urandom(3000)
T = "transformer/"
# case: (folder, edit returning the broken file, what the message must say)
PIPELINES: dict[str, tuple[str, Callable[[Path], str], str]] = {
    "weights_cut": ("dit", _cut(T + WEIGHTS), "not a safetensors file"),
    "weights_junk": ("dit", _write(T + WEIGHTS, JUNK), "not a safetensors file"),
    "weights_header_2^62": (
        "dit",
        _write(T + WEIGHTS, (2**62).to_bytes(8, "little") + b"{}"),
        "its header declares 4611686018427387904 bytes",
    ),
    "vae_weights_junk": ("dit", _write("vae/" + WEIGHTS, JUNK), "not a safetensors file"),
    "weights_missing_tensor": ("dit", _weights(T + WEIGHTS, drop=1), "1 missing"),
    "weights_extra_tensor": ("dit", _weights(T + WEIGHTS, add=True), "1 unexpected"),
    "weights_other_shapes": (
        "dit",
        _json(T + "config.json", attention_head_dim=16),
        "of another shape",
    ),
    "config_not_json": ("dit", _write(T + "config.json", b"{nope"), "not readable JSON"),
    "config_a_list": ("dit", _write(T + "config.json", b"[1, 2]"), "a JSON list, not an object"),
    "config_list_for_int": ("dit", _json(T + "config.json", in_channels=[4]), "in_channels is [4]"),
    "config_str_for_int": ("dit", _json(T + "config.json", num_layers="1"), 'num_layers is "1"'),
    "config_null_classes": (
        "dit",
        _json(T + "config.json", num_embeds_ada_norm=None),
        "num_embeds_ada_norm is null",
    ),
    "config_huge_sample": ("dit", _json(T + "config.json", sample_size=10**9), "out of range"),
    "config_position_table": (
        "dit",
        _json(T + "config.json", sample_size=1024, patch_size=1, attention_head_dim=64),
        "position table",
    ),
    "vae_int_for_list": (
        "dit",
        _json("vae/config.json", block_out_channels=8),
        "block_out_channels is 8",
    ),
    "scheduler_7TiB": (
        "dit",
        _json("scheduler/scheduler_config.json", num_train_timesteps=10**12),
        "out of range",
    ),
    "scheduler_steps_list": (
        "dit",
        _json("scheduler/scheduler_config.json", num_train_timesteps=[1000]),
        "num_train_timesteps is [1000]",
    ),
    "scheduler_beta_str": (
        "dit",
        _json("scheduler/scheduler_config.json", beta_start="x"),
        'beta_start is "x"',
    ),
    "scheduler_betas_nested": (
        "dit",
        _json("scheduler/scheduler_config.json", trained_betas=[[0.01]] * 1000),
        "trained_betas must be a list of 1000 numbers",
    ),
    "scheduler_range_list": (
        "dit",
        _json("scheduler/scheduler_config.json", clip_sample_range=[1]),
        "clip_sample_range is [1]",
    ),
    "index_a_list": ("dit", _write("model_index.json", b"[]"), "a JSON list, not an object"),
    "unet_sample_size_3": ("unet", _json("unet/config.json", sample_size=[8, 8, 8]), "[h, w]"),
    "unet_sample_size_str": ("unet", _json("unet/config.json", sample_size="8"), 'is "8"'),
    "unet_out_list": ("unet", _json("unet/config.json", out_channels=[3]), "out_channels is [3]"),
    "unet_classes_str": ("unet", _json("unet/config.json", num_class_embeds="x"), 'is "x"'),
    "unet_weights_junk": ("unet", _write("unet/" + WEIGHTS, JUNK), "not a safetensors file"),
    "unet_other_shapes": (
        "unet",
        _json("unet/config.json", block_out_channels=[16, 32]),
        "of another shape",
    ),
}
CLIP: dict[str, tuple[Callable[[Path], str], str]] = {
    "weights_junk": (_write("model.safetensors", JUNK), "not a safetensors file"),
    "weights_cut": (_cut("model.safetensors", 5000), "not a safetensors file"),
    "weights_missing_tensor": (_weights("model.safetensors", drop=2), "2 missing"),
    "config_not_json": (_write("config.json", b"nope"), "not readable JSON"),
    "config_list_for_int": (_json("config.json", text_config__hidden_size=[32]), "is [32]"),
    "config_too_many_layers": (
        _json("config.json", vision_config__num_hidden_layers=300),
        "num_hidden_layers is 300; expected an integer in [1, 256]",
    ),
    "config_other_shapes": (
        _json("config.json", vision_config__hidden_size=64),
        "of another shape",
    ),
    "config_more_layers": (_json("config.json", text_config__num_hidden_layers=3), "16 missing"),
    "vocab_not_json": (_write("vocab.json", b"[1, 2"), "transformers cannot load it"),
    "merges_binary": (_write("merges.txt", JUNK), "transformers cannot load it"),
    "processor_size_list": (_json("preprocessor_config.json", size=[16]), "size is [16]"),
    "processor_mean_str": (_json("preprocessor_config.json", image_mean="x"), 'is "x"'),
    "processor_a_list": (_write("preprocessor_config.json", b"[]"), "a JSON list"),
    "processor_crop_no_width": (
        _json("preprocessor_config.json", crop_size={"height": 16}),
        "the field 'width' is missing",
    ),
    "processor_size_huge": (
        _json("preprocessor_config.json", size={"shortest_edge": 10**9}),
        "out of range",
    ),
}


def _broken(folders: dict[str, Path], base: str, edit: Callable[[Path], str], tmp: Path) -> Path:
    folder = tmp / base
    shutil.copytree(folders[base], folder)
    return folder / edit(folder)


@pytest.mark.parametrize("case", sorted(PIPELINES))
def test_broken_pipeline_folder_is_refused_naming_the_file(
    folders: dict[str, Path], tmp_path: Path, case: str
) -> None:
    base, edit, match = PIPELINES[case]
    bad = _broken(folders, base, edit, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        hd.load_pipeline_model(tmp_path / base)
    message = str(err.value)
    assert str(bad) in message and match in message, message


@pytest.mark.parametrize("case", sorted(CLIP))
def test_broken_clip_folder_is_refused_naming_the_file(
    folders: dict[str, Path], tmp_path: Path, case: str
) -> None:
    edit, match = CLIP[case]
    bad = _broken(folders, "clip", edit, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_clip_head(tmp_path / "clip", PROMPTS)
    message = str(err.value)
    assert str(bad) in message or str(tmp_path / "clip") in message, message
    assert match in message, message


def test_intact_folders_load(folders: dict[str, Path]) -> None:
    """The checks pass what save_pretrained writes (so each refusal above is its edit's)."""
    assert hd.load_pipeline_model(folders["dit"]).kind == "dit"
    assert hd.load_pipeline_model(folders["unet"]).kind == "unet"
    assert load_clip_head(folders["clip"], PROMPTS).num_classes == len(PROMPTS)


@pytest.mark.parametrize("which", ["model", "classifier"])
def test_cli_names_the_flag_of_a_broken_folder(
    folders: dict[str, Path], tmp_path: Path, which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = "unet" if which == "model" else "clip"
    bad = _broken(folders, base, _write(("unet/" + WEIGHTS) if which == "model" else
                                        "model.safetensors", JUNK), tmp_path)  # fmt: skip
    model = tmp_path / "unet" if which == "model" else folders["unet"]
    guide = ["--classifier", f"clip:{tmp_path / 'clip'}", "--prompt", "a", "--prompt", "b",
             "--scale", "1", "--guidance-form", "mean"]  # fmt: skip
    guide = guide if which == "classifier" else []
    argv = ["sample", "--out", str(tmp_path / "run"), "--model", str(model), "--steps", "2",
            "--num-samples", "1", "--device", "cpu", "--no-progress", *guide]  # fmt: skip
    if which == "model":
        argv += ["--method", "none"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f": error: --{which}: " in err and str(bad) in err, err
