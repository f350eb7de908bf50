"""Speed options for the sampling path: precision, memory format, compilation, batch size.

Each is opt-in and wraps a model without changing its weights, so the float32 path stays the
reference:

- :func:`with_precision` runs a diffusion model or a classifier under ``torch.autocast`` in
  ``"bf16"`` or ``"fp16"`` and returns its output in float32; the diffusion model and the
  guiding classifier take separate precisions (the classifier's gradient is the more
  sensitive: keep it ``"fp32"`` unless measured otherwise).
- :func:`to_channels_last` converts a convolutional network and its inputs to NHWC (cuDNN's
  fast layout for fp16/bf16 convolutions; no gain on CPU).
- :func:`compile_model` wraps ``torch.compile`` and records the compile time (the first
  call's wall time: compilation plus one forward).
- :func:`auto_batch_size` picks the batch from free device memory and a measured per-sample
  cost (:func:`measure_peak_bytes`); :func:`choose_batch_size` does both.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
"""The precisions by name, with the reduced dtype they cast to (None: float32, no cast)."""


def check_precision(precision: str, what: str) -> torch.dtype | None:
    """The reduced dtype of ``precision`` (None for fp32); a ValueError naming ``what`` for an
    unknown name."""
    if precision not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return PRECISIONS[precision]


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype a network is cast to for ``precision`` (float32 for fp32)."""
    return check_precision(precision, "precision") or torch.float32


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: Precision = "fp32") -> Iterator[None]:
    """``torch.autocast`` on ``device``'s type in ``precision`` (a no-op for ``"fp32"``)."""
    dtype = check_precision(precision, "precision")
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


def param_dtype(net: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of ``net``'s first parameter (``default`` when it has none)."""
    p = next(iter(net.parameters()), None)
    return default if p is None else p.dtype


class WithPrecision:
    """A model called under autocast; floating outputs come back in the first input's dtype.

    The casts are autograd-aware: a classifier wrapped here still gives the guidance its
    gradient, computed in the reduced precision, returned in the input's dtype. Attributes of
    the wrapped model (``net``, ``num_classes``, ...) stay reachable through ``.model``.
    """

    def __init__(self, model: Callable[..., Tensor], precision: Precision):
        check_precision(precision, "precision")
        self.model, self.precision = model, precision

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        with autocast(x.device, self.precision):
            out = self.model(x, *args, **kwargs)
        return out.to(x.dtype) if out.is_floating_point() else out

    def __repr__(self) -> str:
        return f"WithPrecision({self.model!r}, {self.precision!r})"


def with_precision(model: Callable[..., Tensor], precision: Precision) -> Callable[..., Tensor]:
    """``model`` run under autocast in ``precision``; unchanged for ``"fp32"``.

    Use it once for the diffusion model (``EpsModel``/``Denoiser``) and once, with its own
    precision, for the guiding classifier.
    """
    if check_precision(precision, "precision") is None:
        return model
    return WithPrecision(model, precision)


class ChannelsLast:
    """Calls ``model`` with its first argument in channels_last (NHWC) memory format."""

    def __init__(self, model: Callable[..., Tensor]):
        self.model = model

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x, *args, **kwargs)


def to_channels_last(model: Callable[..., Tensor], net: nn.Module | None = None) -> ChannelsLast:
    """Convert ``net`` (default: ``model`` itself when it is a module) to channels_last in place
    and return ``model`` wrapped so that its 4-d input is NHWC too. Helps cuDNN convolutions in
    fp16/bf16 on GPUs with tensor cores; on CPU it is usually neutral or slower."""
    module = net if net is not None else model
    if isinstance(module, nn.Module):
        module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return ChannelsLast(model)


