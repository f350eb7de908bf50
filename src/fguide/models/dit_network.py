"""DiT's own arithmetic for a diffusers ``DiTTransformer2DModel``.

diffusers' DiT network, loaded from a converted checkpoint, computes two things differently from
facebookresearch/DiT's ``models.py`` (which produced the published DiT results, EluCD's Table 9
baseline included):

- **timestep features**: DiT's ``TimestepEmbedder`` uses [cos(t f_j), sin(t f_j)] with
  f_j = exp(−ln(10⁴) · j / half), j = 0 … half − 1, half = 128; diffusers'
  ``CombinedTimestepLabelEmbeddings`` builds ``Timesteps(downscale_freq_shift=1)``, which
  divides by half − 1. Every frequency but f_0 is slightly higher, so the conditioning differs at
  every t > 0 (by 3–4 % of DiT-S/2's output at t = 500 and 999 with random weights).
- **the feed-forward LayerNorm** (``norm3`` of each block): eps is the config's ``norm_eps``
  (1e-5 by default, which converted checkpoints keep) where DiT uses 1e-6 in every LayerNorm.

``set_dit_network(net, "dit")`` makes the network compute as DiT does: each block's time
projection becomes :class:`DiTTimestepFeatures` and ``norm3.eps`` becomes 1e-6. ``"diffusers"``
leaves diffusers' network as it is.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "DIT_LAYER_NORM_EPS",
    "DIT_NETWORKS",
    "DiTNetwork",
    "DiTTimestepFeatures",
    "check_dit_network",
    "set_dit_network",
]

DiTNetwork = Literal["dit", "diffusers"]
DIT_NETWORKS: tuple[str, ...] = ("dit", "diffusers")
DIT_LAYER_NORM_EPS = 1e-6
"""The eps of every LayerNorm in DiT's ``models.py``."""


def check_dit_network(value: Any, name: str = "dit_network") -> DiTNetwork:
    """``value`` when it is ``"dit"`` or ``"diffusers"``, else a ValueError naming ``name``."""
    if value not in DIT_NETWORKS:
        raise ValueError(f"{name} must be dit or diffusers; got {value!r}")
    return value


class DiTTimestepFeatures(nn.Module):
    """DiT's sinusoidal timestep features: [cos(t f_j), sin(t f_j)], f_j = exp(−ln(P) j / half).

    The same operations in the same order as DiT's ``timestep_embedding``, in float32 as DiT
    runs them; in float64 when the network is float64 (DiT's formula lifted: diffusers would
    compute float32 features and cast them). The network's dtype is tracked by an empty buffer
    that ``module.to(dtype)`` converts with the weights.
    """

    def __init__(self, dim: int, dtype: torch.dtype, max_period: float = 10000.0):
        super().__init__()
        self.dim, self.max_period = int(dim), float(max_period)
        self.register_buffer("dtype_probe", torch.zeros(0, dtype=dtype), persistent=False)

    def forward(self, timesteps: Tensor) -> Tensor:
        if timesteps.ndim != 1:
            raise ValueError(
                f"timesteps must be one per sample (1-D); got {tuple(timesteps.shape)}"
            )
        probe: Tensor = self.dtype_probe  # type: ignore[assignment]
        dt = torch.float64 if probe.dtype == torch.float64 else torch.float32
        half = self.dim // 2
        arange = torch.arange(start=0, end=half, dtype=dt, device=timesteps.device)
        freqs = torch.exp(-math.log(self.max_period) * arange / half)
        args = timesteps[:, None].to(dt) * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb


def _time_projection(block: nn.Module, i: int) -> tuple[Any, Any]:
    """(the block's ``CombinedTimestepLabelEmbeddings``, its ``Timesteps``), checked."""
    emb = getattr(getattr(block, "norm1", None), "emb", None)
    proj = getattr(emb, "time_proj", None)
    if emb is None or proj is None or isinstance(proj, DiTTimestepFeatures):
        raise ValueError(
            f"transformer_blocks.{i}: not diffusers' DiT layout (norm1.emb.time_proj), or "
            "already set to DiT's arithmetic"
        )
    # diffusers' DiT features: cos first, unscaled, frequencies over half − shift
    if not (getattr(proj, "flip_sin_to_cos", False) and getattr(proj, "scale", None) == 1):
        raise ValueError(
            f"transformer_blocks.{i}.norm1.emb.time_proj: not DiT's cos-first features"
        )
    return emb, proj


def set_dit_network(net: nn.Module, network: str) -> DiTNetwork:
    """Make a freshly loaded ``DiTTransformer2DModel`` compute as DiT (``"dit"``: DiT's
    timestep features and LayerNorm eps) or leave it as diffusers computes (``"diffusers"``)."""
    mode = check_dit_network(network)
    if mode == "diffusers":
        return mode
    blocks = getattr(net, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError("transformer: not a DiTTransformer2DModel (no transformer_blocks)")
    for i, block in enumerate(blocks):
        emb, proj = _time_projection(block, i)
        weight = emb.timestep_embedder.linear_1.weight
        emb.time_proj = DiTTimestepFeatures(int(proj.num_channels), weight.dtype).to(weight.device)
        norm3 = getattr(block, "norm3", None)
        if not isinstance(norm3, nn.LayerNorm):
            raise ValueError(f"transformer_blocks.{i}: no feed-forward LayerNorm (norm3)")
        norm3.eps = DIT_LAYER_NORM_EPS
    return mode
