"""Flag-driven construction of the ADM networks and the official checkpoint presets.

The flags are those of ``openai/guided-diffusion``'s ``script_util.py`` and README, in the
reference's string form where it uses one: ``attention_resolutions="32,16,8"`` lists feature
map *resolutions* (converted to downsample factors ``image_size // r``), ``channel_mult=""``
means the default multipliers for the image size, and booleans/numbers may be given as Python
values or as command-line strings (``"True"``, ``"64"``).

* :func:`create_model` / :func:`create_classifier` build a :class:`~fguide.models.adm.UNetModel`
  / :class:`~fguide.models.adm.EncoderUNetModel` from such flags (missing flags take the
  reference's defaults: :func:`model_and_diffusion_defaults`, :func:`classifier_defaults`);
* :data:`PRESETS` holds every official checkpoint's flags (plus, for the diffusion models, the
  diffusion flags and the README's classifier scale); :func:`build_preset` builds one and
  :func:`preset_state_dict_shapes` gives its state-dict layout cheaply (built on ``meta``).
"""

from __future__ import annotations

import contextlib
import functools
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fguide.models.adm import EncoderUNetModel, UNetModel

__all__ = [
    "NUM_CLASSES",
    "PRESETS",
    "Preset",
    "UnknownPresetError",
    "build_preset",
    "classifier_constructor_kwargs",
    "classifier_defaults",
    "create_classifier",
    "create_model",
    "default_channel_mult",
    "diffusion_defaults",
    "model_and_diffusion_defaults",
    "model_constructor_kwargs",
    "model_defaults",
    "parse_flag_string",
    "preset_info",
    "preset_state_dict_shapes",
    "split_flags",
]

NUM_CLASSES = 1000
"""ImageNet classes of the class-conditional models and the classifiers."""

_URL_ROOT = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"


def model_defaults() -> dict[str, Any]:
    """The UNet flags of the reference's ``model_and_diffusion_defaults()``."""
    return {
        "image_size": 64,
        "num_channels": 128,
        "num_res_blocks": 2,
        "num_heads": 4,
        "num_heads_upsample": -1,
        "num_head_channels": -1,
        "attention_resolutions": "16,8",
        "channel_mult": "",
        "dropout": 0.0,
        "class_cond": False,
        "use_checkpoint": False,
        "use_scale_shift_norm": True,
        "resblock_updown": False,
        "use_fp16": False,
        "use_new_attention_order": False,
        "learn_sigma": False,
    }


def diffusion_defaults() -> dict[str, Any]:
    """The reference's ``diffusion_defaults()`` (the Gaussian-diffusion flags)."""
    return {
        "learn_sigma": False,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
        "timestep_respacing": "",
        "use_kl": False,
        "predict_xstart": False,
        "rescale_timesteps": False,
        "rescale_learned_sigmas": False,
    }


def model_and_diffusion_defaults() -> dict[str, Any]:
    """UNet and diffusion defaults together, as the reference's sampling scripts use them."""
    return {**model_defaults(), **diffusion_defaults()}


def classifier_defaults() -> dict[str, Any]:
    """The reference's ``classifier_defaults()`` (flags of ``create_classifier``)."""
    return {
        "image_size": 64,
        "classifier_use_fp16": False,
        "classifier_width": 128,
        "classifier_depth": 2,
        "classifier_attention_resolutions": "32,16,8",
        "classifier_use_scale_shift_norm": True,
        "classifier_resblock_updown": True,
        "classifier_pool": "attention",
    }


def _classifier_extras() -> dict[str, Any]:
    """Constructor arguments ``create_classifier`` hard-codes, exposed as optional flags."""
    return {
        "channel_mult": "",
        "num_head_channels": 64,
        "num_heads": 1,
        "out_channels": NUM_CLASSES,
        "use_new_attention_order": False,
        "dropout": 0.0,
    }


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """The reference's channel multipliers for ``channel_mult=""`` (sizes 64, 128, 256, 512)."""
    table: dict[int, tuple[float, ...]] = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    }
    if image_size not in table:
        raise ValueError(
            f"image_size {image_size} has no default channel_mult (only {sorted(table)}); "
            "give channel_mult explicitly, e.g. channel_mult='1,2,2'"
        )
    return table[image_size]


