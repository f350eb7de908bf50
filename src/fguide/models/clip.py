"""CLIP as an off-the-shelf guide (EluCD §5.4): a zero-shot head over text prompts.

A :class:`CLIPHead` wraps transformers' ``CLIPModel`` loaded offline from a local model folder
(safetensors only) and maps the x̂0 image in [−1, 1] (NCHW) to logits over K prompts,

    f_k(x) = s · cos(E_img(P(x)), E_txt(prompt_k)),   s = exp(logit_scale) (CLIP's own, 100),

which is exactly CLIP's ``logits_per_image``. P is the image processor's convention done
differentiably in torch: map [−1, 1] → [0, 1], resize the shortest side to ``size`` (bicubic),
centre-crop to ``crop_size``, normalise with ``image_mean``/``image_std``. The text embeddings
are computed once, at construction, without gradient.

How the objectives of METHODS.md apply:

- **Several prompts** (or a prompt file, or the 1000 ImageNet class names with CLIP's template
  ``"a photo of a {}."``): f is a zero-shot classifier over the prompts and every objective
  applies unchanged; the label y of a sample is the index of its target prompt.
- **One prompt** (EluCD's text-to-image setting): f has one column, f_0 = s · cos. The base
  score is then S = τ1 f_0 − log exp(τ2 f_0) = (τ1 − τ2) · s · cos: guidance on the cosine
  similarity, as EluCD does, with the effective weight (τ1 − τ2) · s · γ. With τ2 = 0 it is
  pure similarity, S = s · cos (the named configuration uses τ1 = 1, τ2 = 0). With N = 1,
  softmax(f) = 1, so the entropy and every divergence toward q_y (q = 1) are identically zero
  and their gradients vanish: only the base term (and tilting across the batch) acts.

CLIP score along a trajectory: :class:`CLIPScoreRecorder`, a sampler callback whose per-step
curve merges across batches, shards and processes like the trajectory recorder's, and is added
to ``trajectory.json`` under ``curves["clip_score"]`` (and ``curves["clip_cosine"]``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

from fguide.diagnostics import StepStatistic
from fguide.models.hf_files import Rule, check_clip_folder, check_fields, read_json_object
from fguide.models.imagenet_classes import IMAGENET_CLASSNAMES

if TYPE_CHECKING:
    from fguide.samplers import StepRecord

__all__ = [
    "CLIP_SCORE_WEIGHT",
    "CLIP_TEMPLATE",
    "CLIPHead",
    "CLIPPreprocess",
    "CLIPScoreRecorder",
    "clip_preprocess",
    "clip_score",
    "encode_prompts",
    "imagenet_prompts",
    "load_clip_head",
    "read_prompt_file",
    "resize_output_size",
]

#: CLIP's basic zero-shot prompt template (Radford et al. 2021).
CLIP_TEMPLATE = "a photo of a {}."
#: CLIP score = CLIP_SCORE_WEIGHT · max(cos, 0): torchmetrics' ``CLIPScore`` convention (the one
#: most text-to-image papers report). Hessel et al.'s CLIPScore uses w = 2.5 instead: divide by 40.
CLIP_SCORE_WEIGHT = 100.0

# OpenAI CLIP's normalisation, the processor's default when a folder has no preprocessor config.
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_SIDES: dict[str, Rule] = {
    "shortest_edge": ("int", 1, 4096),
    "height": ("int", 1, 4096),
    "width": ("int", 1, 4096),
}
_PREPROCESS_RULES: dict[str, Rule] = {
    "size": ("int|obj", 1, 4096),
    "crop_size": ("int|obj", 1, 4096),
    "resample": ("int", 0, 5),
    "image_mean": ("nums", 0.0, 1.0),
    "image_std": ("nums", 0.0, 10.0),
    "do_resize": ("bool", 0, 0),
    "do_center_crop": ("bool", 0, 0),
    "do_rescale": ("bool", 0, 0),
    "do_normalize": ("bool", 0, 0),
}
"""preprocessor_config.json fields fguide reads (``size``/``crop_size`` may also be objects)."""

# PIL resampling codes as stored in preprocessor_config.json.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class CLIPPreprocess:
    """The image processor's conventions (``preprocessor_config.json``), applied in torch."""

    size: int
    """Target length of the shortest side after resizing (``size["shortest_edge"]``)."""
    crop_height: int
    crop_width: int
    mean: tuple[float, float, float] = _OPENAI_MEAN
    std: tuple[float, float, float] = _OPENAI_STD
    resample: Literal["bicubic", "bilinear"] = "bicubic"
    do_resize: bool = True
    do_center_crop: bool = True

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], image_size: int) -> CLIPPreprocess:
        """Read ``preprocessor_config.json`` (old int or new dict ``size``/``crop_size`` forms);
        without one, CLIP's defaults at the vision tower's ``image_size``."""
        file = Path(folder) / "preprocessor_config.json"
        if not file.is_file():
            return cls(size=image_size, crop_height=image_size, crop_width=image_size)
        settings = read_json_object(file, "a CLIP image processor config")
        check_fields(settings, _PREPROCESS_RULES, file)
        for key in ("size", "crop_size"):
            value = settings.get(key)
            if isinstance(value, dict):
                need = ("height", "width") if key == "crop_size" else ()
                check_fields(value, _SIDES, f"{file} ({key})", need)
        if settings.get("do_rescale", True) is False or settings.get("do_normalize", True) is False:
            raise ValueError(f"{file}: do_rescale/do_normalize false is not supported")
        size = settings.get("size", image_size)
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise ValueError(f"{file}: size must give 'shortest_edge'; got {size}")
            size = size["shortest_edge"]
        crop = settings.get("crop_size", size)
        ch, cw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        resample = settings.get("resample", 3)
        if resample not in _RESAMPLE:
            raise ValueError(
                f"{file}: resample {resample} is not supported (2 bilinear, 3 bicubic)"
            )
        mean = tuple(float(v) for v in settings.get("image_mean", _OPENAI_MEAN))
        std = tuple(float(v) for v in settings.get("image_std", _OPENAI_STD))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"{file}: image_mean and image_std need 3 values (std > 0)")
        return cls(
            size=int(size),
            crop_height=int(ch),
            crop_width=int(cw),
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            resample=_RESAMPLE[resample],  # type: ignore[arg-type]
            do_resize=bool(settings.get("do_resize", True)),
            do_center_crop=bool(settings.get("do_center_crop", True)),
        )


