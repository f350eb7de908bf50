"""Checks of a diffusers or transformers model folder before the library builds from it.

diffusers and transformers trust their folders: a config value of the wrong type ends in a
traceback deep inside a constructor, a huge one allocates what it asks for, a weight file that
lacks tensors leaves them randomly initialised (with a warning only), and one whose tensors do
not fit ends in a long traceback. fguide checks first, so that each problem is one error naming
the file and what it should be:

* JSON files (:func:`read_json_object`): a JSON object; values bounded (integers within
  ±2**20 unless a rule says otherwise, lists of at most 64 entries, nesting at most 4 deep,
  strings at most 4096 characters); :func:`check_fields` checks the fields fguide relies on
  (type and range);
* safetensors files (:func:`safetensors_shapes`): the header is read and checked by fguide
  (its declared length against the file, each tensor's byte range inside the data and equal to
  its shape times its element size) before the library maps the file;
* the network (:func:`check_weights`): built from the config on the ``meta`` device (nothing is
  allocated), its state dict compared with the weight files' tensors: every key present, every
  shape equal, no tensor the network does not have.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MAX_INT",
    "SCHEDULER_RULES",
    "check_clip_folder",
    "check_clip_text_folder",
    "check_diffusers_component",
    "check_fields",
    "check_weights",
    "meta_build",
    "read_json_object",
    "safetensors_shapes",
]

MAX_INT = 1 << 20
_MAX_LIST, _MAX_DEPTH, _MAX_STR = 64, 4, 4096
_MAX_HEADER = 100 << 20  # bytes of a safetensors header (real ones: tens of KiB)
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

Rule = tuple[str, float, float]
"""(kind, low, high): ``int``, ``num``, ``bool``, ``str``, ``obj``, ``ints`` / ``nums`` (lists
of them), or alternatives joined by ``|`` (``int|none``)."""


def _bounded(value: Any, depth: int = 0) -> str | None:
    """Why a parsed JSON value breaks the generic bounds, or None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return None if abs(value) <= MAX_INT else f"an integer out of range ({value:.3g})"
    if isinstance(value, float):
        return None if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return None if len(value) <= _MAX_STR else f"a string of {len(value)} characters"
    if depth >= _MAX_DEPTH:
        return f"values nested more than {_MAX_DEPTH} deep"
    items = list(value.values()) if isinstance(value, dict) else value
    if isinstance(value, list) and len(value) > _MAX_LIST:
        return f"a list of {len(value)} entries (at most {_MAX_LIST})"
    return next((r for r in (_bounded(v, depth + 1) for v in items) if r), None)


