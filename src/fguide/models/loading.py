"""Safe loading of network weights, with key and shape checks that say what went wrong.

Files are read with ``torch.load(path, map_location="cpu", weights_only=True)`` and nothing
else: fguide never unpickles code from a checkpoint. A file that needs more than tensors and
plain containers is refused with an explanation of how to convert it once, in an environment
where the file is trusted.

:func:`load_model` checks every key and shape before copying anything; on a mismatch the
``ValueError`` lists the missing, unexpected and wrong-shape keys and names the official ADM
preset whose layout the file has, if any (the presets' layouts are built on the ``meta``
device, so no 500M-parameter model is allocated for the comparison).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from fguide.models.presets import PRESETS, build_preset, preset_info, preset_state_dict_shapes

__all__ = [
    "STATE_DICT",
    "UnsafeCheckpointError",
    "check_state_dict",
    "is_network_pickle",
    "load_model",
    "load_state_dict_file",
    "matching_presets",
    "read_torch_file",
]

_SHOW = 5  # keys listed per category in a mismatch message

_CONVERT_HINT = (
    "fguide only loads plain state dicts (a mapping of parameter names to tensors) with "
    "torch.load(..., weights_only=True), and never runs code stored in a file. If you trust "
    "the file, convert it once: obj = torch.load(path, weights_only=False); "
    "torch.save(obj.state_dict() if isinstance(obj, torch.nn.Module) else obj['state_dict'], "
    "'plain.pt') (pick whichever entry holds the weights), then load 'plain.pt'."
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint that ``torch.load(weights_only=True)`` refuses (it would unpickle code)."""


def _unpickler_reason(err: BaseException) -> str:
    """The informative line of torch's weights-only refusal (e.g. the offending global)."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if not rest:
                rest = next((ln for ln in lines[i + 1 :] if ln), "")
            return rest
    return lines[0] if lines else type(err).__name__


STATE_DICT = "a PyTorch state dict (a .pt/.pth file written by torch.save(model.state_dict()))"
"""What :func:`load_state_dict_file` expects, for messages."""


def _not_torch(p: Path) -> str | None:
    """Why ``p`` cannot be a ``torch.save`` file, judged from its first bytes; None if it can."""
    with open(p, "rb") as f:
        head = f.read(64)
    if not head:
        return "the file is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return None  # torch's reader says what is damaged
        if names and all("/" not in n and n.endswith(".npy") for n in names):
            return "it is a NumPy .npz archive, not a PyTorch file"
        return None
    if head[:1] == b"\x80":  # a pickle: torch's legacy format
        return None
    shown = " ".join(f"{b:02x}" for b in head[:4])
    return (
        f"it is not a PyTorch file (it starts with bytes {shown}; torch.save writes a zip "
        "archive or a pickle)"
    )


def is_network_pickle(path: str | PathLike[str]) -> bool:
    """True when ``path`` is a raw pickle that references NVlabs' ``torch_utils.persistence``.

    Reads at most the first 64 KiB: the persistence global precedes the first embedded source.
    The model-family registry routes a ``--model`` file with it to
    :func:`fguide.models.nvlabs.load_network_pickle` (torch's own files are
    zip archives or legacy files without that reference).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head[:1] == b"\x80" and b"torch_utils.persistence" in head


def read_torch_file(path: str | PathLike[str], expected: str = STATE_DICT) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    Every error names the file, what is wrong with it and what it should be (``expected``):
    ``FileNotFoundError`` when it is missing; ``ValueError`` when it is empty, not a torch file
    (a NumPy archive, random bytes) or truncated/damaged; :class:`UnsafeCheckpointError` when
    it needs arbitrary unpickling (a pickled module or custom object, an NVlabs pickle).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found; expected {expected}")
    problem = _not_torch(p)
    if problem:
        raise ValueError(f"{p}: {problem}; expected {expected}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Only a file torch refuses is looked at again (NVlabs' persistent classes always are).
        if is_network_pickle(p):
            raise UnsafeCheckpointError(
                f"{p} is an NVlabs network pickle (EDM): read it with "
                "fguide.models.nvlabs.load_network_pickle(path), which rebuilds the network "
                "without running the code embedded in the file"
            ) from None
        raise UnsafeCheckpointError(
            f"refusing to load {p}: it is not a plain state dict that "
            f"torch.load(weights_only=True) can read ({_unpickler_reason(err)}). {_CONVERT_HINT}"
        ) from err
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile) as err:
        # torch's readers: a cut zip archive or legacy file, a record of the wrong size
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(
            f"{p}: the file is truncated or damaged ({reason}); expected {expected}"
        ) from err


