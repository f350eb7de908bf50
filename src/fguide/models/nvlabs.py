"""Safe loading of NVlabs network pickles (EDM's ``edm-imagenet-64x64-cond-adm.pkl`` and kin).

NVlabs pickles networks with ``torch_utils.persistence``: every network object is stored as
``persistence._reconstruct_persistent_obj(meta)`` with ``meta = {type, version, module_src,
class_name, state}``, and NVlabs' own unpickling **executes** ``module_src`` (the source of
``training/networks.py``) to rebuild the class. fguide never does that. Its restricted
unpickler resolves only an allow-list of globals:

* ``torch_utils.persistence._reconstruct_persistent_obj``: replaced by a function that keeps
  ``class_name`` and ``state`` as inert data (a :class:`PersistentRecord`) and ignores the
  source; only NVlabs' own class names (``EDMPrecond``, ``DhariwalUNet`` and their layers, the
  other networks, losses and the augmentation pipe) are accepted, any other name is refused;
* tensor rebuilding (``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter``,
  ``torch.storage._load_from_bytes``, the latter read with ``torch.load(weights_only=True)``);
* plain containers (``collections.OrderedDict``, ``dnnlib.util.EasyDict`` → dict, torch's
  ``ModuleDict``/``ModuleList``/``Sequential`` → inert containers) and numpy scalars/dtypes
  (non-object dtypes only), which appear in the recorded constructor arguments.

Anything else (``os.system``, ``builtins.exec``, ``eval``, an unknown class, a persistent id)
is refused with :class:`UnsafePickleError` naming it. The network is then rebuilt from the
recorded constructor arguments (``init_kwargs``) as fguide's own
:class:`~fguide.models.edm.EDMPrecond` and its tensors are copied in, every key and shape
checked. Both training snapshots (``{'ema': net, 'loss_fn': ..., ...}``) and bare networks load.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._utils
from torch import Tensor

from fguide.models.edm import EDMDenoiser, EDMPrecond
from fguide.models.loading import UnsafeCheckpointError

__all__ = [
    "PersistentRecord",
    "UnsafePickleError",
    "UnsupportedNetworkError",
    "is_network_pickle",
    "load_edm_denoiser",
    "load_network_pickle",
]

SUPPORTED = "EDMPrecond"
"""The one top-level network class fguide builds (around a ``DhariwalUNet``)."""

_DHARIWAL_LAYERS = frozenset(
    {"DhariwalUNet", "UNetBlock", "Linear", "Conv2d", "GroupNorm", "PositionalEmbedding"}
)
_OTHER_NETWORKS = frozenset(
    {"SongUNet", "FourierEmbedding", "VPPrecond", "VEPrecond", "iDDPMPrecond"}
)
_INERT = frozenset({"EDMLoss", "VPLoss", "VELoss", "AugmentPipe"})
"""Training-only NVlabs objects of a snapshot: kept as data, never built."""
KNOWN_CLASSES = _DHARIWAL_LAYERS | _OTHER_NETWORKS | _INERT | {SUPPORTED}

_EDM_KWARGS = frozenset(
    {"img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max"}
    | {"sigma_data", "model_type"}
)
_EDM_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min")
_UNET_KWARGS = frozenset(
    {"augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks"}
    | {"attn_resolutions", "dropout", "label_dropout"}
)


class UnsafePickleError(UnsafeCheckpointError):
    """The pickle needs a global outside the allow-list (it could run code); names it."""


class UnsupportedNetworkError(ValueError):
    """A well-formed NVlabs pickle whose network fguide does not implement."""


class PersistentRecord:
    """An NVlabs persistent object as data: its class name and pickled ``__dict__``.

    ``source_sha256`` identifies the embedded module source, which is never executed.
    """

    def __init__(self, class_name: str, state: dict[str, Any], source_sha256: str):
        self.class_name, self.state, self.source_sha256 = class_name, state, source_sha256

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name!r})"


class _Container:
    """Stand-in for torch's ``ModuleDict``/``ModuleList``/``Sequential``: keeps the state."""

    state: dict[str, Any]

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"unexpected state {type(state).__name__} for a container")
        self.state = state


class _EasyDict(dict[str, Any]):
    """``dnnlib.util.EasyDict`` read as a plain dict (its attribute access is not needed)."""

    def __setstate__(self, state: Any) -> None:
        if state:
            self.update(state)


