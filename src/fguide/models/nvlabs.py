"""Safe loading of NVlabs network pickles (EDM's ``edm-imagenet-64x64-cond-adm.pkl`` and kin).

NVlabs pickles networks with ``torch_utils.persistence``: every network object is stored as
``persistence._reconstruct_persistent_obj(meta)`` with ``meta = {type, version, module_src,
class_name, state}``, and NVlabs' own unpickling **executes** ``module_src`` (the source of
``training/networks.py``) to rebuild the class. fguide never does that. It reads the file with
its own bounded pickle machine (:mod:`fguide.models.safe_pickle`), which resolves only an
allow-list of globals:

* ``torch_utils.persistence._reconstruct_persistent_obj``: replaced by a function that keeps
  ``class_name`` and ``state`` as inert data (a :class:`PersistentRecord`) and ignores the
  source (which must be a string); only NVlabs' own class names (``EDMPrecond``,
  ``DhariwalUNet`` and their layers, the other networks, losses and the augmentation pipe) are
  accepted, any other name is refused;
* tensor rebuilding (``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter``,
  ``torch.storage._load_from_bytes``), read by :mod:`fguide.models.pickled_tensors` without
  ``torch.load``: element counts against the bytes present, views inside their storages;
* plain containers (``collections.OrderedDict()``, ``dnnlib.util.EasyDict`` → dict, torch's
  ``ModuleDict``/``ModuleList``/``Sequential`` → inert containers) and numpy number
  scalars/dtypes, which appear in the recorded constructor arguments.

Anything else (``os.system``, ``builtins.exec``, ``eval``, any other ``torch`` global, an unknown
class, a persistent id, ``BUILD`` on a record) is refused with :class:`UnsafePickleError` naming
it; sizes and counts are bounded by the file's size before anything is built. The network is
then rebuilt from the recorded constructor arguments (each type- and range-checked) as fguide's
own :class:`~fguide.models.edm.EDMPrecond` and its tensors are copied in, every key, shape and
dtype checked; the module tree must be a tree (no shared or cyclic modules) of at most 10,000
modules. Both training snapshots (``{'ema': net, 'loss_fn': ..., ...}``) and bare networks
load.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
import re
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard

import numpy as np
import torch
from torch import Tensor

from fguide.models.edm import EDMDenoiser, EDMPrecond
from fguide.models.loading import is_network_pickle
from fguide.models.pickled_tensors import read_storage_blob, rebuild_tensor
from fguide.models.safe_pickle import BoundedUnpickler, UnsafePickleError

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

_EDM_POSITIONAL = (
    "img_resolution",
    "img_channels",
    "label_dim",
    "use_fp16",
    "sigma_min",
    "sigma_max",
    "sigma_data",
    "model_type",
)
"""EDMPrecond's parameters in NVlabs' order (``persistence`` records positional arguments)."""
_ARGS: dict[str, tuple[str, float, float]] = {
    "img_resolution": ("int", 1, 4096),
    "img_channels": ("int", 1, 64),
    "label_dim": ("int", 0, 100_000),
    "use_fp16": ("bool", 0, 1),
    "sigma_min": ("float", 0.0, math.inf),
    "sigma_max": ("float", 0.0, math.inf),
    "sigma_data": ("float", 1e-12, 1e12),
    "model_type": ("str", 0, 64),
    "augment_dim": ("int", 0, 1024),
    "model_channels": ("int", 1, 8192),
    "channel_mult": ("ints", 1, 64),
    "channel_mult_emb": ("int", 1, 64),
    "num_blocks": ("int", 1, 64),
    "attn_resolutions": ("ints", 1, 4096),
    "dropout": ("float", 0.0, 1.0),
    "label_dropout": ("float", 0.0, 1.0),
}
"""EDMPrecond/DhariwalUNet constructor arguments fguide accepts: kind and range of values
(wide enough for any released network, narrow enough that building it on ``meta`` is cheap)."""
_MAX_LIST = 16  # entries of channel_mult / attn_resolutions
_MAX_MODULES = 10_000  # DhariwalUNet at 64x64 has 318
_MAX_DEPTH = 32  # module nesting; DhariwalUNet's is 4


class UnsupportedNetworkError(ValueError):
    """A well-formed NVlabs pickle whose network fguide does not implement."""


class PersistentRecord:
    """An NVlabs persistent object as data: its class name and pickled ``__dict__``.

    ``source_sha256`` identifies the embedded module source, which is never executed. The state
    is a dict when the record is made; what it holds is checked where it is read (a pickle can
    reach the dict again after the record exists).
    """

    def __init__(self, class_name: str, state: dict[str, Any], source_sha256: str):
        self.class_name, self.state, self.source_sha256 = class_name, state, source_sha256

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name!r})"


class _Container:
    """Stand-in for torch's ``ModuleDict``/``ModuleList``/``Sequential``: keeps the state."""

    state: dict[str, Any]