class CompiledModel:
    """``torch.compile`` of a module; ``compile_seconds`` is the first call's wall time
    (compilation plus one forward), None until then."""

    def __init__(self, module: nn.Module, **compile_kwargs: Any):
        self.module = module
        self.compiled: Callable[..., Any] = torch.compile(module, **compile_kwargs)
        self.compile_seconds: float | None = None
        self._eager = False

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Calls inside run the module uncompiled: a probe at other batch sizes (the automatic
        batch size) costs no compilations of shapes the run never uses."""
        self._eager = True
        try:
            yield
        finally:
            self._eager = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._eager:
            return self.module(*args, **kwargs)
        if self.compile_seconds is not None:
            return self.compiled(*args, **kwargs)
        start = time.perf_counter()
        out = self.compiled(*args, **kwargs)
        if isinstance(out, Tensor) and out.device.type == "cuda":
            torch.cuda.synchronize(out.device)  # once: time the compilation, not the launch
        self.compile_seconds = time.perf_counter() - start
        return out

    def __getattr__(self, name: str) -> Any:  # num_classes, in_channels, ... of the module
        return getattr(self.__dict__["module"], name)


def compile_model(
    module: nn.Module,
    *,
    mode: str | None = None,
    dynamic: bool | None = False,
    backend: str = "inductor",
    example: tuple[Any, ...] | None = None,
) -> CompiledModel:
    """``torch.compile(module, mode=mode, dynamic=dynamic)``, timed.

    With ``example`` inputs the compilation happens here (one call under ``no_grad``) and
    ``compile_seconds`` is set on return; otherwise on the first call. A changed batch size
    recompiles (``dynamic=False`` keeps the fastest kernels for the fixed sampling batch).
    """
    compiled = CompiledModel(module, mode=mode, dynamic=dynamic, backend=backend)
    if example is not None:
        with torch.no_grad():
            compiled(*example)
    return compiled


def free_memory(device: torch.device | str) -> int:
    """Bytes the process can still allocate on ``device``: CUDA's free memory plus what
    PyTorch's caching allocator holds but does not use; on CPU the kernel's MemAvailable."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free + cached)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ValueError(f"cannot tell the free memory of device {dev}")


def measure_peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak device memory allocated while ``fn()`` runs, above what was allocated before
    (CUDA only: the CPU allocator keeps no statistics)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"peak memory is measured on CUDA devices only; got {dev}")
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev) - base)


def auto_batch_size(
    per_sample_bytes: float,
    free_bytes: float,
    *,
    fixed_bytes: float = 0.0,
    headroom: float = 0.85,
    max_batch: int = 1024,
    multiple_of: int = 1,
) -> int:
    """The largest batch b with fixed + b · per_sample ≤ headroom · free, rounded down to a
    multiple of ``multiple_of`` (when that leaves at least one), in [1, ``max_batch``]."""
    if per_sample_bytes <= 0:
        raise ValueError(f"per_sample_bytes must be > 0; got {per_sample_bytes}")
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must lie in (0, 1]; got {headroom}")
    if max_batch < 1 or multiple_of < 1:
        raise ValueError(f"max_batch and multiple_of must be >= 1; got {max_batch}, {multiple_of}")
    b = math.floor((headroom * free_bytes - fixed_bytes) / per_sample_bytes)
    b = min(max(b, 1), max_batch)
    return b - b % multiple_of if b >= multiple_of else b


def choose_batch_size(
    run_batch: Callable[[int], object],
    device: torch.device | str,
    *,
    probe: tuple[int, int] = (1, 2),
    headroom: float = 0.85,
    max_batch: int = 1024,
    multiple_of: int = 8,
    free_bytes: float | None = None,
    peak_bytes: Callable[[Callable[[], object], torch.device | str], int] = measure_peak_bytes,
) -> int:
    """A batch size for ``run_batch(b)`` (e.g. one guided sampling step of b samples) from the
    device's free memory: the peak memory at the two ``probe`` sizes gives the per-sample and
    fixed costs (a line through the two points), then :func:`auto_batch_size`."""
    b1, b2 = probe
    if not 0 < b1 < b2:
        raise ValueError(f"probe must be two increasing batch sizes; got {probe}")
    p1 = peak_bytes(lambda: run_batch(b1), device)
    p2 = peak_bytes(lambda: run_batch(b2), device)
    per_sample = max((p2 - p1) / (b2 - b1), 1.0)
    fixed = max(p1 - per_sample * b1, 0.0)
    free = free_memory(device) if free_bytes is None else free_bytes
    return auto_batch_size(
        per_sample,
        free,
        fixed_bytes=fixed,
        headroom=headroom,
        max_batch=max_batch,
        multiple_of=multiple_of,
    )