def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafePickleError("malformed NVlabs persistent object (meta is not a class record)")
    name, state, src = meta.get("class_name"), meta.get("state"), meta.get("module_src", "")
    if not isinstance(name, str) or name not in KNOWN_CLASSES:
        raise UnsafePickleError(
            f"the pickle embeds an unknown class {name!r} (with its own source code); fguide "
            f"only reads NVlabs' network classes ({', '.join(sorted(KNOWN_CLASSES))}) and never "
            "runs embedded code"
        )
    if not isinstance(state, dict):
        raise UnsafePickleError(f"malformed state for NVlabs class {name!r}")
    digest = hashlib.sha256(str(src).encode("utf-8", "replace")).hexdigest()
    return PersistentRecord(name, state, digest)


def _load_from_bytes(data: bytes) -> Any:
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise UnsafePickleError(f"a tensor storage blob holds a {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *rest: Any) -> Tensor:
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise UnsafePickleError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    if len(rest) >= 2 and rest[1]:
        raise UnsafePickleError("tensor with backward hooks")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any) -> Tensor:
    if not isinstance(data, Tensor) or backward_hooks:
        raise UnsafePickleError("malformed parameter record")
    return data


def _np_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype[Any]:
    if not isinstance(spec, str):
        raise UnsafePickleError(f"numpy dtype from {type(spec).__name__}")
    dt = np.dtype(spec)
    if dt.hasobject:
        raise UnsafePickleError("numpy object dtype")
    return dt


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafePickleError("numpy scalar of an object or unknown dtype")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item()


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocols 0/1) for the allowed stand-in classes only."""
    if base is not object or state is not None or cls not in (_Container, _EasyDict):
        raise UnsafePickleError(f"copyreg._reconstructor for {cls!r}")
    return cls.__new__(cls)


_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("copyreg", "_reconstructor"): _reconstructor,
    **{("torch.nn.modules.container", c): _Container for c in _CONTAINERS},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"it references the global {module}.{name}, which is neither a tensor rebuild "
                "nor an NVlabs network record; fguide never imports or calls arbitrary "
                "objects from a pickle"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"it uses a persistent id ({str(pid)[:40]!r})")


# -- building fguide's network from the records ------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """Recorded constructor arguments as plain Python values (lists for sequences)."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    raise UnsupportedNetworkError(f"{where}: unexpected value {value!r}")


def _edm_kwargs(record: PersistentRecord) -> dict[str, Any]:
    args = record.state.get("_init_args") or ()
    kwargs = record.state.get("_init_kwargs")
    if not isinstance(kwargs, dict) or not isinstance(args, tuple | list):
        raise UnsupportedNetworkError(
            "the EDMPrecond record has no constructor arguments (_init_kwargs); was it saved "
            "with torch_utils.persistence?"
        )
    if len(args) > len(_EDM_POSITIONAL):
        raise UnsupportedNetworkError(f"EDMPrecond recorded {len(args)} positional arguments")
    out = dict(zip(_EDM_POSITIONAL, args, strict=False))
    out.update(kwargs)
    unknown = sorted(set(out) - _EDM_KWARGS - _UNET_KWARGS)
    if unknown:
        raise UnsupportedNetworkError(
            f"EDMPrecond/DhariwalUNet constructor arguments fguide does not know: {unknown}"
        )
    out = {k: _plain(v, f"EDMPrecond argument {k}") for k, v in out.items()}
    if out.get("model_type", "DhariwalUNet") != "DhariwalUNet":
        raise UnsupportedNetworkError(
            f"EDMPrecond around model_type {out['model_type']!r}: fguide implements EDM's "
            "'DhariwalUNet' (the ImageNet ADM architecture) only"
        )
    return out


def _collect(node: Any, prefix: str, out: dict[str, Tensor], path: str) -> None:
    """State-dict entries (parameters, persistent buffers) of a record tree, NVlabs' names."""
    if isinstance(node, PersistentRecord):
        if node.class_name not in _DHARIWAL_LAYERS:
            raise UnsupportedNetworkError(
                f"{path or 'the network'} is an NVlabs {node.class_name!r}, not part of a "
                "DhariwalUNet"
            )
        state = node.state
    elif isinstance(node, _Container):
        state = node.state
    else:
        raise UnsupportedNetworkError(f"{path}: unexpected {type(node).__name__} in the network")
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if t is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(t, Tensor):
                raise UnsupportedNetworkError(f"{prefix}{name} is a {type(t).__name__}")
            out[prefix + name] = t.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", out, f"{prefix}{name}")


