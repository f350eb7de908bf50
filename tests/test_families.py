"""The model-family registry's contract, checked for every family in ``FAMILIES``.

Each family has a tiny input here (a new family adds one, or this test fails): it is claimed by
its own family and by no other listed before the fallback; a configuration of it resolves
(the family's default sampler) and refuses every field another family owns, naming it; it
builds and samples; and ``files_sha256`` identifies the files' contents: one changed byte of a
weight file, under the same name, is another model.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fguide.families import FAMILIES, build_components, find_family
from fguide.models.presets import create_model
from fguide.params import ParamError
from fguide.sampling import SampleConfig, resolve_config, sample_batch

TESTS = Path(__file__).resolve().parent
ADM_FLAGS = (
    "image_size=8 num_channels=32 num_res_blocks=1 channel_mult=1,2 attention_resolutions=4 "
    "num_head_channels=32 learn_sigma=True"
)
# A value for a field each family owns (set in another family's configuration: refused).
OWNED_VALUES: dict[str, Any] = {
    "model_preset": "64x64_diffusion",
    "model_flags": "image_size=8",
    "cfg_scale": 2.0,
    "cfg_channels": 3,
    "dit_network": "dit",
    "guidance_form": "mean",
    "guidance_microbatch": 2,
    "negative_prompt": "blurry",
    "guide_prompts": ("a cat",),
    "guide_prompt_file": "prompts.txt",
}


def _adm(folder: Path) -> tuple[Path, dict[str, Any]]:
    torch.manual_seed(0)
    path = folder / "adm.pt"
    torch.save(create_model(**dict(kv.split("=") for kv in ADM_FLAGS.split())).state_dict(), path)
    return path, {"model_flags": ADM_FLAGS}


def _nvlabs(folder: Path) -> tuple[Path, dict[str, Any]]:
    path = folder / "edm.pkl"
    shutil.copy(TESTS / "reference" / "edm_tiny_snapshot.pkl", path)  # pickled by NVlabs' code
    return path, {}


def _diffusers(folder: Path) -> tuple[Path, dict[str, Any]]:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    path = folder / "pipeline"
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path, {}


def _stable_diffusion(folder: Path) -> tuple[Path, dict[str, Any]]:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from sd_folders import build_sd_folder

    return build_sd_folder(folder / "sd"), {"prompts": ("a red fox",)}


TINY: dict[str, Callable[[Path], tuple[Path, dict[str, Any]]]] = {
    "adm": _adm,
    "nvlabs": _nvlabs,
    "diffusers": _diffusers,
    "stable-diffusion": _stable_diffusion,
}
NAMES = [family.name for family in FAMILIES]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every registered family's tiny input and the settings it needs."""
    missing = [name for name in NAMES if name not in TINY]
    assert not missing, f"families without a tiny input in this test: {missing}"
    return {name: TINY[name](tmp_path_factory.mktemp(name)) for name in NAMES}


def _config(out: Path, model: Path, **kw: Any) -> SampleConfig:
    return SampleConfig(
        out=out, model=model, method="none", steps="2", num_samples=1, device="cpu", **kw
    )


def test_each_input_is_claimed_by_its_family_only(
    tiny: dict[str, tuple[Path, dict[str, Any]]],
) -> None:
    fallback = FAMILIES[-1]
    for family in FAMILIES:
        path = tiny[family.name][0]
        assert family.claims(path) and find_family(path) is family
        for other in FAMILIES:
            if other is not family and other is not fallback:
                assert not other.claims(path), (other.name, family.name)


@pytest.mark.parametrize("name", NAMES)
def test_resolve_build_and_sample(
    name: str, tiny: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path
) -> None:
    path, extra = tiny[name]
    family = find_family(path)
    config = resolve_config(_config(tmp_path / "run", path, **extra))
    assert config.sampler == family.default_sampler
    comp = build_components(config, "cpu")
    x = sample_batch(comp, config, [0], None)
    assert x.shape == (1, 3, comp.image_size, comp.image_size)
    assert bool(torch.isfinite(x).all())
    assert comp.info["model"].get("family", "adm") == family.name


@pytest.mark.parametrize("field", sorted(OWNED_VALUES))
def test_a_field_one_family_owns_is_refused_for_the_others(
    field: str, tiny: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path
) -> None:
    owners = [f.name for f in FAMILIES if f.fields is not None and field in f.fields.names]
    assert owners, field  # several may own one (CFG: DiT and Stable Diffusion)
    for name in NAMES:
        if name in owners:
            continue
        path, extra = tiny[name]
        with pytest.raises(ParamError) as err:
            resolve_config(_config(tmp_path / "run", path, **extra, **{field: OWNED_VALUES[field]}))
        assert field in err.value.params, (name, str(err.value))


def test_every_owned_field_is_in_this_test() -> None:
    owned = {n for f in FAMILIES if f.fields is not None for n in f.fields.names}
    assert owned == set(OWNED_VALUES)


@pytest.mark.parametrize("name", NAMES)
def test_files_sha256_is_the_files_contents(
    name: str, tiny: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path
) -> None:
    source = tiny[name][0]
    path = tmp_path / source.name
    if source.is_dir():
        shutil.copytree(source, path)
    else:
        shutil.copy(source, path)
    family = find_family(path)
    before = family.files_sha256(path)
    assert family.files_sha256(path) == before
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    weights = max(files, key=lambda p: p.stat().st_size)  # the weight file, same name
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    assert family.files_sha256(path) != before