def resize_output_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shortest side to ``size``: the long side becomes
    ``int(size · long / short)`` (truncated, as transformers' processors compute it)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def clip_preprocess(
    x: Tensor, pre: CLIPPreprocess, mean: Tensor | None = None, std: Tensor | None = None
) -> Tensor:
    """CLIP's ``pixel_values`` from x ∈ [−1, 1] (NCHW), differentiably.

    (x + 1)/2 → resize (shortest side to ``size``) → centre crop → (v − mean)/std. The resize is
    ``F.interpolate(..., antialias=True)``: PIL's filters (bicubic with a = −0.5, support widened
    by the scale when shrinking), which the PIL processor applies. Differences from the
    processor, all below one grey level: PIL resamples the uint8 image and rounds (and clamps
    bicubic overshoot to [0, 255]) before rescaling; here nothing is rounded or clamped, so the
    gradient exists everywhere. ``mean``/``std`` ([3, 1, 1], on x's device) save building
    them from ``pre`` on every call.
    """
    v = (x + 1) / 2
    if pre.do_resize:
        h, w = resize_output_size(v.shape[-2], v.shape[-1], pre.size)
        if (h, w) != tuple(v.shape[-2:]):
            v = F.interpolate(
                v, size=(h, w), mode=pre.resample, align_corners=False, antialias=True
            )
    if pre.do_center_crop:
        h, w = v.shape[-2:]
        if pre.crop_height > h or pre.crop_width > w:
            raise ValueError(
                f"CLIP centre crop {pre.crop_height}x{pre.crop_width} is larger than the "
                f"resized image {h}x{w}"
            )
        top, left = (h - pre.crop_height) // 2, (w - pre.crop_width) // 2
        v = v[..., top : top + pre.crop_height, left : left + pre.crop_width]
    if mean is None:
        mean = torch.tensor(pre.mean, dtype=v.dtype, device=v.device)[:, None, None]
    if std is None:
        std = torch.tensor(pre.std, dtype=v.dtype, device=v.device)[:, None, None]
    return (v - mean) / std