# -- flag coercion --------------------------------------------------------------------------

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"flag {name}: expected a boolean (True/False), got {value!r}")


def _to_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"flag {name}: expected an integer, got {value!r}")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"flag {name}: expected an integer, got {value!r}") from None
    if not as_float.is_integer():
        raise ValueError(f"flag {name}: expected an integer, got {value!r}")
    return int(as_float)


def _to_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"flag {name}: expected a number, got {value!r}") from None


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Convert ``value`` to the type of the flag's ``default`` (string forms accepted)."""
    if isinstance(default, bool):
        return _to_bool(name, value)
    if isinstance(default, int):
        return _to_int(name, value)
    if isinstance(default, float):
        return _to_float(name, value)
    return value


def _number_list(name: str, value: str | Sequence[float]) -> list[float]:
    items: Sequence[Any]
    if isinstance(value, str):
        items = [s for s in value.replace(" ", "").split(",") if s]
    else:
        items = list(value)
    out = []
    for s in items:
        try:
            x = float(s)
        except (TypeError, ValueError):
            raise ValueError(f"flag {name}: {value!r} is not a comma-separated list") from None
        out.append(int(x) if x.is_integer() else x)
    return out


def _channel_mult(value: str | Sequence[float], image_size: int) -> list[float]:
    """``""`` -> the default for ``image_size``; ``"1,2,2"`` (or a sequence) -> multipliers."""
    if isinstance(value, str) and not value.strip():
        return list(default_channel_mult(image_size))
    mult = _number_list("channel_mult", value)
    if not mult or any(m <= 0 for m in mult):
        raise ValueError(f"flag channel_mult: expected positive multipliers, got {value!r}")
    return mult