def read_json_object(
    path: Path, expected: str, bounded: bool = True, exempt: Iterable[str] = ()
) -> dict[str, Any]:
    """The JSON object in ``path``; ``ValueError`` naming the file and ``expected`` otherwise.

    ``bounded``: values within the generic bounds of the module docstring, except the
    top-level keys in ``exempt`` (e.g. a scheduler's ``trained_betas``, checked on their own).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; expected {expected}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{path}: not readable JSON ({reason}); expected {expected}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: a JSON {type(data).__name__}, not an object; expected {expected}"
        )
    if bounded:
        for key, value in data.items():
            problem = None if key in exempt else _bounded(value)
            if problem:
                raise ValueError(f"{path}: {key!r} holds {problem}; expected {expected}")
    return data


def _fits(value: Any, kind: str, low: float, high: float) -> bool:
    if "|" in kind:
        return any(_fits(value, k, low, high) for k in kind.split("|"))
    if kind == "none":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "obj":
        return isinstance(value, dict)
    if kind in ("ints", "nums"):
        return (
            isinstance(value, list)
            and 0 < len(value) <= _MAX_LIST
            and all(_fits(v, kind[:-1], low, high) for v in value)
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if kind == "int" and not isinstance(value, int):
        return False
    return bool(low <= value <= high)


_WORDS = {"int": "an integer", "num": "a number", "ints": "a list of integers", "none": "null",
          "bool": "true or false", "str": "a string", "obj": "an object",
          "nums": "a list of numbers"}  # fmt: skip


def check_fields(
    config: Mapping[str, Any],
    rules: Mapping[str, Rule],
    where: Path | str,
    required: Iterable[str] = (),
) -> None:
    """``ValueError`` naming ``where`` and the field when a field breaks its rule (or a
    ``required`` one is missing)."""
    for key in required:
        if key not in config:
            raise ValueError(f"{where}: the field {key!r} is missing")
    for key, (kind, low, high) in rules.items():
        if key in config and not _fits(config[key], kind, low, high):
            shown = json.dumps(config[key])
            shown = shown if len(shown) <= 40 else shown[:40] + "…"
            what = " or ".join(_WORDS[k] for k in kind.split("|"))
            within = (
                "" if kind in ("bool", "str", "str|none", "obj") else f" in [{low:g}, {high:g}]"
            )
            raise ValueError(f"{where}: {key} is {shown}; expected {what}{within}")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of a safetensors file, its header checked against the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, _MAX_HEADER):
            raise ValueError(
                f"{path}: not a safetensors file (its header declares {n} bytes; the file has "
                f"{size}); expected the model's weights saved by save_pretrained"
            )
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"{path}: its safetensors header is not JSON ({err})") from None
    data, out = size - 8 - n, {}
    if not isinstance(header, dict):
        raise ValueError(f"{path}: its safetensors header is not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (
                all(type(s) is int and s >= 0 for s in shape)
                and type(begin) is int
                and type(end) is int
                and 0 <= begin <= end <= data
                and end - begin == math.prod(shape) * _ITEMSIZE[dtype]
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"{path}: tensor {str(name)[:80]!r} has a malformed entry or lies outside the "
                f"file's {data} data bytes (truncated or damaged)"
            )
        out[name] = tuple(shape)
    return out


def meta_build(build: Callable[[], nn.Module], where: Path) -> nn.Module:
    """``build()`` on the ``meta`` device (no memory); a config it refuses names ``where``."""
    try:
        with torch.device("meta"):
            return build()
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(
            f"{where}: the library cannot build the network from it ({reason})"
        ) from err


def check_weights(
    net: nn.Module,
    files: list[Path],
    config: Path,
    rename: Callable[[dict[str, Any]], Any] | None = None,
    ignore: Callable[[str], bool] = lambda key: False,
) -> None:
    """``ValueError`` naming the weight files unless their tensors are exactly ``net``'s state
    dict (keys and shapes; ``rename`` maps legacy names as the library does on loading,
    ``ignore`` marks file keys the library drops)."""
    got: dict[str, Any] = {}
    for f in files:
        got.update(safetensors_shapes(f))
    if rename is not None:
        rename(got)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected and not ignore(k)]
    wrong = [f"{k}: file {list(got[k])} vs config {list(s)}" for k, s in expected.items()
             if k in got and tuple(got[k]) != s]  # fmt: skip
    if missing or unexpected or wrong:
        names = ", ".join(str(f) for f in files)
        raise ValueError(
            f"{names}: the weights do not fit the network {config} describes: "
            f"{len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}, {len(wrong)} of another shape {wrong[:3]}"
        )


# -- diffusers pipeline folders -------------------------------------------------------------------

SCHEDULER_RULES: dict[str, Rule] = {
    "num_train_timesteps": ("int", 2, 100_000),
    "beta_start": ("num", 0.0, 1.0),
    "beta_end": ("num", 0.0, 1.0),
    "beta_schedule": ("str", 0, 0),
    "prediction_type": ("str", 0, 0),
    "variance_type": ("str|none", 0, 0),
    "clip_sample": ("bool", 0, 0),
    "clip_sample_range": ("num", 0.0, 1e6),
    "thresholding": ("bool", 0, 0),
    "rescale_betas_zero_snr": ("bool", 0, 0),
}
"""The scheduler fields fguide reads (``trained_betas`` is checked against the step count)."""

_COMPONENT_RULES: dict[str, dict[str, Rule]] = {
    "transformer": {
        "in_channels": ("int", 1, 64),
        "out_channels": ("int|none", 1, 128),
        "sample_size": ("int", 1, 1024),
        "patch_size": ("int", 1, 64),
        "num_layers": ("int", 1, 256),
        "num_attention_heads": ("int", 1, 1024),
        "attention_head_dim": ("int", 1, 4096),
        "num_embeds_ada_norm": ("int", 1, 100_000),
    },
    "vae": {
        "in_channels": ("int", 1, 64),
        "out_channels": ("int", 1, 64),
        "latent_channels": ("int", 1, 64),
        "block_out_channels": ("ints", 1, 8192),
        "layers_per_block": ("int", 1, 64),
        "norm_num_groups": ("int", 1, 1024),
        "scaling_factor": ("num", 1e-6, 1e6),
    },
    "unet": {
        "in_channels": ("int", 1, 64),
        "out_channels": ("int", 1, 128),
        "sample_size": ("int|ints", 1, 4096),
        "block_out_channels": ("ints", 1, 8192),
        "layers_per_block": ("int", 1, 64),
        "norm_num_groups": ("int", 1, 1024),
        "num_class_embeds": ("int|none", 1, 100_000),
        # UNet2DConditionModel's (Stable Diffusion): cross-attention and SDXL's added embeddings
        "cross_attention_dim": ("int|ints|none", 1, 16384),
        "attention_head_dim": ("int|ints|none", 1, 4096),
        "num_attention_heads": ("int|ints|none", 1, 1024),
        "transformer_layers_per_block": ("int|ints", 1, 256),
        "addition_time_embed_dim": ("int|none", 1, 16384),
        "projection_class_embeddings_input_dim": ("int|none", 1, MAX_INT),
    },
}
"""Fields of a component's ``config.json`` fguide reads, or whose size sets what is allocated."""
_MAX_POS_EMBED = 1 << 26  # DiT's sin-cos table: (sample_size / patch)^2 x width, not in the file


