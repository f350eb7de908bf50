"""A scalar reward on CLIP image embeddings as a guide (``--guide reward:CLIP_FOLDER:HEAD_FILE``),
and the CLIP model a CLIP score is computed with.

The reward is r(x) = h(e(x)) with e(x) the unit-norm CLIP image embedding of x ∈ [−1, 1]
(:meth:`~fguide.models.clip.CLIPHead.image_embeds`: CLIP's preprocessing done differentiably)
and h a stack of linear layers read from HEAD_FILE (safetensors, or a PyTorch state dict read
with ``weights_only=True``), applied in the order of their names with nothing between them —
the layout of the LAION aesthetic predictors (``layers.0``, ``layers.2``, …, whose dropouts
hold no weights, or one ``weight``/``bias`` pair). Its input width must be CLIP's projection
width and its output one value: :class:`RewardHead` returns r as a [B, 1] "logit".

Objectives for a scalar (:func:`reward_objective`): the guidance score is the reward itself,
S = r, on the sampler's usual schedule (γ and, for DDPM, the variance and sine boost) — the
base objective's analogue: the base score on one output with τ1 = 1, τ2 = 0 is exactly r, so
∂S/∂r = 1 and g = ∇_x r by one backward pass. Tilting applies (weights from r within each
group, up-weighting low-reward samples for t < 0). Every other objective needs a distribution
over classes and is refused by name: with one output softmax ≡ 1, so the entropy and every
divergence toward q_y are identically zero (their gradients vanish), and ``logsoftmax``
(τ2 = τ1) cancels to S ≡ 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fguide.models.clip import CLIPHead, load_clip_head
from fguide.models.loading import load_state_dict_file
from fguide.objectives import Objective

__all__ = [
    "REWARD_PREFIX",
    "RewardHead",
    "load_clip_score_model",
    "load_reward_head",
    "parse_reward_spec",
    "read_linear_stack",
    "reward_objective",
]

REWARD_PREFIX = "reward:"
_DIVERGENCE = "a divergence toward q_y needs a distribution over classes; over one output it is 0"
_SCALAR_REFUSED = {
    "logsoftmax": "with one output τ1 r − log exp(τ1 r) ≡ 0",
    "entropy": "the entropy of softmax over one output is identically 0",
    **dict.fromkeys(("rkl", "fkl", "js", "hellinger", "f"), _DIVERGENCE),
}


def parse_reward_spec(spec: str) -> tuple[Path, Path]:
    """(CLIP folder, head file) of ``reward:CLIP_FOLDER:HEAD_FILE`` (split at the first colon
    after the prefix)."""
    if not spec.startswith(REWARD_PREFIX) or ":" not in spec[len(REWARD_PREFIX) :]:
        raise ValueError(f"--guide {spec!r}: expected reward:CLIP_FOLDER:HEAD_FILE")
    folder, head = spec[len(REWARD_PREFIX) :].split(":", 1)
    if not folder or not head:
        raise ValueError(f"--guide {spec!r}: expected reward:CLIP_FOLDER:HEAD_FILE")
    return Path(folder), Path(head)


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _read_tensors(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"reward head file not found: {path}")
    if path.suffix != ".safetensors":
        return load_state_dict_file(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def read_linear_stack(path: str | Path, in_features: int) -> nn.Sequential:
    """The linear layers of a reward head file, in name order (module docstring); a ValueError
    names the file and the key when the tensors are not a chain ``in_features`` → … → 1."""
    file = Path(path)
    tensors = _read_tensors(file)
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf not in ("weight", "bias"):
            raise ValueError(f"{file}: {key!r} is not a linear layer's weight or bias")
        groups.setdefault(prefix, {})[leaf] = value
    if not groups:
        raise ValueError(f"{file}: no tensors")
    layers, width = [], in_features
    for prefix in sorted(groups, key=_natural):
        w, b = groups[prefix].get("weight"), groups[prefix].get("bias")
        name = f"{prefix}.weight" if prefix else "weight"
        if w is None or w.ndim != 2 or w.shape[1] != width:
            shape = None if w is None else tuple(w.shape)
            raise ValueError(f"{file}: {name} must be a [out, {width}] matrix; got {shape}")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(
                f"{file}: the bias of {prefix or 'the layer'} must have {w.shape[0]} values"
            )
        layer = nn.Linear(width, int(w.shape[0]), bias=b is not None)
        with torch.no_grad():
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
        layers.append(layer)
        width = int(w.shape[0])
    if width != 1:
        raise ValueError(f"{file}: the last layer has {width} outputs; a reward head has 1")
    return nn.Sequential(*layers)


class RewardHead(nn.Module):
    """x ∈ [−1, 1] (NCHW) → r(x) = h(unit-norm CLIP image embedding of x), shaped [B, 1]."""

    def __init__(self, clip: CLIPHead, head: nn.Sequential):
        super().__init__()
        self.clip = clip
        self.head = head.to(clip.text_embeds.dtype).eval().requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return 1

    def forward(self, x: Tensor) -> Tensor:
        e = self.clip.image_embeds(x)
        out: Tensor = self.head(e.to(self.clip.text_embeds.dtype))
        return out


def load_reward_head(
    clip_folder: str | Path,
    head_file: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> RewardHead:
    """A :class:`RewardHead` from a local CLIP folder (as for ``clip:``) and a head file."""
    clip = load_clip_head(clip_folder, ["reward"], device=device, dtype=dtype)
    width = int(clip.text_embeds.shape[1])
    head = read_linear_stack(head_file, width)
    return RewardHead(clip, head).to(device=device or "cpu")


def reward_objective(objective: Objective) -> Objective:
    """The objective a scalar reward runs with: S = r (the base score on one output with
    τ1 = 1, τ2 = 0), keeping ``objective``'s tilt; a ValueError names any other method or
    term with the reason it does not apply (module docstring)."""
    parts = [objective.name]
    if objective.entropy is not None:
        parts.append("entropy")
    if objective.divergence is not None:
        parts.append(objective.divergence.name if objective.divergence.generator is None else "f")
    for part in parts:
        if part in _SCALAR_REFUSED:
            raise ValueError(
                f"guidance method {part!r} does not apply to a scalar reward guide: "
                f"{_SCALAR_REFUSED[part]}; use 'base' (S = r) or 'tilted'"
            )
    return Objective(tau1=1.0, tau2=0.0, tilt=objective.tilt, name=objective.name)


def load_clip_score_model(
    folder: str | Path, device: str | torch.device | None = None
) -> tuple[Any, Any, Any]:
    """(CLIPModel, tokenizer, image processor) of a local CLIP folder, for
    :func:`fguide.metrics.clip_score.clip_score`: the folder is checked and read as for a
    ``clip:`` guide (safetensors only, offline); the image processor is transformers' PIL
    ``CLIPImageProcessor``, the one torchmetrics' CLIPProcessor runs without torchvision."""
    head = load_clip_head(folder, ["."], device=device)
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    processor = CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)
    return head.model, tokenizer, processor
