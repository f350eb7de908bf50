"""The CLIP score of a sample batch against its prompts (``fguide evaluate --clip FOLDER``).

Definition (:mod:`fguide.metrics.clip_score`, torchmetrics' ``CLIPScore``): with image i's
prompt C_i, cos_i = cos(E_img(I_i), E_txt(C_i)) from CLIP's projected embeddings, and over a
set of images max(mean_i 100 · cos_i, 0) — overall and per prompt. Image i (in the samples'
order: a run's sample index, an npz row, a folder's sorted file order) takes prompt i mod n.

The prompts are the run's own (:func:`run_prompts`: the ``prompts`` its manifest records) or
given explicitly (``clip_prompts`` / ``clip_prompt_file``), which take precedence: they score
samples that record none (an npz, an image folder) or score a run against other text.

The images stream through the CLIP image tower batch by batch (:meth:`ImageSource.batches`),
so memory is bounded by the batch size; only one float64 cosine per image is kept.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fguide.io import runs
from fguide.io.features import ieee_float32
from fguide.io.files import sha256_file
from fguide.io.images import ImageSource
from fguide.metrics.clip_score import (
    CLIPScoreResult,
    image_features,
    paired_cosines,
    score_cosines,
    text_features,
)
from fguide.params import ParamError
from fguide.runtime import resolve_device

__all__ = [
    "CLIP_FILES",
    "PROMPT_RULE",
    "PROMPTS_KEY",
    "CLIPScorer",
    "PromptSet",
    "clip_folder_sha256",
    "clip_section",
    "load_scorer",
    "prompts_condition_samples",
    "resolve_prompts",
    "run_prompts",
    "score_source",
]

#: The key of a run's generation prompts in its manifest's identity (and config).
PROMPTS_KEY = "prompts"
PROMPT_RULE = "image i takes prompt i mod n (n prompts; i in the samples' order)"


# -- the prompts ------------------------------------------------------------------------------


def run_prompts(path: str | os.PathLike[str]) -> list[str] | None:
    """The generation prompts an ``fguide sample`` run recorded: ``prompts`` in its manifest's
    identity, else in its config (the SampleConfig settings), when its model family is a
    text-to-image one (:func:`prompts_condition_samples`); None when ``path`` is no run folder
    (or its ``samples.npz``), the run recorded no prompts, or its prompts are a CLIP guide's
    classes. A malformed entry is an error naming the manifest."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent if p.name == runs.SAMPLES else None
    if folder is None or not runs.is_run_folder(folder):
        return None
    manifest = runs.read_run(folder).manifest
    identity = manifest.get("identity")
    if not isinstance(identity, dict) or not prompts_condition_samples(identity):
        return None
    for section in ("identity", "config"):
        block = manifest.get(section)
        value = block.get(PROMPTS_KEY) if isinstance(block, dict) else None
        if value is None:
            continue
        texts = [value] if isinstance(value, str) else value
        if (
            not isinstance(texts, list)
            or not texts
            or not all(isinstance(t, str) and t.strip() for t in texts)
        ):
            raise ValueError(
                f"{folder / runs.MANIFEST}: {section}.{PROMPTS_KEY} must be a list of "
                f"non-empty prompts; got {value!r:.80}"
            )
        return list(texts)
    return None


def prompts_condition_samples(identity: dict[str, Any]) -> bool:
    """Whether a run's ``prompts`` are what its samples were generated from: its model family
    (``resolved.model.family``) is registered and reads the prompts (a text-to-image family,
    :attr:`fguide.families.base.ModelFamily.reads`). Otherwise (an ADM, EDM or DiT run) the
    prompts are a ``clip:`` guide's classes, and sample i was guided toward its label's prompt,
    not toward prompt i mod n."""
    from fguide import families

    resolved = identity.get("resolved")
    model = resolved.get("model") if isinstance(resolved, dict) else None
    name = model.get("family") if isinstance(model, dict) else None
    family = next((f for f in families.FAMILIES if name is not None and f.name == name), None)
    return family is not None and PROMPTS_KEY in getattr(family, "reads", ())


@dataclass(frozen=True)
class PromptSet:
    """The prompts a CLIP score is computed against, and where they came from."""

    prompts: list[str]
    source: str
    """``the run's manifest``, ``given`` or ``file PATH`` (then, for a run that records prompts
    too: ``(instead of the run's N prompt(s))``)."""


def resolve_prompts(
    samples: str | os.PathLike[str],
    clip_prompts: Sequence[str] | None = None,
    clip_prompt_file: str | os.PathLike[str] | None = None,
) -> PromptSet:
    """The explicit prompts when given (``clip_prompts`` or ``clip_prompt_file``, not both),
    else the run's (:func:`run_prompts`); a :class:`ParamError` naming ``clip_prompts`` when
    there are none. Cheap: run it before any heavy work."""
    from fguide.models.clip import read_prompt_file

    if clip_prompts and clip_prompt_file is not None:
        raise ParamError("give {0} or {1}, not both", "clip_prompts", "clip_prompt_file")
    if clip_prompts:
        texts = [str(t) for t in clip_prompts]
        if not all(t.strip() for t in texts):
            raise ParamError("{0}: an empty prompt", "clip_prompts")
        return PromptSet(texts, "given" + _instead(samples))
    if clip_prompt_file is not None:
        texts = read_prompt_file(clip_prompt_file)
        return PromptSet(texts, f"file {clip_prompt_file}{_instead(samples)}")
    if not Path(samples).exists():  # say so, not that a missing run recorded no prompts
        raise FileNotFoundError(f"samples: {samples}: not found")
    recorded = run_prompts(samples)
    if recorded is None:
        raise ParamError(
            "{path}: no generation prompts recorded (not a text-to-image run; a clip: guide's "
            "prompts are its classes): give the prompts to score against with {0} TEXT "
            "(repeatable) or {1} FILE",
            "clip_prompts",
            "clip_prompt_file",
            path=str(samples),
        )
    return PromptSet(recorded, "the run's manifest")