def _weight_files(folder: Path, name: str) -> list[Path]:
    """The safetensors files the library loads from ``folder`` (one, or a sharded index)."""
    index = folder / f"{name}.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "a safetensors shard index", bounded=False)
        shards = weight_map.get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(v, str) for v in shards.values()):
            raise ValueError(f"{index}: no weight_map of file names")
        files = sorted({folder / Path(v).name for v in shards.values()})
    else:
        files = [folder / f"{name}.safetensors"]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(
                f"{f}: missing (fguide loads the safetensors weights save_pretrained writes)"
            )
    return files


def check_diffusers_component(cls: Any, folder: Path) -> None:
    """Check a pipeline component folder (``transformer``, ``vae``, ``unet``) as the module
    docstring says, before diffusers reads it."""
    cfg_file = folder / "config.json"
    config = read_json_object(cfg_file, f"the config of a diffusers {cls.__name__}")
    check_fields(config, _COMPONENT_RULES.get(folder.name, {}), cfg_file)
    sample = config.get("sample_size")
    if isinstance(sample, list) and len(sample) != 2:
        raise ValueError(f"{cfg_file}: sample_size is a list of {len(sample)}; expected [h, w]")
    if folder.name == "transformer":
        heads, dim = config.get("num_attention_heads", 16), config.get("attention_head_dim", 72)
        cells = (config.get("sample_size", 32) // config.get("patch_size", 2)) ** 2
        if cells * heads * dim > _MAX_POS_EMBED:
            raise ValueError(
                f"{cfg_file}: sample_size, patch_size and width ask for a position table of "
                f"{cells * heads * dim} values (at most {_MAX_POS_EMBED})"
            )
    net = meta_build(lambda: cls.from_config(config), cfg_file)
    rename = getattr(net, "_fix_state_dict_keys_on_load", None)
    check_weights(net, _weight_files(folder, "diffusion_pytorch_model"), cfg_file, rename)


# -- transformers CLIP folders --------------------------------------------------------------------

_CLIP_TOWER: dict[str, Rule] = {
    "hidden_size": ("int", 1, 16384),
    "intermediate_size": ("int", 1, 65536),
    "num_hidden_layers": ("int", 1, 256),
    "num_attention_heads": ("int", 1, 1024),
}
_CLIP_RULES: dict[str, dict[str, Rule]] = {
    "text_config": {
        **_CLIP_TOWER,
        "vocab_size": ("int", 1, 1_000_000),
        "max_position_embeddings": ("int", 1, 65536),
    },
    "vision_config": {
        **_CLIP_TOWER,
        "image_size": ("int", 1, 4096),
        "patch_size": ("int", 1, 1024),
        "num_channels": ("int", 1, 16),
    },
}


def check_clip_folder(folder: Path) -> Any:
    """Check a transformers CLIP folder's ``config.json`` and safetensors weights (keys and
    shapes against the network the config describes) before transformers reads them; return
    that network, on ``meta``."""
    cfg_file = folder / "config.json"
    config = read_json_object(cfg_file, "the config.json of a transformers CLIPModel")
    check_fields(config, {"projection_dim": ("int", 1, 16384)}, cfg_file)
    for tower, rules in _CLIP_RULES.items():
        sub = config.get(tower, {})
        if not isinstance(sub, dict):
            raise ValueError(f"{cfg_file}: {tower} is not an object")
        check_fields(sub, rules, f"{cfg_file} ({tower})")

    def build() -> nn.Module:
        from transformers import CLIPConfig, CLIPModel  # optional dependency: import on use

        return CLIPModel(CLIPConfig.from_dict(config))

    net = meta_build(build, cfg_file)
    # position_ids are buffers older files saved and transformers drops on loading
    files = _weight_files(folder, "model")
    check_weights(net, files, cfg_file, ignore=lambda k: k.endswith("position_ids"))
    return net


def check_clip_text_folder(cls: Any, folder: Path) -> None:
    """Check a transformers CLIP text encoder folder (``text_encoder``, ``text_encoder_2`` of a
    Stable Diffusion pipeline: a ``CLIPTextModel`` or ``CLIPTextModelWithProjection``) as
    :func:`check_clip_folder` checks a whole CLIP folder, before transformers reads it."""
    cfg_file = folder / "config.json"
    config = read_json_object(cfg_file, f"the config.json of a transformers {cls.__name__}")
    rules: dict[str, Rule] = {
        **_CLIP_RULES["text_config"],
        "projection_dim": ("int", 1, 16384),
    }
    check_fields(config, rules, cfg_file)
    net = meta_build(lambda: cls(cls.config_class.from_dict(config)), cfg_file)
    files = _weight_files(folder, "model")
    check_weights(net, files, cfg_file, ignore=lambda k: k.endswith("position_ids"))