def _attention_factors(name: str, value: str | Sequence[int], image_size: int) -> list[int]:
    """Resolutions (``"32,16,8"``) -> downsample factors ``image_size // r`` (reference)."""
    res = _number_list(name, value)
    if not res or any(r <= 0 or not float(r).is_integer() for r in res):
        raise ValueError(f"flag {name}: expected positive integer resolutions, got {value!r}")
    return [image_size // int(r) for r in res]


def _resolve(flags: Mapping[str, Any], defaults: Mapping[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise TypeError(f"{what}: unknown flag(s) {unknown}; valid flags: {sorted(defaults)}")
    return {k: _coerce(k, flags.get(k, d), d) for k, d in defaults.items()}


# -- create_model / create_classifier ------------------------------------------------------


def model_constructor_kwargs(**flags: Any) -> dict[str, Any]:
    """:class:`UNetModel` constructor arguments from ``create_model`` flags.

    ``learn_sigma`` -> ``out_channels`` 6 (else 3), ``class_cond`` -> ``num_classes`` 1000,
    ``num_channels`` -> ``model_channels``, ``attention_resolutions`` -> downsample factors.
    """
    f = _resolve(flags, model_defaults(), "create_model")
    size = f["image_size"]
    return {
        "image_size": size,
        "in_channels": 3,
        "model_channels": f["num_channels"],
        "out_channels": 6 if f["learn_sigma"] else 3,
        "num_res_blocks": f["num_res_blocks"],
        "attention_resolutions": _attention_factors(
            "attention_resolutions", f["attention_resolutions"], size
        ),
        "dropout": f["dropout"],
        "channel_mult": _channel_mult(f["channel_mult"], size),
        "conv_resample": True,
        "dims": 2,
        "num_classes": NUM_CLASSES if f["class_cond"] else None,
        "use_checkpoint": f["use_checkpoint"],
        "use_fp16": f["use_fp16"],
        "num_heads": f["num_heads"],
        "num_head_channels": f["num_head_channels"],
        "num_heads_upsample": f["num_heads_upsample"],
        "use_scale_shift_norm": f["use_scale_shift_norm"],
        "resblock_updown": f["resblock_updown"],
        "use_new_attention_order": f["use_new_attention_order"],
    }


def classifier_constructor_kwargs(**flags: Any) -> dict[str, Any]:
    """:class:`EncoderUNetModel` constructor arguments from ``create_classifier`` flags.

    The reference's flags (``classifier_width``, ``classifier_depth``, ...) plus the values
    ``create_classifier`` hard-codes, which may be overridden here: ``channel_mult`` (``""``:
    default for the size), ``num_head_channels`` 64, ``num_heads`` 1, ``out_channels`` 1000,
    ``use_new_attention_order`` False and ``dropout`` 0.
    """
    f = _resolve(flags, {**classifier_defaults(), **_classifier_extras()}, "create_classifier")
    size = f["image_size"]
    return {
        "image_size": size,
        "in_channels": 3,
        "model_channels": f["classifier_width"],
        "out_channels": f["out_channels"],
        "num_res_blocks": f["classifier_depth"],
        "attention_resolutions": _attention_factors(
            "classifier_attention_resolutions", f["classifier_attention_resolutions"], size
        ),
        "dropout": f["dropout"],
        "channel_mult": _channel_mult(f["channel_mult"], size),
        "conv_resample": True,
        "dims": 2,
        "use_checkpoint": False,
        "use_fp16": f["classifier_use_fp16"],
        "num_heads": f["num_heads"],
        "num_head_channels": f["num_head_channels"],
        "num_heads_upsample": -1,
        "use_scale_shift_norm": f["classifier_use_scale_shift_norm"],
        "resblock_updown": f["classifier_resblock_updown"],
        "use_new_attention_order": f["use_new_attention_order"],
        "pool": f["classifier_pool"],
    }


def create_model(**flags: Any) -> UNetModel:
    """Build the ADM UNet from ``create_model`` flags (reference names, string forms allowed).

    Example: ``create_model(image_size=64, num_channels=192, attention_resolutions="32,16,8",
    class_cond="True", learn_sigma=True)``. Missing flags take :func:`model_defaults`.
    """
    return UNetModel(**model_constructor_kwargs(**flags))


def create_classifier(**flags: Any) -> EncoderUNetModel:
    """Build the noise-aware classifier from ``create_classifier`` flags.

    Missing flags take :func:`classifier_defaults`; see :func:`classifier_constructor_kwargs`
    for the optional extra flags.
    """
    return EncoderUNetModel(**classifier_constructor_kwargs(**flags))


def parse_flag_string(text: str) -> dict[str, str]:
    """``"--image_size 64 --class_cond True"`` -> ``{"image_size": "64", "class_cond": "True"}``.

    A flag followed by another flag (or by nothing) gets the empty string, as in the README's
    ``--channel_mult`` with no value.
    """
    tokens = shlex.split(text)
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ValueError(f"expected a --flag, got {tok!r} in {text!r}")
        name, eq, val = tok[2:].partition("=")
        if eq:
            out[name] = val
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            out[name] = tokens[i + 1]
            i += 2
        else:
            out[name] = ""
            i += 1
    return out


def split_flags(flags: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Sort a sampling command line's flags into resolved groups.

    Returns ``{"model": ..., "diffusion": ..., "classifier": ..., "other": ...}``: the first
    three are complete (defaults overridden by ``flags``, string forms converted), ``other``
    keeps the remaining flags (``classifier_scale``, ``batch_size``, ...) as given.
    ``image_size`` goes to the model and the classifier, ``learn_sigma`` to the model and
    the diffusion, as in the reference's scripts.
    """
    groups = {
        "model": model_defaults(),
        "diffusion": diffusion_defaults(),
        "classifier": classifier_defaults(),
    }
    out: dict[str, dict[str, Any]] = {
        g: {k: _coerce(k, flags.get(k, d), d) for k, d in defaults.items()}
        for g, defaults in groups.items()
    }
    known = set().union(*groups.values())
    out["other"] = {k: v for k, v in flags.items() if k not in known}
    return out


# -- official presets -----------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """One official checkpoint: its flags, the diffusion it was trained with, its file.

    ``flags`` are the resolved ``create_model`` / ``create_classifier`` flags (defaults
    overridden by the README's). ``diffusion_flags`` and ``readme_classifier_scale`` (the
    classifier scale the README samples with) are set for the diffusion models only.
    """

    name: str
    kind: str  # "diffusion" or "classifier"
    flags: Mapping[str, Any]
    diffusion_flags: Mapping[str, Any] | None = None
    readme_classifier_scale: float | None = None
    url: str = field(default="")

    def constructor_kwargs(self) -> dict[str, Any]:
        """The network constructor's arguments implied by :attr:`flags`."""
        if self.kind == "diffusion":
            return model_constructor_kwargs(**self.flags)
        return classifier_constructor_kwargs(**self.flags)

    def build(self, device: torch.device | str | None = None) -> nn.Module:
        """Build the network (randomly initialised); ``device="meta"`` allocates nothing."""
        cls = UNetModel if self.kind == "diffusion" else EncoderUNetModel
        ctx = torch.device(device) if device is not None else contextlib.nullcontext()
        with ctx:
            return cls(**self.constructor_kwargs())


def _diffusion_preset(
    name: str, readme: Mapping[str, Any], noise_schedule: str, scale: float
) -> Preset:
    flags = {**model_defaults(), **readme}
    diffusion = {
        **diffusion_defaults(),
        "learn_sigma": flags["learn_sigma"],
        "noise_schedule": noise_schedule,
        "diffusion_steps": 1000,
    }
    return Preset(name, "diffusion", flags, diffusion, scale, _URL_ROOT + name + ".pt")


def _classifier_preset(name: str, readme: Mapping[str, Any]) -> Preset:
    return Preset(
        name, "classifier", {**classifier_defaults(), **readme}, url=_URL_ROOT + name + ".pt"
    )


_COMMON: dict[str, Any] = {
    "attention_resolutions": "32,16,8",
    "learn_sigma": True,
    "resblock_updown": True,
    "use_fp16": True,
    "use_scale_shift_norm": True,
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _diffusion_preset(
            "64x64_diffusion",
            {
                **_COMMON,
                "class_cond": True,
                "dropout": 0.1,
                "image_size": 64,
                "num_channels": 192,
                "num_head_channels": 64,
                "num_res_blocks": 3,
                "use_new_attention_order": True,
            },
            "cosine",
            1.0,
        ),
        _diffusion_preset(
            "128x128_diffusion",
            {
                **_COMMON,
                "class_cond": True,
                "image_size": 128,
                "num_channels": 256,
                "num_heads": 4,
                "num_res_blocks": 2,
            },
            "linear",
            0.5,
        ),
        _diffusion_preset(
            "256x256_diffusion",
            {
                **_COMMON,
                "class_cond": True,
                "image_size": 256,
                "num_channels": 256,
                "num_head_channels": 64,
                "num_res_blocks": 2,
            },
            "linear",
            1.0,
        ),
        _diffusion_preset(
            "256x256_diffusion_uncond",
            {
                **_COMMON,
                "class_cond": False,
                "image_size": 256,
                "num_channels": 256,
                "num_head_channels": 64,
                "num_res_blocks": 2,
            },
            "linear",
            10.0,
        ),
        _diffusion_preset(
            "512x512_diffusion",
            {
                **_COMMON,
                "class_cond": True,
                "image_size": 512,
                "num_channels": 256,
                "num_head_channels": 64,
                "num_res_blocks": 2,
                "use_fp16": False,  # the README's 512 flags (the other models: True)
            },
            "linear",
            4.0,
        ),
        _classifier_preset("64x64_classifier", {"image_size": 64, "classifier_depth": 4}),
        _classifier_preset("128x128_classifier", {"image_size": 128}),
        _classifier_preset("256x256_classifier", {"image_size": 256}),
        _classifier_preset("512x512_classifier", {"image_size": 512}),
    )
}
"""Every official ``openai/guided-diffusion`` ImageNet checkpoint, by file stem."""


class UnknownPresetError(KeyError, ValueError):
    """An unknown preset name; the message lists the valid ones."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def preset_info(name: str) -> Preset:
    """The :class:`Preset` called ``name``; :class:`UnknownPresetError` naming the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown ADM preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}"
        ) from None


def build_preset(name: str, device: torch.device | str | None = None) -> nn.Module:
    """Build the network of preset ``name`` (random weights; load them with ``load_model``)."""
    return preset_info(name).build(device)


@functools.cache
def _shapes(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = build_preset(name, device="meta")
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def preset_state_dict_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of preset ``name``, in state-dict order (built on ``meta``)."""
    return dict(_shapes(preset_info(name).name))