class _EasyDict(dict[str, Any]):
    """``dnnlib.util.EasyDict`` read as a plain dict (its attribute access is not needed)."""


def _str_keys(value: Any) -> TypeGuard[dict[str, Any]]:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafePickleError("malformed NVlabs persistent object (meta is not a class record)")
    name, state, src = meta.get("class_name"), meta.get("state"), meta.get("module_src", "")
    if not isinstance(name, str) or name not in KNOWN_CLASSES:
        shown = repr(name[:80]) if isinstance(name, str) else f"a {type(name).__name__}"
        raise UnsafePickleError(
            f"the pickle embeds an unknown class {shown} (with its own source code); fguide "
            f"only reads NVlabs' network classes ({', '.join(sorted(KNOWN_CLASSES))}) and never "
            "runs embedded code"
        )
    if not _str_keys(state):
        raise UnsafePickleError(f"malformed state for NVlabs class {name!r} (not a dict)")
    if not isinstance(src, str):
        raise UnsafePickleError(f"NVlabs class {name!r}: module_src is a {type(src).__name__}")
    digest = hashlib.sha256(src.encode("utf-8", "replace")).hexdigest()
    return PersistentRecord(name, state, digest)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Tensor:
    if not isinstance(data, Tensor) or not isinstance(requires_grad, bool) or backward_hooks:
        raise UnsafePickleError("malformed parameter record")
    return data


def _np_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype[Any]:
    if not (isinstance(spec, str) and re.fullmatch(r"[<>|=]?[biufc]\d{1,2}|[?]", spec)):
        raise UnsafePickleError("numpy dtype other than a plain number type")
    return np.dtype(spec)


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafePickleError("numpy scalar of an object or unknown dtype")
    if len(data) != dtype.itemsize:
        raise UnsafePickleError("numpy scalar with the wrong number of bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item()


def _ordered_dict(*args: Any) -> collections.OrderedDict[Any, Any]:
    if args:  # torch pickles OrderedDict() and adds the items with SETITEMS
        raise UnsafePickleError("OrderedDict built from arguments")
    return collections.OrderedDict()


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 1 style) for the allowed stand-in classes only."""
    if base is not object or state is not None or cls not in (_Container, _EasyDict):
        raise UnsafePickleError(f"copyreg._reconstructor for a {type(cls).__name__}")
    return cls.__new__(cls)


_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential")


class _NVlabsUnpickler(BoundedUnpickler):
    """NVlabs' network pickles: the allow-list of the module docstring, within the bounds of
    :mod:`fguide.models.safe_pickle`."""

    def __init__(self, file: BinaryIO, size: int):
        super().__init__(file, size)
        budget = self.budget
        self.allowed: dict[tuple[str, str], Any] = {
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): (
                _reconstruct_persistent_obj
            ),
            ("torch._utils", "_rebuild_tensor_v2"): functools.partial(rebuild_tensor, budget),
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): functools.partial(read_storage_blob, budget),
            ("collections", "OrderedDict"): _ordered_dict,
            ("dnnlib.util", "EasyDict"): _EasyDict,
            ("dnnlib", "EasyDict"): _EasyDict,
            ("numpy", "dtype"): _np_dtype,
            ("numpy.core.multiarray", "scalar"): _np_scalar,
            ("numpy._core.multiarray", "scalar"): _np_scalar,
            ("copyreg", "_reconstructor"): _reconstructor,
            **{("torch.nn.modules.container", c): _Container for c in _CONTAINERS},
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"it references the global {module}.{name}, which is neither a tensor rebuild "
                "nor an NVlabs network record; fguide never imports or calls arbitrary "
                "objects from a pickle"
            ) from None

    def new_object(self, cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if cls in (_Container, _EasyDict) and not args and not kwargs:
            return cls.__new__(cls)
        return super().new_object(cls, args, kwargs)

    def set_state(self, obj: Any, state: Any) -> None:
        if type(obj) is _Container and not hasattr(obj, "state") and _str_keys(state):
            obj.state = state
        elif type(obj) is _EasyDict and _str_keys(state):
            obj.update(state)
        elif isinstance(obj, np.dtype) and _plain_dtype_state(state):
            pass  # a native-order number type: its pickled state changes nothing
        else:
            super().set_state(obj, state)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"it uses a persistent id (a {type(pid).__name__})")


def _plain_dtype_state(state: Any) -> bool:
    """numpy's dtype state ``(version, byte order, None, None, None, size, align, flags)``."""
    return (
        isinstance(state, tuple)
        and len(state) == 8
        and state[1] in ("<", "|", "=")
        and state[2:5] == (None, None, None)
        and all(type(v) is int for v in (state[0], *state[5:]))
    )


