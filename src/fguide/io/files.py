"""Atomic file writes and run provenance.

Every result file is written to a temporary file in the destination folder and renamed into
place, so an interrupted run never leaves a truncated file under the final name. In a folder
owned by an fguide job (:mod:`fguide.io.folders`) the temporary file's name carries the
folder's token, ``.{name}.fg-{token}-XXXXXXXX.tmp``: that naming is what proves a leftover
temporary file is fguide's to delete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


#: The ownership record of a folder an fguide job writes into (see :mod:`fguide.io.folders`).
RECORD = ".fguide.json"
TEMP_TAG = "fg-"  # temporary files of an owned folder: .{name}.fg-{token}-XXXXXXXX.tmp


def folder_token(folder: Path) -> str | None:
    """The token of the owned folder ``folder`` or its parent (a run's ``shards/``), if any."""
    for d in (folder, folder.parent):
        try:
            record = json.loads((d / RECORD).read_text())
        except (OSError, ValueError):
            continue
        token = record.get("token") if isinstance(record, dict) else None
        if isinstance(token, str) and token.isalnum():
            return token
    return None


def atomic_write(
    path: str | Path, write: Callable[[IO[bytes]], object], *, token: str | None = None
) -> Path:
    """Write ``path`` atomically: ``write`` fills a temporary file that is then renamed.

    The temporary file carries ``token`` (default: the owning folder's, :func:`folder_token`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = token or folder_token(path.parent)
    prefix = f".{path.name}." + (f"{TEMP_TAG}{token}-" if token else "")
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write strict JSON (non-finite floats become null) atomically."""
    text = json.dumps(_finite(obj), indent=2, allow_nan=False, default=_jsonable)
    return atomic_write_text(path, text + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str):
        return _finite(obj.tolist())
    return obj


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def image_grid(images: NDArray[np.uint8], columns: int = 8) -> NDArray[np.uint8]:
    """uint8 [N, H, W, 3] images tiled row by row, min(columns, N) per row; the unused cells
    of the last row are white."""
    import numpy as np

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    n, h, w, _ = images.shape
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = images[k]
    return canvas


def image_grid_png(images: NDArray[np.uint8], columns: int = 8) -> Callable[[IO[bytes]], None]:
    """A writer of :func:`image_grid` as PNG, for :func:`atomic_write` (a run's ``grid.png``)."""
    from PIL import Image

    canvas = image_grid(images, columns)
    return lambda f: Image.fromarray(canvas).save(f, format="PNG")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def provenance(**extra: Any) -> dict[str, Any]:
    """Who computed a result, when, and with what: versions, command line, host."""
    import numpy
    import torch

    from fguide._version import __version__

    info: dict[str, Any] = {
        "fguide_version": __version__,
        "torch_version": torch.__version__,
        "numpy_version": numpy.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "command": sys.argv,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    info.update(extra)
    return info
