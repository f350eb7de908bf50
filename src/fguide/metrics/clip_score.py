"""CLIP score of images against their prompts, as torchmetrics' ``CLIPScore`` defines it.

For images I_i with prompts C_i: cos_i = cos(E_img(I_i), E_txt(C_i)) with CLIP's projected
embeddings, and over any set of images

    CLIP score = max(mean_i 100 · cos_i, 0)

(torchmetrics averages 100 · cos over the images, then clamps the mean at 0). fguide reports
it over all images and per prompt (the images whose prompt it is). Inputs as torchmetrics'
``CLIPProcessor`` sees them: the image processor on the uint8 images, the prompts tokenized
with padding to the longest and, when one is longer than the text tower's context, every
row cut to that length (torchmetrics' rule, with a warning; the cut row loses its end token).

(The per-step CLIP score along a trajectory, :class:`fguide.models.clip.CLIPScoreRecorder`,
clamps each image's cosine instead: 100 · max(cos_i, 0), averaged. The two agree when no
cosine is negative.)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CLIP_SCORE_SCALE",
    "CLIPScoreResult",
    "clip_score",
    "image_features",
    "paired_cosines",
    "score_cosines",
    "text_features",
]

CLIP_SCORE_SCALE = 100.0


def _unit(v: Any) -> Tensor:
    # get_*_features: a tensor (transformers 4) or an output whose pooler_output is projected (5)
    t: Tensor = v if isinstance(v, Tensor) else v.pooler_output
    return t / t.norm(p=2, dim=-1, keepdim=True)


@torch.no_grad()
def text_features(model: Any, tokenizer: Any, texts: Sequence[str]) -> Tensor:
    """Unit-norm CLIP text embeddings [K, D] of ``texts`` (torchmetrics' tokenization)."""
    tok = tokenizer(list(texts), padding=True, return_tensors="pt")
    ids, mask = tok["input_ids"], tok["attention_mask"]
    limit = int(model.config.text_config.max_position_embeddings)
    if ids.shape[-1] > limit:
        warnings.warn(
            f"a prompt is longer than CLIP's {limit} tokens; every prompt is cut to {limit} "
            "tokens for the CLIP score, as torchmetrics does",
            UserWarning,
            stacklevel=3,
        )
        ids, mask = ids[..., :limit], mask[..., :limit]
    dev = next(model.parameters()).device
    return _unit(model.get_text_features(input_ids=ids.to(dev), attention_mask=mask.to(dev)))


@torch.no_grad()
def image_features(model: Any, processor: Any, images: np.ndarray, batch_size: int = 64) -> Tensor:
    """Unit-norm CLIP image embeddings [N, D] of uint8 images [N, H, W, 3]."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 [N, H, W, 3]; got {images.dtype} {tuple(images.shape)}"
        )
    param = next(model.parameters())
    out = []
    for s in range(0, len(images), batch_size):
        pix = processor(images=list(images[s : s + batch_size]), return_tensors="pt")
        pv = pix["pixel_values"].to(device=param.device, dtype=param.dtype)
        out.append(_unit(model.get_image_features(pixel_values=pv)))
    return torch.cat(out)


@dataclass
class CLIPScoreResult:
    """The CLIP score overall and per prompt, and each image's cosine."""

    score: float
    """max(mean over all images of 100 · cos, 0)."""
    per_prompt: list[dict[str, Any]]
    """Per prompt: ``prompt``, ``images`` (count) and ``clip_score`` (None without images)."""
    cosine: np.ndarray
    """cos_i per image (float64)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "clip_score": self.score,
            "per_prompt": self.per_prompt,
            "definition": "max(mean over images of 100 * cos(CLIP image, CLIP prompt), 0) "
            "(torchmetrics CLIPScore)",
        }


def _score(cos: np.ndarray) -> float:
    return max(float(CLIP_SCORE_SCALE * cos.mean()), 0.0)


def clip_score(
    model: Any,
    tokenizer: Any,
    processor: Any,
    images: np.ndarray,
    prompts: Sequence[str],
    prompt_index: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 64,
) -> CLIPScoreResult:
    """The CLIP score of uint8 ``images`` [N, H, W, 3] against ``prompts``: image i's prompt is
    ``prompts[prompt_index[i]]`` (default i mod len(prompts), fguide's sample-to-prompt rule).

    ``model`` is a transformers ``CLIPModel``, ``tokenizer`` and ``processor`` its tokenizer and
    image processor (:func:`fguide.models.clip_reward.load_clip_score_model` loads all three).
    """
    if not prompts:
        raise ValueError("clip_score: no prompts given")
    n = len(images)
    if n == 0:
        raise ValueError("clip_score: no images given")
    index = np.arange(n) % len(prompts) if prompt_index is None else np.asarray(prompt_index)
    if index.shape != (n,) or index.min() < 0 or index.max() >= len(prompts):
        raise ValueError(
            f"prompt_index must give one prompt in [0, {len(prompts)}) per image ({n})"
        )
    text = text_features(model, tokenizer, prompts)
    img = image_features(model, processor, images, batch_size)
    return score_cosines(paired_cosines(img, text, index), index, prompts)


def paired_cosines(image: Tensor, text: Tensor, index: Sequence[int] | np.ndarray) -> np.ndarray:
    """cos_i = ⟨image_i, text_{index_i}⟩ of unit-norm embeddings, in float64 [N]."""
    pick = text[torch.as_tensor(np.asarray(index), device=text.device)].to(image.device)
    return (image.double() * pick.double()).sum(-1).cpu().numpy()


def score_cosines(
    cosine: np.ndarray, index: Sequence[int] | np.ndarray, prompts: Sequence[str]
) -> CLIPScoreResult:
    """The CLIP score of per-image cosines ``cosine`` [N], image i's prompt being
    ``prompts[index[i]]``: overall and per prompt (module docstring)."""
    cos_np = np.asarray(cosine, dtype=np.float64)
    idx = np.asarray(index)
    per_prompt = [
        {
            "prompt": p,
            "images": int((idx == k).sum()),
            "clip_score": _score(cos_np[idx == k]) if (idx == k).any() else None,
        }
        for k, p in enumerate(prompts)
    ]
    return CLIPScoreResult(score=_score(cos_np), per_prompt=per_prompt, cosine=cos_np)