# -- building fguide's network from the records ------------------------------------------------


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "…"


def _arg(name: str, value: Any) -> Any:
    """A recorded constructor argument as a plain value within :data:`_ARGS`' range."""
    kind, low, high = _ARGS[name]
    if kind == "ints":
        ok = (
            isinstance(value, list | tuple)
            and len(value) <= _MAX_LIST
            and all(type(v) is int and low <= v <= high for v in value)
        )
        value = list(value) if ok else value
    elif kind == "int":
        ok = type(value) is int and low <= value <= high
    elif kind == "float":
        ok = type(value) in (int, float) and low <= value <= high
    elif kind == "bool":
        ok = type(value) is bool
    else:
        ok = isinstance(value, str) and len(value) <= high
    if not ok:
        what = f"an {kind} in [{low:g}, {high:g}]" if kind != "bool" else "a bool"
        if kind == "ints":
            what = f"a list of at most {_MAX_LIST} ints in [{low:g}, {high:g}]"
        got = f"a {type(value).__name__}"
        if type(value) in (int, float) and abs(value) < 1e18:
            got = f"{value:g}"
        raise UnsupportedNetworkError(f"EDMPrecond argument {name} is not {what} (got {got})")
    return value


def _edm_kwargs(record: PersistentRecord) -> dict[str, Any]:
    args = record.state.get("_init_args") or ()
    kwargs = record.state.get("_init_kwargs")
    if not _str_keys(kwargs) or not isinstance(args, tuple | list):
        raise UnsupportedNetworkError(
            "the EDMPrecond record has no constructor arguments (_init_kwargs); was it saved "
            "with torch_utils.persistence?"
        )
    if len(args) > len(_EDM_POSITIONAL):
        raise UnsupportedNetworkError(f"EDMPrecond recorded {len(args)} positional arguments")
    out = dict(zip(_EDM_POSITIONAL, args, strict=False))
    twice = sorted(set(out) & set(kwargs))
    if twice:
        raise UnsupportedNetworkError(f"EDMPrecond arguments given twice: {twice}")
    out.update(kwargs)
    unknown = sorted(_short(k) for k in set(out) - set(_ARGS))[:10]
    if unknown:
        raise UnsupportedNetworkError(
            f"EDMPrecond/DhariwalUNet constructor arguments fguide does not know: {unknown}"
        )
    out = {k: _arg(k, v) for k, v in out.items()}
    if out.get("model_type", "DhariwalUNet") != "DhariwalUNet":
        raise UnsupportedNetworkError(
            f"EDMPrecond around model_type {_short(out['model_type'])!r}: fguide implements "
            "EDM's 'DhariwalUNet' (the ImageNet ADM architecture) only"
        )
    return out


