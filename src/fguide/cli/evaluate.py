"""``fguide evaluate REF SAMPLES``: FID, sFID, IS, precision/recall with ADM's definitions.

REF is an ADM reference batch (``arr_0`` images, optionally ``mu``/``sigma``/``mu_s``/
``sigma_s``), SAMPLES an ADM sample batch (``arr_0``, ``arr_1``); either may be a folder of
PNG/JPEG images. Prints a table and writes ``metrics.json`` (values, where every statistic
came from, checksums of the reference and of the Inception weights, versions). The reference's
features are cached (``--cache-dir``), so evaluating many sample batches against one reference
extracts its features once. See :mod:`fguide.evaluation`.

``--out`` is claimed before any feature is computed (:mod:`fguide.io.folders`: a folder holding
files that fguide evaluate did not write is refused, and the folder must take a file). The
table is printed before ``metrics.json`` is written; if ``--out`` fills up or turns read-only
meanwhile, the metrics are kept in the cache folder's ``unsaved-metrics/`` (else the system's
temporary folder) and the error names the file.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from fguide.cli import POSITIVE_INT
from fguide.evaluation import default_cache_dir, evaluate
from fguide.io.features import CACHE_MAX_ENV, DEFAULT_CACHE_MAX_GB
from fguide.io.files import atomic_write_json, provenance
from fguide.io.folders import claim_folder
from fguide.models.inception import INCEPTION_WEIGHTS_ENV
from fguide.weights import resolve_inception

KIND = "evaluate"  # the job kind of its --out folder (fguide.io.folders)
METRICS = "metrics.json"
HELP = "FID, sFID, Inception Score and precision/recall of SAMPLES against REF (ADM's evaluator)."

ROWS = (
    ("inception_score", "Inception Score"),
    ("fid", "FID"),
    ("sfid", "sFID"),
    ("precision", "Precision"),
    ("recall", "Recall"),
)


def configure(p: argparse.ArgumentParser) -> None:
    # The API's defaults, so that --help and fguide.evaluation.evaluate agree.
    api = {k: v.default for k, v in inspect.signature(evaluate).parameters.items()}
    p.add_argument("ref", type=Path, help="reference batch (.npz) or image folder")
    p.add_argument(
        "samples",
        type=Path,
        help="sample batch (.npz), image folder, or an fguide sample run folder",
    )
    p.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"FID Inception weight file (pt_inception-2015-12-05-6726825d.pth or "
        f"weights-inception-2015-12-05-6726825d.pth); default ${INCEPTION_WEIGHTS_ENV}",
    )
    p.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="find the Inception weight file here by name (fguide weights download "
        "pt_inception-2015-12-05-6726825d.pth --dir DIR; default: not used)",
    )
    p.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=None,
        metavar="N",
        help="images per batch (default 64 CPU, 256 GPU)",
    )
    p.add_argument(
        "--device",
        default="auto",
        metavar="DEV",
        help="auto (GPU when there is one), cpu, cuda:N (default %(default)s)",
    )
    p.add_argument(
        "--image-size",
        type=POSITIVE_INT,
        default=None,
        metavar="N",
        help="centre-crop folder images to N×N as ADM prepares ImageNet (npz files: unchanged; "
        "default: folder images as they are)",
    )
    p.add_argument(
        "--out",
        type=_out_folder,
        default=Path("fguide-eval"),
        metavar="DIR",
        help="folder for metrics.json (default %(default)s)",
    )
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"reference-feature cache (default {default_cache_dir()}; ~70 MB per reference, "
        f"bounded by ${CACHE_MAX_ENV} GB, default {DEFAULT_CACHE_MAX_GB:g}: the least recently "
        "used go first)",
    )
    cache.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument(
        "--compare",
        type=Path,
        default=None,
        metavar="FILE",
        help="a previous metrics.json: shown side by side, with a warning if not comparable",
    )
    p.add_argument(
        "--pr-mode",
        choices=("float32", "float64", "float16"),
        default=api["pr_mode"],
        help="precision/recall distance precision (float16: ADM's scheme, for GPUs; "
        "default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=POSITIVE_INT,
        default=api["workers"],
        metavar="N",
        help="image-decoding threads (folders; default %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _out_folder(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (give a folder, e.g. fguide-eval)")
    return Path(text)


def keep_metrics(data: dict[str, Any], cache_dir: Path | None) -> Path | None:
    """Write ``data`` where it can still be written when ``--out`` cannot take it: the feature
    cache's ``unsaved-metrics/`` folder, else the system's temporary folder. Returns the file,
    or None when neither takes it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"metrics-{stamp}-{os.getpid()}.json"
    places = [Path(tempfile.gettempdir()) / "fguide-unsaved-metrics"]
    if cache_dir is not None:
        places.insert(0, Path(cache_dir) / "unsaved-metrics")
    for folder in places:
        try:
            return atomic_write_json(folder / name, data)
        except OSError:
            continue
    return None