def load_state_dict_file(
    path: str | PathLike[str], expected: str = STATE_DICT
) -> dict[str, torch.Tensor]:
    """Read a plain state dict (``name -> tensor``) from ``path`` onto the CPU.

    Raises (see :func:`read_torch_file`, every message naming the file and ``expected``)
    ``FileNotFoundError``, :class:`UnsafeCheckpointError` when the file needs arbitrary
    unpickling (a pickled module, optimizer or custom object), and ``ValueError`` when it is
    empty, damaged, not a torch file, or holds something other than a flat mapping of strings
    to tensors (e.g. a training checkpoint wrapping one).
    """
    p = Path(path)
    obj = read_torch_file(p, expected)
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{p} holds a {type(obj).__name__}, not a state dict; expected {expected}. "
            f"{_CONVERT_HINT}"
        )
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise ValueError(
            f"{p} is a mapping but not a flat state dict: entries {bad[:_SHOW]!r} are not "
            f"tensors (top-level keys: {list(obj)[:10]!r}). If the weights sit under one of "
            "these keys, save that entry on its own: torch.save(ckpt[key], 'plain.pt')."
        )
    return dict(obj)


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def matching_presets(shapes: Mapping[str, tuple[int, ...] | torch.Tensor]) -> list[str]:
    """Names of the official ADM presets whose key set and shapes equal those of ``shapes``.

    ``shapes`` maps keys to shapes (or to tensors, whose shapes are used).
    """
    got = {
        k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()
    }
    return [name for name in PRESETS if preset_state_dict_shapes(name) == got]


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]],
    state_dict: Mapping[str, torch.Tensor],
    target: str = "the model",
    source: str | None = None,
) -> None:
    """Raise ``ValueError`` unless ``state_dict`` has exactly ``expected``'s keys and shapes.

    The message gives counts and the first few missing, unexpected and wrong-shape keys, and
    the official preset whose layout the state dict has, if any; ``source`` (the file the state
    dict came from) starts it.
    """
    got = _shapes(state_dict)
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [k for k in expected if k in got and tuple(expected[k]) != got[k]]
    if not (missing or unexpected or wrong):
        return

    def _list(keys: list[str]) -> str:
        more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
        return ", ".join(keys[:_SHOW]) + more

    lines = [
        (f"{source}: the " if source else "")
        + f"state dict does not fit {target}: {len(missing)} missing, {len(unexpected)} "
        f"unexpected and {len(wrong)} wrong-shape key(s) "
        f"(file has {len(got)} keys, model expects {len(expected)})"
    ]
    if missing:
        lines.append(f"  missing ({len(missing)}): {_list(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {_list(unexpected)}")
    if wrong:
        shown = [f"{k}: file {list(got[k])} vs model {list(expected[k])}" for k in wrong]
        more = f"; ... ({len(wrong) - _SHOW} more)" if len(wrong) > _SHOW else ""
        lines.append(f"  wrong shape ({len(wrong)}): " + "; ".join(shown[:_SHOW]) + more)
    fits = matching_presets(got)
    if fits:
        lines.append(
            "The file's keys and shapes are those of preset "
            + " / ".join(repr(f) for f in fits)
            + f": load it with load_model({fits[0]!r}, path)."
        )
    else:
        lines.append("No official ADM preset has this file's keys and shapes.")
    raise ValueError("\n".join(lines))


def _strip_module_prefix(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]
) -> Mapping[str, torch.Tensor]:
    """Drop the ``module.`` prefix that ``DataParallel``/``DistributedDataParallel`` saves.

    Only when every key has it and the model's own keys do not, so a model whose parameters
    really live under ``module`` is never altered.
    """
    prefix = "module."
    if (
        state_dict
        and all(k.startswith(prefix) for k in state_dict)
        and not any(k.startswith(prefix) for k in expected)
    ):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def load_model(
    preset_or_module: str | nn.Module,
    source: str | PathLike[str] | Mapping[str, torch.Tensor],
) -> nn.Module:
    """Load weights into an ADM preset (by name) or into a given module, strictly.

    ``source`` is a file path (read with :func:`load_state_dict_file`) or a state dict. Keys
    saved by ``DataParallel`` with a ``module.`` prefix are accepted (the prefix is dropped),
    since such files are common and unambiguous. Every key and shape is checked first; a
    mismatch raises ``ValueError`` (see :func:`check_state_dict`).

    For a preset name the network is built on the ``meta`` device and takes the file's
    tensors directly (``assign=True``), cast to float32 where they are floating point, so no
    random initialisation is allocated. Call ``convert_to_fp16()`` afterwards to run it as the
    reference does with ``use_fp16``. The module is returned in eval mode.
    """
    if isinstance(preset_or_module, str):
        target = f"preset {preset_info(preset_or_module).name!r}"
        expected = preset_state_dict_shapes(preset_or_module)
    else:
        target = f"the given {type(preset_or_module).__name__}"
        expected = _shapes(preset_or_module.state_dict())
    state_dict = source if isinstance(source, Mapping) else load_state_dict_file(source)
    state_dict = _strip_module_prefix(state_dict, expected)
    check_state_dict(
        expected, state_dict, target, None if isinstance(source, Mapping) else str(source)
    )

    if isinstance(preset_or_module, str):
        model = build_preset(preset_or_module, device="meta")
        weights = {
            k: v.to(device="cpu", dtype=torch.float32) if v.is_floating_point() else v.cpu()
            for k, v in state_dict.items()
        }
        model.load_state_dict(weights, strict=True, assign=True)
    else:
        model = preset_or_module
        model.load_state_dict(state_dict, strict=True)
    return model.eval()