def _image_embeds(model: Any, pixel_values: Tensor) -> Tensor:
    """CLIP's image embedding (before normalisation): visual_projection(vision pooler)."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    emb: Tensor = model.visual_projection(pooled)
    return emb


def encode_prompts(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int = 256
) -> Tensor:
    """Unit-norm CLIP text embeddings [K, D] of ``prompts`` (no gradient; padded and truncated
    to the text tower's context length, as CLIP's processor does)."""
    max_len = int(model.config.text_config.max_position_embeddings)
    param = next(model.parameters())
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            tok = tokenizer(
                list(prompts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            pooled = model.text_model(
                input_ids=tok["input_ids"].to(param.device),
                attention_mask=tok["attention_mask"].to(param.device),
            ).pooler_output
            emb = model.text_projection(pooled)
            out.append(emb / emb.norm(dim=-1, keepdim=True))
    return torch.cat(out).to(param.dtype)


class CLIPHead(nn.Module):
    """x̂0 ∈ [−1, 1] (NCHW) → logits f_k = s · cos(image embedding, prompt k), [B, K].

    ``logit_scale`` s defaults to the model's exp(logit_scale) (so f is CLIP's
    ``logits_per_image``); another value is a temperature for the zero-shot softmax.
    Parameters are frozen, the model is in eval mode; the input is cast to the head's dtype.
    """

    text_embeds: Tensor
    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(
        self,
        model: nn.Module,
        text_embeds: Tensor,
        prompts: Sequence[str],
        preprocess: CLIPPreprocess,
        logit_scale: float | None = None,
    ):
        super().__init__()
        if text_embeds.ndim != 2 or text_embeds.shape[0] != len(prompts) or not prompts:
            raise ValueError(
                f"text_embeds must be [K, D] with K = len(prompts) ≥ 1; got "
                f"{tuple(text_embeds.shape)} for {len(prompts)} prompts"
            )
        self.model = model.eval().requires_grad_(False)
        self.prompts: tuple[str, ...] = tuple(prompts)
        self.preprocess = preprocess
        scale = float(model.logit_scale.exp()) if logit_scale is None else float(logit_scale)  # type: ignore[operator]
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"logit_scale must be a positive finite number; got {scale}")
        self.logit_scale = scale
        self.register_buffer("text_embeds", text_embeds.detach().clone())
        # In the state dict too, so that a weights checksum also identifies an overridden scale.
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float64))
        # Not persistent: the normalisation constants move with the module but stay out of the
        # state dict (and so out of its checksum).
        dt = text_embeds.dtype
        mean = torch.tensor(preprocess.mean, dtype=dt)[:, None, None]
        self.register_buffer("pixel_mean", mean, persistent=False)
        std = torch.tensor(preprocess.std, dtype=dt)[:, None, None]
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.prompts)

    def pixel_values(self, x: Tensor) -> Tensor:
        """The processor-equivalent ``pixel_values`` of x ∈ [−1, 1]."""
        return clip_preprocess(
            x.to(self.text_embeds.dtype), self.preprocess, self.pixel_mean, self.pixel_std
        )

    def image_embeds(self, x: Tensor) -> Tensor:
        """Unit-norm CLIP image embeddings [B, D] of x ∈ [−1, 1]."""
        emb = _image_embeds(self.model, self.pixel_values(x))
        return emb / emb.norm(dim=-1, keepdim=True)

    def cosine(self, x: Tensor) -> Tensor:
        """cos(image embedding, prompt embedding k), [B, K]."""
        return self.image_embeds(x) @ self.text_embeds.T

    def forward(self, x: Tensor) -> Tensor:
        return self.logit_scale * self.cosine(x)

    def target_index(self, target: int | str) -> int:
        """The class index of a target given as an index or as the exact prompt text."""
        if isinstance(target, str) and not target.lstrip("-").isdigit():
            if target not in self.prompts:
                raise ValueError(
                    f"target {target!r} is not one of the {self.num_classes} prompts"
                    f" (first: {list(self.prompts[:3])})"
                )
            return self.prompts.index(target)
        k = int(target)
        if not 0 <= k < self.num_classes:
            raise ValueError(
                f"target must lie in [0, {self.num_classes}) for {self.num_classes} prompt(s); "
                f"got {k}"
            )
        return k

    def describe(self) -> dict[str, Any]:
        """What defines this head beyond the weights: prompts, scale and preprocessing."""
        return {
            "num_prompts": self.num_classes,
            "prompts": list(self.prompts[:5]) + (["…"] if self.num_classes > 5 else []),
            "logit_scale": self.logit_scale,
            "preprocess": asdict(self.preprocess),
        }


def read_prompt_file(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a UTF-8 text file: one per line, surrounding whitespace stripped, blank
    lines and lines starting with ``#`` skipped."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file not found: {file}")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {file} is not UTF-8 text ({err})") from None
    prompts = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {file} has no prompts (one per line; '#' comments)")
    return prompts


def imagenet_prompts(template: str = CLIP_TEMPLATE) -> list[str]:
    """The 1000 ImageNet class names in ``template`` (``{}`` marks the name), in class order."""
    if "{}" not in template:
        raise ValueError(
            f"template must contain '{{}}' where the class name goes; got {template!r}"
        )
    return [template.format(name) for name in IMAGENET_CLASSNAMES]


def _resolve_prompts(
    prompts: Sequence[str] | str | None,
    prompt_file: str | os.PathLike[str] | None,
    imagenet: bool,
    template: str,
) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    given = sum([bool(prompts), prompt_file is not None, imagenet])
    if given != 1:
        raise ValueError(
            "a CLIP guide needs exactly one source of prompts: prompts (one or more), "
            f"prompt_file, or imagenet=True; got {given}"
        )
    if prompt_file is not None:
        return read_prompt_file(prompt_file)
    if imagenet:
        return imagenet_prompts(template)
    out = [str(p).strip() for p in prompts or ()]
    if any(not p for p in out):
        raise ValueError("prompts must not be empty strings")
    return out


def load_clip_head(
    path: str | os.PathLike[str],
    prompts: Sequence[str] | str | None = None,
    *,
    prompt_file: str | os.PathLike[str] | None = None,
    imagenet: bool = False,
    template: str = CLIP_TEMPLATE,
    logit_scale: float | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> CLIPHead:
    """A :class:`CLIPHead` from a local transformers CLIP folder, offline.

    ``path`` holds ``config.json``, ``model.safetensors`` (pickled ``.bin`` weights are refused),
    the tokenizer files (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``) and optionally
    ``preprocessor_config.json``. The prompts come from exactly one of ``prompts`` (one string
    or several), ``prompt_file`` (:func:`read_prompt_file`) or ``imagenet=True`` (the 1000
    ImageNet class names in ``template``; index k is ImageNet class k).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"CLIP model folder {folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"CLIP model folder {folder} has no .safetensors weights (fguide never unpickles "
            "weights; convert pytorch_model.bin with transformers' save_pretrained)"
        )
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not (has_bpe or (folder / "tokenizer.json").is_file()):
        # CLIPTokenizer would silently build an empty vocabulary: refuse instead.
        raise FileNotFoundError(
            f"CLIP model folder {folder} has no tokenizer (vocab.json + merges.txt, or "
            "tokenizer.json)"
        )
    texts = _resolve_prompts(prompts, prompt_file, imagenet, template)

    from transformers import CLIPModel, CLIPTokenizer  # optional dependency: import on use

    net = check_clip_folder(folder)  # config values, weight keys and shapes, first
    image_size = int(net.config.vision_config.image_size)
    pre = CLIPPreprocess.from_folder(folder, image_size)
    crop = (pre.crop_height, pre.crop_width) if pre.do_center_crop else None
    if crop != (image_size, image_size) or pre.size < image_size:
        raise ValueError(
            f"{folder}: the processor's crop {crop} and size {pre.size} must give the vision "
            f"tower's {image_size}x{image_size} input"
        )
    try:  # the tokenizer first: it is quick, and a bad one fails before the weights are read
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        model: Any = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except Exception as err:  # the tokenizers library raises bare Exception for a bad vocabulary
        reason = (str(err).splitlines() or [type(err).__name__])[0][:300]
        raise ValueError(
            f"CLIP model folder {folder}: transformers cannot load it ({reason}); expected a "
            "folder written by CLIPModel/CLIPTokenizer.save_pretrained"
        ) from err
    model = model.to(device=device or "cpu", dtype=dtype).eval().requires_grad_(False)
    return CLIPHead(model, encode_prompts(model, tokenizer, texts), texts, pre, logit_scale)


