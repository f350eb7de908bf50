"""Stable Diffusion pipeline folders: the layout check, the components' loading (offline,
safetensors only) and the files that identify the model.

A folder in the layout ``StableDiffusionPipeline.save_pretrained`` or
``StableDiffusionXLPipeline.save_pretrained`` writes: ``model_index.json`` (whose
``_class_name`` names the pipeline), ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` (SDXL also ``text_encoder_2/``, ``tokenizer_2/``). The UNet and the VAE load
through :mod:`fguide.models.hf_diffusers`' component loader (which refuses pickled ``.bin``
weights); the text encoders likewise from safetensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fguide.models import hf_diffusers as hd
from fguide.models.hf_files import check_clip_text_folder

__all__ = [
    "SD_LAYOUT",
    "SDKind",
    "check_index",
    "check_unet",
    "latent_size",
    "load_text_encoder",
    "load_tokenizer",
    "load_vae",
    "scheduler_config",
    "sd_pipeline_files",
    "sd_pipeline_kind",
]

SDKind = Literal["sd", "sdxl"]
_PIPELINES: dict[str, SDKind] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
}
SD_LAYOUT = (
    "a folder in the layout StableDiffusionPipeline.save_pretrained or "
    "StableDiffusionXLPipeline.save_pretrained writes (model_index.json, unet/, vae/, "
    "text_encoder/, tokenizer/, scheduler/; SDXL also text_encoder_2/, tokenizer_2/)"
)
# (component, library, accepted class names)
_COMPONENTS: dict[SDKind, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    "sd": (
        ("unet", "diffusers", ("UNet2DConditionModel",)),
        ("vae", "diffusers", ("AutoencoderKL",)),
        ("text_encoder", "transformers", ("CLIPTextModel",)),
        ("tokenizer", "transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
        ("scheduler", "diffusers", ()),
    ),
}
_COMPONENTS["sdxl"] = _COMPONENTS["sd"] + (
    ("text_encoder_2", "transformers", ("CLIPTextModelWithProjection",)),
    ("tokenizer_2", "transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
)


def sd_pipeline_kind(path: str | Path) -> SDKind | None:
    """``"sd"`` or ``"sdxl"`` when ``path`` holds a model_index.json of a Stable Diffusion
    (XL) pipeline, else None: a cheap probe (one small JSON file) for choosing the family."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = hd.read_pipeline_json(index).get("_class_name")
    except ValueError:
        return None
    return _PIPELINES.get(name) if isinstance(name, str) else None


def check_index(root: Path) -> tuple[SDKind, dict[str, Any]]:
    """The pipeline kind and model_index.json; one-line errors naming the expected layout."""
    if not root.is_dir():
        raise FileNotFoundError(f"model: pipeline folder not found: {root}")
    if not hd.is_pipeline_dir(root):
        raise ValueError(f"model: {root} has no model_index.json; expected {SD_LAYOUT}")
    index = hd.read_pipeline_json(root / "model_index.json")
    name = index.get("_class_name")
    kind = _PIPELINES.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"model: {root} is a {name!r} folder; expected {SD_LAYOUT}")
    for comp, lib, classes in _COMPONENTS[kind]:
        entry = index.get(comp)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == lib):
            raise ValueError(
                f"model: {root}/model_index.json has no {comp!r}; expected {SD_LAYOUT}"
            )
        if classes and entry[1] not in classes:
            raise ValueError(
                f"model: {root}/model_index.json: {comp} is a {entry[1]}; expected "
                f"{' or '.join(classes)}"
            )
        if not (root / comp).is_dir():
            raise FileNotFoundError(f"model: {root}/{comp}/ is missing; expected {SD_LAYOUT}")
    return kind, index


def load_text_encoder(cls: Any, root: Path, sub: str, dev: torch.device, dtype: torch.dtype) -> Any:
    """A transformers text encoder from ``root/sub``, offline, safetensors only."""
    folder = root / sub
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{folder}: no .safetensors weights (fguide never loads pickled .bin files; convert "
            "them with safetensors first)"
        )
    check_clip_text_folder(cls, folder)
    net = cls.from_pretrained(
        root, subfolder=sub, local_files_only=True, use_safetensors=True, dtype=dtype
    )
    return net.to(device=dev).eval().requires_grad_(False)


def load_tokenizer(root: Path, sub: str) -> Any:
    folder = root / sub
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not (has_bpe or (folder / "tokenizer.json").is_file()):
        # CLIPTokenizer would silently build an empty vocabulary: refuse instead
        raise FileNotFoundError(
            f"{folder}: no tokenizer (vocab.json + merges.txt, or tokenizer.json)"
        )
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(root, subfolder=sub, local_files_only=True)


