"""Guides from user code: ``module:function`` or ``file.py:function`` returning an
``nn.Module`` that takes images in [−1, 1] (``time_aware`` when the module says so with a
``time_aware`` attribute or the caller asks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from fguide.guides.base import GuideKind, LoadedClassifier, LoadOptions, finish_loading
from fguide.io.files import sha256_file
from fguide.models.loading import load_model
from fguide.runtime import import_module_spec, import_spec_source

__all__ = ["ImportKind"]


class ImportKind(GuideKind):
    """An ``nn.Module`` built by an import spec, with optional weights."""

    name = "import"
    form = "a 'module:function' import spec"

    def claims(self, spec: str) -> bool:
        return ":" in spec

    def load(self, spec: str, path: Path | None, options: LoadOptions) -> LoadedClassifier:
        obj = import_module_spec(spec)
        if not isinstance(obj, nn.Module):
            raise ValueError(f"classifier: {spec!r} must be or return a torch.nn.Module")
        net = load_model(obj, path) if path is not None else obj
        desc: dict[str, Any] = {"spec": spec}
        # Code can change what a module computes without changing its weights (a constant
        # read in forward): the spec's own file is part of what identifies the guide.
        source = import_spec_source(spec)
        desc["source_sha256"] = None if source is None else sha256_file(source)
        aware = bool(options.time_aware or getattr(net, "time_aware", False))
        return finish_loading(net, spec, self.name, aware, path, options, desc)
