"""CLIP score (:func:`fguide.metrics.clip_score.clip_score`) against an independent computation
through transformers' CLIPModel forward (``logits_per_image`` / exp(logit_scale)), with
torchmetrics' definition written out: max(mean of 100 · cos, 0), overall and per prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from sd_folders import build_clip_folder, one_thread  # noqa: E402

from fguide.metrics.clip_score import clip_score  # noqa: E402
from fguide.models.clip_reward import load_clip_score_model  # noqa: E402

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
CANDIDATES = ["a photo of a cat", "hot dog", "the sea at night", "red", "no dog", "photo", "hot"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_clip_folder(tmp_path_factory.mktemp("clip") / "clip")


def _images(n: int) -> np.ndarray:
    """Smooth uint8 images [n, 20, 24, 3] (non-square: the processor resizes and crops)."""
    g = np.random.default_rng(0)
    base = g.uniform(30, 225, (n, 4, 4, 3))
    img = np.repeat(np.repeat(base, 5, axis=1), 6, axis=2) + g.normal(0, 4, (n, 20, 24, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _reference_cos(folder: Path, images: np.ndarray, texts: list[str]) -> np.ndarray:
    """cos[i, k] of image i and text k from CLIPModel's forward; texts tokenized as
    torchmetrics' CLIPProcessor does (padding, then cut to the context length)."""
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    model: Any = transformers.CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)(
        texts, padding=True, return_tensors="pt"
    )
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=list(images), return_tensors="pt")
    with torch.no_grad():
        out = model(
            input_ids=tok["input_ids"][:, :77],
            attention_mask=tok["attention_mask"][:, :77],
            pixel_values=pixels["pixel_values"],
        )
    return (out.logits_per_image / model.logit_scale.exp()).detach().double().numpy()


def test_clip_score_is_torchmetrics_definition(clip_dir: Path) -> None:
    images = _images(8)
    all_cos = _reference_cos(clip_dir, images, CANDIDATES)
    # three prompts (image i takes prompt i mod 3): the first with a negative mean cosine over
    # its images (the clamp must act), the others positive
    idx = np.arange(8) % 3
    mean = [all_cos[idx == j].mean(0) for j in range(3)]
    first = next(k for k in range(len(CANDIDATES)) if mean[0][k] < 0)
    second = next(k for k in range(len(CANDIDATES)) if mean[1][k] > 0 and k != first)
    third = next(k for k in range(len(CANDIDATES)) if mean[2][k] > 0 and k not in (first, second))
    chosen = [CANDIDATES[k] for k in (first, second, third)]
    cos = _reference_cos(clip_dir, images, chosen)
    mine = cos[np.arange(8), idx]

    res = clip_score(*load_clip_score_model(clip_dir), images, chosen)
    # float32 features (2-layer towers): cosines agree to ~1e-6
    np.testing.assert_allclose(res.cosine, mine, atol=2e-6)
    assert res.score == pytest.approx(max(100 * mine.mean(), 0.0), abs=2e-4)
    for k, entry in enumerate(res.per_prompt):
        assert entry["prompt"] == chosen[k] and entry["images"] == int((idx == k).sum())
        assert entry["clip_score"] == pytest.approx(max(100 * mine[idx == k].mean(), 0.0), abs=2e-4)
    assert res.per_prompt[0]["clip_score"] == 0.0  # the clamp of a negative mean
    explicit = clip_score(*load_clip_score_model(clip_dir), images, chosen, prompt_index=[1] * 8)
    assert explicit.per_prompt[1]["images"] == 8 and explicit.per_prompt[0]["clip_score"] is None


def test_long_prompts_are_cut_as_torchmetrics_does(clip_dir: Path) -> None:
    long = "a photo of " * 30 + "a cat"
    images = _images(2)
    with pytest.warns(UserWarning, match="cut to 77 tokens"):
        res = clip_score(*load_clip_score_model(clip_dir), images, [long, "hot dog"])
    cos = _reference_cos(clip_dir, images, [long, "hot dog"])
    np.testing.assert_allclose(res.cosine, [cos[0, 0], cos[1, 1]], atol=2e-6)


def test_bad_inputs_are_refused(clip_dir: Path) -> None:
    model = load_clip_score_model(clip_dir)
    with pytest.raises(ValueError, match="no prompts"):
        clip_score(*model, _images(2), [])
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        clip_score(*model, _images(2).astype(np.float32), ["a"])
    with pytest.raises(ValueError, match="one prompt in"):
        clip_score(*model, _images(2), ["a"], prompt_index=[0, 1])