# -- CLIP score along the trajectory ---------------------------------------------------------


def clip_score(cos: Tensor) -> Tensor:
    """The CLIP score of a cosine similarity: 100 · max(cos, 0) (:data:`CLIP_SCORE_WEIGHT`)."""
    return CLIP_SCORE_WEIGHT * cos.clamp_min(0)


class CLIPScoreRecorder(StepStatistic):
    """Sampler callback: per step, the mean CLIP score of x̂0 against each sample's target prompt.

    clip_score = 100 · max(cos, 0) (:data:`CLIP_SCORE_WEIGHT`), clip_cosine = cos, both averaged
    over the samples seen at that step. Labels: ``labels`` if given, else the guidance's labels
    (a step without either is skipped). By default the head runs on ``rec.x0`` (one extra
    forward without gradient, any guide or none; ``view`` maps it to the head's image first: a
    latent model's decoder); ``from_guidance=True`` instead reads the
    cosine off the guidance logits, f_y / s — valid only when this head is the guide and sees
    x̂0 (DDPM/DDIM), and then free. Batches, shards and processes merge by summing
    (:class:`~fguide.diagnostics.StepStatistic`).
    """

    name = "clip"
    columns = ("n", "cos_sum", "score_sum")
    curve_columns = (("clip_score", "score_sum"), ("clip_cosine", "cos_sum"))
    summary_of = ("final_clip_score", "clip_score")
    definition = (
        "clip_score",
        "mean over samples of 100 * max(cos(CLIP image embedding of x0, target prompt), 0)",
    )

    def __init__(
        self,
        head: CLIPHead,
        labels: Tensor | None = None,
        *,
        from_guidance: bool = False,
        view: Callable[[Tensor], Tensor] | None = None,
    ):
        super().__init__()
        self.head, self.labels, self.from_guidance = head, labels, from_guidance
        self.view = view

    def step_sums(self, rec: StepRecord) -> tuple[int, Tensor] | None:
        """(n, [Σ cos, Σ score]) of the step's samples, on the device."""
        res = rec.guidance
        labels = self.labels if self.labels is not None else (None if res is None else res.labels)
        if labels is None:
            return None
        if self.from_guidance:
            if res is None:
                return None
            f_y = res.logits.double().gather(-1, labels[:, None].to(res.logits.device))
            cos = f_y.squeeze(-1) / self.head.logit_scale
        else:
            with torch.no_grad():
                x0 = rec.x0 if self.view is None else self.view(rec.x0)
                cos = self.head.cosine(x0).double()
            cos = cos.gather(-1, labels[:, None].to(cos.device)).squeeze(-1)
        return len(cos), torch.stack([cos.sum(), clip_score(cos).sum()])

    @classmethod
    def from_state(cls, state: dict[str, NDArray[Any]], head: Any = None) -> CLIPScoreRecorder:
        """Inverse of :meth:`state` (other keys are ignored; no ``clip_steps``: empty)."""
        rec = cls(head)
        rec._restore(state)
        return rec