def _state_of(node: Any, path: str) -> dict[str, Any]:
    """The checked state dict of one module of the record tree."""
    if isinstance(node, PersistentRecord):
        if node.class_name not in _DHARIWAL_LAYERS:
            raise UnsupportedNetworkError(
                f"{_short(path)} is an NVlabs {node.class_name!r}, not part of a DhariwalUNet"
            )
        state = node.state
    elif type(node) is _Container and hasattr(node, "state"):
        state = node.state
    else:
        raise UnsupportedNetworkError(
            f"{_short(path)}: unexpected {type(node).__name__} in the network"
        )
    if not _str_keys(state):
        raise UnsupportedNetworkError(f"{_short(path)}: its state is a {type(state).__name__}")
    return state


def _names(state: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = state.get(key)
    if value is None:
        return {}
    if not _str_keys(value):
        raise UnsupportedNetworkError(
            f"{_short(path)}: {key} is a {type(value).__name__}, not a dict keyed by names"
        )
    return value


def _collect(root: Any) -> dict[str, Tensor]:
    """State-dict entries (parameters, persistent buffers) of the UNet's record tree, under
    NVlabs' names; every module visited once (a shared or cyclic tree is refused)."""
    out: dict[str, Tensor] = {}
    seen = {id(root)}
    todo = [(root, "model", 0)]
    while todo:
        node, path, depth = todo.pop()
        if len(seen) > _MAX_MODULES or depth > _MAX_DEPTH:
            raise UnsupportedNetworkError(
                f"the network has more than {_MAX_MODULES} modules or nests deeper than "
                f"{_MAX_DEPTH}"
            )
        state = _state_of(node, path)
        skip = state.get("_non_persistent_buffers_set") or set()
        if not (isinstance(skip, set | frozenset) and all(isinstance(k, str) for k in skip)):
            raise UnsupportedNetworkError(f"{_short(path)}: malformed non-persistent buffer set")
        for group in ("_parameters", "_buffers"):
            for name, t in _names(state, group, path).items():
                if t is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(t, Tensor):
                    raise UnsupportedNetworkError(
                        f"{_short(path)}.{_short(name)} is a {type(t).__name__}"
                    )
                out[f"{path}.{name}"] = t.detach()
        for name, child in _names(state, "_modules", path).items():
            if child is None:
                continue
            if id(child) in seen:
                raise UnsupportedNetworkError(
                    f"{_short(f'{path}.{name}')} is a module met before: the module tree shares "
                    "or repeats modules (NVlabs networks are trees)"
                )
            seen.add(id(child))
            todo.append((child, f"{path}.{name}", depth + 1))
    return out


def _mismatch(expected: dict[str, Tensor], weights: dict[str, Tensor]) -> str | None:
    """What keeps ``weights`` from loading into a network with state dict ``expected``."""
    missing = [_short(k) for k in expected if k not in weights][:5]
    unexpected = [_short(k) for k in weights if k not in expected][:5]
    wrong = [
        f"{k}: file {list(weights[k].shape)} {weights[k].dtype} vs model {list(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in weights and (weights[k].shape != v.shape or weights[k].dtype != v.dtype)
    ][:5]
    if missing or unexpected or wrong:
        return f"missing {missing}, unexpected {unexpected}, wrong shape or dtype {wrong}"
    return None


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
    inner = _names(record.state, "_modules", "EDMPrecond").get("model")
    if not isinstance(inner, PersistentRecord) or inner.class_name != "DhariwalUNet":
        name = inner.class_name if isinstance(inner, PersistentRecord) else type(inner).__name__
        raise UnsupportedNetworkError(
            f"{source}: EDMPrecond wraps a {name!r}; fguide implements 'DhariwalUNet' only"
        )
    weights = _collect(inner)
    try:
        with torch.device("meta"):
            net = EDMPrecond(**kwargs)
    except (ValueError, TypeError, RuntimeError) as err:
        raise UnsupportedNetworkError(
            f"{source}: EDMPrecond({kwargs}) cannot be built: {str(err).splitlines()[0]}"
        ) from err
    problem = _mismatch(net.state_dict(), weights)
    if problem:
        raise UnsupportedNetworkError(
            f"{source}: the pickled tensors do not fit EDMPrecond({kwargs}): {problem}"
        )
    net.load_state_dict(weights, strict=True, assign=True)
    net.eval().requires_grad_(False)
    info = {
        "class_name": record.class_name,
        "model_type": "DhariwalUNet",
        "init_kwargs": kwargs,
        "num_params": sum(v.numel() for k, v in weights.items() if "resample_filter" not in k),
        "embedded_source_sha256": record.source_sha256,
    }
    return net, info


def _describe(value: Any) -> str:
    if isinstance(value, PersistentRecord):
        return value.class_name
    return "None" if value is None else type(value).__name__


_EXPECTED = "expected an NVlabs network pickle such as edm-imagenet-64x64-cond-adm.pkl"


def _unpickle(p: Path) -> Any:
    """The object an NVlabs pickle describes, read within the bounds of safe_pickle."""
    size = p.stat().st_size
    if size == 0:
        raise UnsafePickleError(f"refusing to load {p}: the file is empty (0 bytes); {_EXPECTED}")
    try:
        with open(p, "rb") as f:
            if f.read(1) != b"\x80":
                raise UnsafePickleError("it is not a pickle of protocol 2 or later")
            f.seek(0)
            return _NVlabsUnpickler(f, size).load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"refusing to load {p}: {err}; {_EXPECTED}") from None
    except Exception as err:  # anything else a malformed file can cause while it is read
        reason = (str(err).splitlines() or [""])[0][:200]
        raise UnsafePickleError(
            f"refusing to load {p}: not a readable network pickle "
            f"({type(err).__name__}: {reason}); {_EXPECTED}"
        ) from err


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

    The file is read within the bounds of :mod:`fguide.models.safe_pickle` (its size bounds
    everything built from it); the module tree must be a tree of at most 10,000 modules and
    every record's state is type-checked where it is read.

    Raises ``FileNotFoundError``, :class:`UnsafePickleError` (a global outside the allow-list,
    named in the message, nothing imported or called; a broken bound; a malformed or empty
    file) and :class:`UnsupportedNetworkError` (a VP/VE/iDDPM network, constructor arguments
    out of range, tensors that do not fit); every message names the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"network pickle not found: {p}")
    obj = _unpickle(p)
    info: dict[str, Any] = {"path": str(p), "snapshot_keys": None, "other_objects": {}}
    if isinstance(obj, dict):
        if not _str_keys(obj):
            raise UnsupportedNetworkError(f"{p} is a dict with keys that are not strings")
        info["snapshot_keys"] = sorted(obj)
        if key not in obj:
            shown = [_short(k) for k in info["snapshot_keys"][:10]]
            raise UnsupportedNetworkError(
                f"{p} is a snapshot without the key {key!r}; its keys: {shown}"
            )
        info["other_objects"] = {k: _describe(v) for k, v in obj.items() if k != key}
        obj = obj[key]
    if not isinstance(obj, PersistentRecord):
        raise UnsupportedNetworkError(
            f"{p} holds a {type(obj).__name__}, not an NVlabs network (persistent record)"
        )
    try:
        net, net_info = _build(obj, str(p))
    except UnsupportedNetworkError as err:
        if str(p) in str(err):
            raise
        raise UnsupportedNetworkError(f"{p}: {err}") from None
    info.update(net_info)
    return net, info


def load_edm_denoiser(
    path: str | PathLike[str], key: str = "ema"
) -> tuple[EDMDenoiser, dict[str, Any]]:
    """:func:`load_network_pickle` wrapped as fguide's ``Denoiser`` (integer labels → one-hot)."""
    net, info = load_network_pickle(path, key)
    return EDMDenoiser(net), info
