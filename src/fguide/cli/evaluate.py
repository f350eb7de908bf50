"""``fguide evaluate REF SAMPLES``: FID, sFID, IS, precision/recall with ADM's definitions.

REF is an ADM reference batch (``arr_0`` images, optionally ``mu``/``sigma``/``mu_s``/
``sigma_s``), SAMPLES an ADM sample batch (``arr_0``, ``arr_1``); either may be a folder of
PNG/JPEG images. Prints a table and writes ``metrics.json`` (values, where every statistic
came from, checksums of the reference and of the Inception weights, versions). The reference's
features are cached (``--cache-dir``), so evaluating many sample batches against one reference
extracts its features once. See :mod:`fguide.evaluation`.

``--clip FOLDER`` adds the CLIP score of SAMPLES against their prompts (torchmetrics'
definition, overall and per prompt; :mod:`fguide.evaluation.clip_score`): a text-to-image run's
own prompts, or ``--clip-prompt`` / ``--clip-prompt-file``, which take precedence. With
``--clip``, REF may be left out: then only the CLIP score is computed (no Inception needed).
The prompts and the CLIP folder are checked before any image is read.

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
from fguide.evaluation import EVALUATOR_VERSION, EvaluationWarning, default_cache_dir, evaluate
from fguide.evaluation.clip_score import (
    CLIPScorer,
    PromptSet,
    clip_section,
    load_scorer,
    resolve_prompts,
    score_source,
)
from fguide.io.features import CACHE_MAX_ENV, DEFAULT_CACHE_MAX_GB
from fguide.io.files import atomic_write_json, provenance
from fguide.io.folders import claim_folder
from fguide.io.images import ImageSource, open_images
from fguide.models.inception import INCEPTION_WEIGHTS_ENV
from fguide.params import ParamError
from fguide.runtime import resolve_device
from fguide.weights import resolve_inception

KIND = "evaluate"  # the job kind of its --out folder (fguide.io.folders)
METRICS = "metrics.json"
HELP = (
    "FID, sFID, Inception Score and precision/recall of SAMPLES against REF (ADM's evaluator); "
    "with --clip, the CLIP score of SAMPLES against their prompts"
)
CLIP_ROW = ("clip_score", "CLIP score")
CLIP_PROMPTS_SHOWN = 20  # per-prompt lines in the printed table (all are in metrics.json)

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
    p.add_argument(
        "ref",
        type=Path,
        nargs="?",
        help="reference batch (.npz) or image folder (may be left out with --clip: then only "
        "the CLIP score is computed)",
    )
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
        help="images per batch, Inception and CLIP (default 64 CPU, 256 GPU)",
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
        help="a previous metrics.json: shown side by side, with a warning if not comparable "
        "(needs REF)",
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
    configure_clip(p)


def configure_clip(p: argparse.ArgumentParser) -> None:
    """``--clip`` and its prompts."""
    p.add_argument(
        "--clip",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="also compute the CLIP score of SAMPLES against their prompts with this local "
        "transformers CLIP folder: max(mean of 100·cos(image, prompt), 0) as torchmetrics "
        "defines it, overall and per prompt; image i takes prompt i mod n (default: not "
        "computed)",
    )
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument(
        "--clip-prompt",
        dest="clip_prompts",
        action="append",
        type=_prompt,
        metavar="TEXT",
        help="a prompt to score against (repeat for several); given prompts take precedence "
        "over a run's own (default: the prompts a text-to-image run recorded)",
    )
    prompts.add_argument(
        "--clip-prompt-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="prompts to score against, one a line ('#' comments), instead of the run's "
        "(default: the prompts a text-to-image run recorded)",
    )


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty prompt")
    return text


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
    """The metrics as a fixed-width table (with the compared run's values when given), then
    the CLIP score per prompt when it was computed."""
    comp = result.get("comparison")
    head = f"{'metric':<16}{'value':>12}"
    if comp:
        head += f"{'compared':>12}{'difference':>12}"
    lines = [head, "-" * len(head)]
    rows = list(ROWS) if result.get("reference") is not None else []
    if CLIP_ROW[0] in result["metrics"]:
        rows.append(CLIP_ROW)
    for key, name in rows:
        v = result["metrics"].get(key)
        line = f"{name:<16}{_fmt(v):>12}"
        if comp:
            o = comp["metrics"].get(key)
            diff = None if v is None or o is None else v - o
            line += f"{_fmt(o):>12}{_fmt(diff, '+'):>12}"
        lines.append(line)
    n = result["samples"]["num_images"]
    if result.get("reference") is not None:
        stats = result["reference"]["statistics"]
        lines.append(
            f"{n} samples vs {result['reference']['num_images']} reference images; reference "
            f"statistics: FID {stats['fid']}, sFID {stats['sfid']}"
        )
    if comp:
        lines.append(f"compared with {comp['path']} ({comp['num_samples']} samples)")
    if result.get("clip") is not None:
        lines += clip_lines(result["clip"])
    return "\n".join(lines)


def clip_lines(clip: dict[str, Any]) -> list[str]:
    """The CLIP score per prompt (the first :data:`CLIP_PROMPTS_SHOWN` prompts)."""
    per = clip["per_prompt"]
    lines = [
        f"CLIP score per prompt ({clip['samples']['num_images']} samples; {len(per)} prompt(s), "
        f"{clip['prompts_source']}; image i takes prompt i mod {len(per)}):",
        f"{'images':>8}{'score':>12}  prompt",
    ]
    for entry in per[:CLIP_PROMPTS_SHOWN]:
        lines.append(f"{entry['images']:>8}{_fmt(entry['clip_score']):>12}  {entry['prompt']}")
    if len(per) > CLIP_PROMPTS_SHOWN:
        lines.append(f"… {len(per) - CLIP_PROMPTS_SHOWN} more prompts in metrics.json")
    return lines


def _check_request(args: argparse.Namespace) -> PromptSet | None:
    """What to compute, refused in one line before anything is read: REF or --clip, prompts
    only with --clip; the CLIP score's prompts (they must exist: the run's or given)."""
    if args.clip is None and (args.clip_prompts or args.clip_prompt_file is not None):
        given = "clip_prompts" if args.clip_prompts else "clip_prompt_file"
        raise ParamError("{0} applies to the CLIP score: give {1} FOLDER too", given, "clip")
    if args.ref is None and args.clip is None:
        raise ParamError(
            "give REF SAMPLES (FID, IS, precision/recall) or {0} FOLDER (the CLIP score of "
            "SAMPLES alone), or both",
            "clip",
        )
    if args.clip is None:
        return None
    if args.ref is None and args.compare is not None:
        raise ParamError("{0} compares FID metrics: give REF too", "compare")
    return resolve_prompts(args.samples, args.clip_prompts, args.clip_prompt_file)


def _open_samples(args: argparse.Namespace) -> ImageSource:
    """SAMPLES, opened once for FID and the CLIP score (a run's samples.npz is hashed once)."""

    def warn(msg: str) -> None:
        warnings.warn(msg, EvaluationWarning, stacklevel=2)

    return open_images(args.samples, args.image_size, warn=warn)


def _clip_score(
    args: argparse.Namespace, scorer: CLIPScorer, prompts: PromptSet, source: ImageSource
) -> dict[str, Any]:
    """The ``clip`` section of metrics.json: SAMPLES streamed through CLIP."""
    dev = next(scorer.model.parameters()).device
    bs = args.batch_size or (256 if dev.type == "cuda" else 64)
    result = score_source(
        source,
        scorer,
        prompts.prompts,
        batch_size=bs,
        workers=args.workers,
        progress=not args.no_progress,
    )
    empty = sum(entry["images"] == 0 for entry in result.per_prompt)
    if empty:
        warnings.warn(
            f"{source.count} samples for {len(prompts.prompts)} prompts: {empty} prompt(s) have "
            "no image (image i takes prompt i mod n), so no score of their own",
            EvaluationWarning,
            stacklevel=2,
        )
    return clip_section(result, scorer, prompts, source, bs)


def _quality(
    args: argparse.Namespace, cache_dir: Path | None, samples: Path | ImageSource
) -> tuple[dict[str, Any], list[str]]:
    """FID, sFID, IS and precision/recall (:func:`fguide.evaluation.evaluate`) as metrics.json's
    sections, with the warnings of the numerics."""
    result = evaluate(
        args.ref,
        samples,
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
    return result.to_dict(), result.warnings


def run(args: argparse.Namespace) -> int:
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    prompts = _check_request(args)
    # The CLIP folder is checked (and read) before --out is claimed and any image is read.
    scorer = None
    if args.clip is not None:
        scorer = load_scorer(args.clip, resolve_device(args.device), not args.no_progress)
    # Before any feature is computed: --out holds no one else's files and takes a file (the
    # ownership record is written now).
    with claim_folder(args.out, KIND, (METRICS,)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            source = None if scorer is None else _open_samples(args)
            if args.ref is not None:
                data, notes = _quality(args, cache_dir, args.samples if source is None else source)
            else:
                data = {"evaluator": EVALUATOR_VERSION, "metrics": {}, "reference": None}
                notes = []
            if scorer is not None and prompts is not None and source is not None:
                clip = _clip_score(args, scorer, prompts, source)
                data["metrics"][CLIP_ROW[0]] = clip["clip_score"]
                data.setdefault("samples", clip["samples"])
                data["clip"] = clip
        messages = list(dict.fromkeys(str(w.message) for w in caught))
        for msg in messages:
            print(f"fguide evaluate: warning: {msg}", file=sys.stderr)
        # Every warning of the run, including those of the numerics (e.g. FID's regulariser).
        data["warnings"] = list(dict.fromkeys([*notes, *messages]))
        data["provenance"] = provenance(
            cache_dir=str(cache_dir) if cache_dir else None,
            clip_model_sha256=None if scorer is None else scorer.sha256,
        )
        print(table(data))  # first: minutes of work survive an --out that fills up now
        path = write_metrics(args.out, data, cache_dir)
    print(f"wrote {path}")
    return 0