def write_metrics(out: Path, data: dict[str, Any], cache_dir: Path | None) -> Path:
    """``out/metrics.json``; when it cannot be written, an ``OSError`` saying where the metrics
    were kept instead (:func:`keep_metrics`), or that they are only in the printed table."""
    target = out / METRICS
    try:
        return atomic_write_json(target, data)
    except OSError as err:
        why = err.strerror or str(err) or type(err).__name__
        kept = keep_metrics(data, cache_dir)
        where = (
            f"kept in {kept}"
            if kept is not None
            else "not kept anywhere else (no writable fallback folder): copy the table above"
        )
        msg = f"--out: could not write {target} ({why}); the metrics are printed above and {where}"
        raise OSError(msg) from None


def _fmt(v: Any, sign: str = "") -> str:
    if v is None:
        return "—"
    # Four decimals as papers print them; tiny values (toy batches) in scientific notation.
    return f"{v:{sign}.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:{sign}.3e}"


def table(result: dict[str, Any]) -> str:
    """The metrics as a fixed-width table (with the compared run's values when given)."""
    comp = result.get("comparison")
    head = f"{'metric':<16}{'value':>12}"
    if comp:
        head += f"{'compared':>12}{'difference':>12}"
    lines = [head, "-" * len(head)]
    for key, name in ROWS:
        v = result["metrics"].get(key)
        line = f"{name:<16}{_fmt(v):>12}"
        if comp:
            o = comp["metrics"].get(key)
            diff = None if v is None or o is None else v - o
            line += f"{_fmt(o):>12}{_fmt(diff, '+'):>12}"
        lines.append(line)
    n = result["samples"]["num_images"]
    stats = result["reference"]["statistics"]
    lines.append(
        f"{n} samples vs {result['reference']['num_images']} reference images; reference "
        f"statistics: FID {stats['fid']}, sFID {stats['sfid']}"
    )
    if comp:
        lines.append(f"compared with {comp['path']} ({comp['num_samples']} samples)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    # Before any feature is computed: --out holds no one else's files and takes a file (the
    # ownership record is written now).
    with claim_folder(args.out, KIND, (METRICS,)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = evaluate(
                args.ref,
                args.samples,
                weights=resolve_inception(args.inception_weights, args.weights_dir),
                batch_size=args.batch_size,
                device=args.device,
                cache_dir=cache_dir,
                compare=args.compare,
                pr_mode=args.pr_mode,
                workers=args.workers,
                progress=not args.no_progress,
                image_size=args.image_size,
            )
        messages = list(dict.fromkeys(str(w.message) for w in caught))
        for msg in messages:
            print(f"fguide evaluate: warning: {msg}", file=sys.stderr)
        data = result.to_dict()
        # Every warning of the run, including those of the numerics (e.g. FID's regulariser).
        data["warnings"] = list(dict.fromkeys([*result.warnings, *messages]))
        data["provenance"] = provenance(cache_dir=str(cache_dir) if cache_dir else None)
        print(table(data))  # first: minutes of work survive an --out that fills up now
        path = write_metrics(args.out, data, cache_dir)
    print(f"wrote {path}")
    return 0
