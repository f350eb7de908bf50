"""What every command resolves the same way: devices and user import specs."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): the GPU when there is one, else the CPU; an unavailable device
    raises a ValueError naming it."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def import_object(spec: str, what: str = "classifier") -> Any:
    """The object named by ``package.module:name`` (``name`` may be dotted) or
    ``path/to/file.py:name``."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"{what}: an import spec is 'package.module:name', got {spec!r}")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: module file not found: {path}")
        name = f"_fguide_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"{what}: cannot import {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as err:
            raise ValueError(f"{what}: cannot import {mod_name!r} from {spec!r}: {err}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"{what} {spec!r}: no attribute {attr!r} in {mod_name} "
                "(no callable or module to build it from)"
            )
        obj = getattr(obj, part)
    return obj


def import_spec_source(spec: str) -> Path | None:
    """The source file of an import spec's module (``file.py`` itself, or the imported module's
    ``__file__``; None for a module without one). Import the spec first."""
    mod_name = spec.rpartition(":")[0]
    if mod_name.endswith(".py"):
        return Path(mod_name)
    module = sys.modules.get(mod_name)
    source = getattr(module, "__file__", None)
    return Path(source) if source else None


def import_module_spec(spec: str, what: str = "classifier") -> Any:
    """An ``nn.Module`` named by an import spec, or built by calling the named factory (or
    class) without arguments."""
    obj = import_object(spec, what)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is neither an nn.Module nor a factory (no callable)")
    return obj()