def scheduler_config(root: Path) -> tuple[dict[str, Any], np.ndarray, str]:
    """(config, training betas, prediction type) of ``root/scheduler``."""
    file = root / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (the betas are read from it)")
    config = hd.read_pipeline_json(file)
    pred = config.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"{file}: prediction_type {pred!r} is not supported (epsilon, v_prediction)"
        )
    eps_config = {k: v for k, v in config.items() if k != "prediction_type"}
    return config, hd.scheduler_betas(eps_config, str(file)), str(pred)


def sd_pipeline_files(path: str | Path) -> list[Path]:
    """The files that define an SD pipeline folder's model, sorted: model_index.json, each used
    component's config and the safetensors weights it loads (or its shard index and shards),
    the tokenizer files and the scheduler config. A run's identity checksums these."""
    root = Path(path)
    kind, _ = check_index(root)
    files = [root / "model_index.json", root / "scheduler" / "scheduler_config.json"]
    for comp, lib, _classes in _COMPONENTS[kind]:
        folder = root / comp
        if comp.startswith("tokenizer"):
            files += sorted(f for f in folder.iterdir() if f.suffix in (".json", ".txt"))
        elif comp != "scheduler":
            name = "diffusion_pytorch_model" if lib == "diffusers" else "model"
            files += [folder / "config.json"] + _weight_files(folder, name)
    return sorted(files)


def _weight_files(folder: Path, name: str) -> list[Path]:
    index = folder / f"{name}.safetensors.index.json"
    if index.is_file():
        shards = hd.read_pipeline_json(index).get("weight_map", {})
        return [index] + sorted({folder / Path(str(v)).name for v in shards.values()})
    return [folder / f"{name}.safetensors"]


def load_vae(cls: Any, root: Path, dev: torch.device, dtype: torch.dtype) -> Any:
    cfg = hd.read_pipeline_json(root / "vae" / "config.json")
    for key in ("latents_mean", "latents_std"):
        if cfg.get(key) is not None:
            raise ValueError(f"{root}/vae/config.json: {key} is not supported")
    upcast = dtype == torch.float16 and bool(cfg.get("force_upcast", True))
    return hd.load_component(cls, root, "vae", dev, torch.float32 if upcast else dtype)


def latent_size(unet: Any, vae: Any, factor: int, image_size: int | None, root: Path) -> int:
    size = unet.config.sample_size
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise ValueError(f"{root}/unet: non-square sample_size {size} is not supported")
        size = int(size[0])
    if image_size is None:
        return int(size)
    if image_size < factor or image_size % factor:
        raise ValueError(f"--image-size must be a positive multiple of {factor}; got {image_size}")
    return image_size // factor


def check_unet(unet: Any, vae: Any, encoders: list[Any], kind: SDKind, root: Path) -> None:
    """The UNet fits the VAE and the text encoders (one-line errors instead of shape errors)."""
    cfg = unet.config
    c = int(cfg.in_channels)
    if int(cfg.out_channels) != c or int(vae.config.latent_channels) != c:
        raise ValueError(
            f"{root}/unet: in/out channels {c}/{cfg.out_channels} and the VAE's latent channels "
            f"{vae.config.latent_channels} must be equal"
        )
    width = sum(int(e.config.hidden_size) for e in encoders)
    if int(cfg.cross_attention_dim) != width:
        raise ValueError(
            f"{root}/unet: cross_attention_dim {cfg.cross_attention_dim} does not match the "
            f"text encoders' width {width}"
        )
    for key in ("time_cond_proj_dim", "class_embed_type", "num_class_embeds"):
        if getattr(cfg, key, None) is not None:
            raise ValueError(f"{root}/unet: {key} is not supported for text-to-image sampling")
    added = getattr(cfg, "addition_embed_type", None)
    if kind == "sd" and added is not None:
        raise ValueError(f"{root}/unet: addition_embed_type {added!r} needs an SDXL pipeline")
    if kind == "sdxl":
        want = int(cfg.addition_time_embed_dim) * 6 + int(encoders[1].config.projection_dim)
        got = int(unet.add_embedding.linear_1.in_features)
        if added != "text_time" or got != want:
            raise ValueError(
                f"{root}/unet: SDXL needs addition_embed_type 'text_time' with an added "
                f"embedding of {want} inputs; got {added!r} with {got}"
            )
