"""A Stable Diffusion folder whose text encoder or UNet is malformed is refused before
transformers or diffusers reads it: one error naming the file and what is wrong (as the DiT,
UNet2DModel and CLIP folders of test_hostile_folders.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sd_folders import build_sd_folder, build_sdxl_folder, one_thread
from test_hostile_folders import JUNK, _json, _weights, _write

from fguide.models.stable_diffusion import load_sd_pipeline

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("sd-hostile")
    yield {"sd": build_sd_folder(root / "sd"), "sdxl": build_sdxl_folder(root / "sdxl")}


TE, TE2, W = "text_encoder/", "text_encoder_2/", "model.safetensors"
# case: (folder, edit returning the broken file, what the message must say)
CASES: dict[str, tuple[str, Callable[[Path], str], str]] = {
    "te_weights_junk": ("sd", _write(TE + W, JUNK), "not a safetensors file"),
    "te_missing_tensor": ("sd", _weights(TE + W, drop=2), "2 missing"),
    "te_extra_tensor": ("sd", _weights(TE + W, add=True), "1 unexpected"),
    "te_config_not_json": ("sd", _write(TE + "config.json", b"{nope"), "not readable JSON"),
    "te_list_for_int": ("sd", _json(TE + "config.json", hidden_size=[32]), "hidden_size is [32]"),
    "te_huge_vocab": ("sd", _json(TE + "config.json", vocab_size=10**9), "out of range"),
    "te_other_shapes": ("sd", _json(TE + "config.json", intermediate_size=64), "another shape"),
    "te2_missing_tensor": ("sdxl", _weights(TE2 + W, drop=1), "1 missing"),
    "te2_projection_str": ("sdxl", _json(TE2 + "config.json", projection_dim="16"), 'is "16"'),
    "unet_cross_attention_str": (
        "sd",
        _json("unet/config.json", cross_attention_dim="32"),
        'cross_attention_dim is "32"',
    ),
    "unet_time_embed_list": (
        "sdxl",
        _json("unet/config.json", addition_time_embed_dim=[8]),
        "addition_time_embed_dim is [8]",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_sd_folder_is_refused_naming_the_file(
    folders: dict[str, Path], tmp_path: Path, case: str
) -> None:
    base, edit, match = CASES[case]
    folder = tmp_path / base
    shutil.copytree(folders[base], folder)
    bad = folder / edit(folder)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_sd_pipeline(folder)
    message = str(err.value)
    assert str(bad) in message and match in message, message


@pytest.mark.parametrize("base", ["sd", "sdxl"])
def test_intact_sd_folders_load(folders: dict[str, Path], base: str) -> None:
    """The checks pass what save_pretrained writes (so each refusal above is its edit's)."""
    assert load_sd_pipeline(folders[base]).info()["kind"] == base