def _build(record: PersistentRecord, source: str) -> tuple[EDMPrecond, dict[str, Any]]:
    if record.class_name != SUPPORTED:
        what = {
            "VPPrecond": "a VP model (DDPM++ SongUNet)",
            "VEPrecond": "a VE model (NCSN++ SongUNet)",
            "iDDPMPrecond": "an iDDPM-preconditioned model (the ADM baseline)",
        }.get(record.class_name, "not a supported network")
        raise UnsupportedNetworkError(
            f"{source}: the network is an NVlabs {record.class_name!r} ({what}); fguide loads "
            f"{SUPPORTED} around a DhariwalUNet (e.g. edm-imagenet-64x64-cond-adm.pkl) only"
        )
    kwargs = _edm_kwargs(record)
    modules = record.state.get("_modules") or {}
    inner = modules.get("model")
    if not isinstance(inner, PersistentRecord) or inner.class_name != "DhariwalUNet":
        name = inner.class_name if isinstance(inner, PersistentRecord) else type(inner).__name__
        raise UnsupportedNetworkError(
            f"{source}: EDMPrecond wraps a {name!r}; fguide implements 'DhariwalUNet' only"
        )
    weights: dict[str, Tensor] = {}
    _collect(inner, "model.", weights, "model")

    with torch.device("meta"):
        net = EDMPrecond(**kwargs)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != got:
        missing = [k for k in expected if k not in got][:5]
        unexpected = [k for k in got if k not in expected][:5]
        wrong = [
            f"{k}: file {list(got[k])} vs model {list(expected[k])}"
            for k in expected
            if k in got and got[k] != expected[k]
        ][:5]
        raise UnsupportedNetworkError(
            f"{source}: the pickled tensors do not fit EDMPrecond({kwargs}): missing {missing}, "
            f"unexpected {unexpected}, wrong shape {wrong}"
        )
    net.load_state_dict(weights, strict=True, assign=True)
    net.eval().requires_grad_(False)
    info = {
        "class_name": record.class_name,
        "model_type": "DhariwalUNet",
        "init_kwargs": kwargs,
        "num_params": sum(math.prod(s) for k, s in got.items() if "resample_filter" not in k),
        "embedded_source_sha256": record.source_sha256,
    }
    return net, info


def _describe(value: Any) -> str:
    if isinstance(value, PersistentRecord):
        return value.class_name
    return "None" if value is None else type(value).__name__


def is_network_pickle(path: str | PathLike[str]) -> bool:
    """True when ``path`` is a raw pickle that references NVlabs' ``torch_utils.persistence``.

    Reads at most the first 64 KiB: the persistence global precedes the first embedded source.
    Use it to route a ``--model`` file to :func:`load_network_pickle` (torch's own files are
    zip archives or legacy files without that reference).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head[:1] == b"\x80" and b"torch_utils.persistence" in head


def load_network_pickle(
    path: str | PathLike[str], key: str = "ema"
) -> tuple[EDMPrecond, dict[str, Any]]:
    """Read an NVlabs network pickle without running its code; return fguide's network.

    ``path`` holds a training snapshot (a dict; the network is taken from ``key``, default
    ``'ema'`` as NVlabs' ``generate.py`` does) or a bare network. Returns the
    :class:`~fguide.models.edm.EDMPrecond` (float32, eval mode, weights as stored) and an info
    dict: ``class_name``, ``model_type``, ``init_kwargs`` (the recorded constructor arguments),
    ``num_params``, ``embedded_source_sha256`` (the source that was *not* executed),
    ``snapshot_keys`` and ``other_objects`` (class names of the snapshot's other entries).

    Raises ``FileNotFoundError``, :class:`UnsafePickleError` (a global outside the allow-list,
    named in the message; nothing is imported or called) and :class:`UnsupportedNetworkError`
    (a VP/VE/iDDPM network, or tensors that do not fit).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"network pickle not found: {p}")
    try:
        with open(p, "rb") as f:
            obj = _RestrictedUnpickler(f).load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"refusing to load {p}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise UnsafePickleError(
            f"refusing to load {p}: not a readable network pickle ({err})"
        ) from err

    info: dict[str, Any] = {"path": str(p), "snapshot_keys": None, "other_objects": {}}
    if isinstance(obj, Mapping):
        info["snapshot_keys"] = sorted(str(k) for k in obj)
        if key not in obj:
            raise UnsupportedNetworkError(
                f"{p} is a snapshot without the key {key!r}; its keys: {info['snapshot_keys']}"
            )
        info["other_objects"] = {str(k): _describe(v) for k, v in obj.items() if k != key}
        obj = obj[key]
    if not isinstance(obj, PersistentRecord):
        raise UnsupportedNetworkError(
            f"{p} holds a {type(obj).__name__}, not an NVlabs network (persistent record)"
        )
    net, net_info = _build(obj, str(p))
    info.update(net_info)
    return net, info


def load_edm_denoiser(
    path: str | PathLike[str], key: str = "ema"
) -> tuple[EDMDenoiser, dict[str, Any]]:
    """:func:`load_network_pickle` wrapped as fguide's ``Denoiser`` (integer labels → one-hot)."""
    net, info = load_network_pickle(path, key)
    return EDMDenoiser(net), info