def _instead(samples: str | os.PathLike[str]) -> str:
    """Which of the run's own prompts given prompts replace (for the record), if any."""
    try:
        recorded = run_prompts(samples)
    except ValueError:  # a malformed record: not used either way
        return ""
    return "" if recorded is None else f" (instead of the run's {len(recorded)} prompt(s))"


# -- the model --------------------------------------------------------------------------------


#: The files of a CLIP folder that transformers reads for the score (weights: *.safetensors).
CLIP_FILES = frozenset(
    {
        "config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "added_tokens.json",
        "model.safetensors.index.json",
    }
)


def clip_folder_sha256(folder: str | os.PathLike[str]) -> tuple[str, dict[str, str]]:
    """SHA-256 over the CLIP folder's files the score reads (:data:`CLIP_FILES` and the
    safetensors weights; each one's name and contents, sorted by name), and each file's own.
    Other files (a Hugging Face snapshot's pickled, Flax or TF copies of the weights) are not
    read, so they neither cost a hash nor change it."""
    root = Path(folder)
    files = {
        f.name: sha256_file(f)
        for f in sorted(root.iterdir())
        if f.is_file() and (f.name in CLIP_FILES or f.suffix == ".safetensors")
    }
    h = hashlib.sha256()
    for name, digest in files.items():
        h.update(f"{name}:{digest}\n".encode())
    return h.hexdigest(), files


@dataclass
class CLIPScorer:
    """A loaded CLIP model, its tokenizer and image processor, and what identifies it."""

    folder: Path
    model: Any
    tokenizer: Any
    processor: Any
    sha256: str
    files: dict[str, str]

    def describe(self) -> dict[str, Any]:
        param = next(self.model.parameters())
        return {
            "path": str(self.folder),
            "sha256": self.sha256,
            "files": self.files,
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device),
            "tf32": False,
        }


def load_scorer(
    folder: str | os.PathLike[str], device: str | torch.device = "auto", progress: bool = True
) -> CLIPScorer:
    """Check and load a local CLIP folder (as for a ``clip:`` guide: safetensors only, offline;
    :func:`fguide.models.clip_reward.load_clip_score_model`) in float32, and hash its files.
    ``progress=False`` also silences transformers' loading bar."""
    from transformers.utils import logging as hf_logging

    from fguide.models.clip_reward import load_clip_score_model

    path = Path(folder)
    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model, tokenizer, processor = load_clip_score_model(path, resolve_device(device))
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    digest, files = clip_folder_sha256(path)
    return CLIPScorer(path, model, tokenizer, processor, digest, files)


# -- the score --------------------------------------------------------------------------------


def score_source(
    source: ImageSource,
    scorer: CLIPScorer,
    prompts: Sequence[str],
    *,
    batch_size: int = 64,
    workers: int = 4,
    progress: bool = True,
) -> CLIPScoreResult:
    """The CLIP score of ``source``'s images against ``prompts`` (image i: prompt i mod n),
    streamed in batches of ``batch_size``; a tqdm bar shows images/s. A non-finite cosine is
    an error naming the image (usually a broken weight file)."""
    if not prompts:
        raise ValueError("the CLIP score needs at least one prompt")
    n = source.count
    index = np.arange(n) % len(prompts)
    cosine = np.empty(n, dtype=np.float64)
    bar = tqdm(
        total=n,
        unit="img",
        desc="clip score",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    start = 0
    with ieee_float32(), bar:
        text = text_features(scorer.model, scorer.tokenizer, prompts)
        for images in source.batches(batch_size, workers):
            end = start + len(images)
            img = image_features(scorer.model, scorer.processor, images, batch_size)
            cosine[start:end] = paired_cosines(img, text, index[start:end])
            bar.update(len(images))
            start = end
    if start != n:
        raise ValueError(f"{source.path}: expected {n} images, read {start}")
    _check_finite(cosine, source)
    return score_cosines(cosine, index, prompts)


def _check_finite(cosine: np.ndarray, source: ImageSource) -> None:
    bad = np.flatnonzero(~np.isfinite(cosine))
    if bad.size:
        raise ValueError(
            f"non-finite CLIP cosine for {bad.size} image(s), first {source.name(int(bad[0]))}: "
            "check the CLIP folder's weights"
        )


def clip_section(
    result: CLIPScoreResult,
    scorer: CLIPScorer,
    prompts: PromptSet,
    source: ImageSource,
    batch_size: int,
) -> dict[str, Any]:
    """The ``clip`` section of ``metrics.json``: the score, per prompt, and what it used."""
    return {
        **result.to_dict(),
        "prompt_rule": PROMPT_RULE,
        "prompts_source": prompts.source,
        "num_prompts": len(prompts.prompts),
        "samples": {
            "path": str(source.path),
            "kind": source.kind,
            # an npz's checksum (a run's was computed when it was opened); a folder: none
            "sha256": source.sha256 if source.kind == "npz" else None,
            "num_images": source.count,
            "image_size": list(source.size),
        },
        "model": scorer.describe(),
        "batch_size": batch_size,
    }
