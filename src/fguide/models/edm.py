"""EDM's ADM network and preconditioning: ``DhariwalUNet`` and ``EDMPrecond`` (Karras et al. 2022).

An independent implementation of the networks of NVlabs/edm ``training/networks.py`` (commit
008a4e5316c8e3bfe61a62f874bddba254295afb) whose module and parameter names reproduce the
reference's ``state_dict`` keys, so that the weights of an NVlabs network pickle load one to one
(read them safely with :func:`fguide.models.nvlabs.load_network_pickle`).

Preconditioning (EDM paper, Table 1), with σ_data = 0.5 by default::

    D(x, σ) = c_skip x + c_out F(c_in x, c_noise, labels)
    c_skip = σ_data² / (σ² + σ_data²)       c_out = σ σ_data / sqrt(σ² + σ_data²)
    c_in   = 1 / sqrt(σ² + σ_data²)         c_noise = log(σ) / 4

Class labels are what EDM feeds ``class_labels``: one-hot rows of width ``label_dim`` (EDM
uses a zero row when no labels are given); augmentation labels are not passed when sampling, so
``map_augment`` is skipped (as EDM does), though its weight is part of the state dict.

Precision follows EDM: the preconditioning runs in float32 (x and σ are cast to it); with
``use_fp16`` the UNet body runs in float16 **on CUDA only** (EDM's
``use_fp16 and x.device.type == 'cuda'``), each layer casting its float32 weights to the
activation dtype, the noise and label embeddings staying float32 and the attention softmax
computed in float32. One deliberate extension, for reference parity: a float64 module given a
float64 input runs entirely in float64 (preconditioning, noise-embedding frequencies and
attention softmax included), where EDM hard-codes float32 (a float32 module casts any input
to float32 and returns float32, exactly as EDM); the reference outputs in
``tests/reference`` were computed the same way, with EDM's float32 lifted to float64.

Random initialisation is PyTorch's default, not EDM's training initialisation (zero output
convolutions etc.): these modules are meant to receive trained weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Conv2d",
    "DhariwalUNet",
    "EDMDenoiser",
    "EDMPrecond",
    "GroupNorm",
    "Linear",
    "PositionalEmbedding",
    "UNetBlock",
]


class Linear(nn.Module):
    """y = x Wᵀ + b, with W (and b) cast to the dtype of x (EDM's ``Linear``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)


class Conv2d(nn.Module):
    """EDM's convolution with optional 2× resampling by a separable FIR filter.

    ``kernel=0`` means resampling only (no weight). The filter f = [1, 1] (normalised outer
    product f fᵀ / (Σf)²) makes ``down`` a 2×2 average pool and ``up`` (transposed, filter ×4)
    nearest-neighbour upsampling; resampling precedes the convolution. The filter is a
    persistent buffer (``resample_filter``) only when the layer resamples, as in EDM.
    """

    resample_filter: Tensor | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
    ):
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down = up, down
        self.weight = (
            nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if kernel else None
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        if self.weight is not None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        # A constant: built on the CPU even under a meta-device context (no prims tracing).
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32, device="cpu")
        f = (f[:, None] * f[None, :])[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        f = self.resample_filter
        if f is not None:
            f = f.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            if self.up:
                taps = (f * 4).tile(self.in_channels, 1, 1, 1)
                x = F.conv_transpose2d(x, taps, groups=self.in_channels, stride=2, padding=pad)
            else:
                taps = f.tile(self.in_channels, 1, 1, 1)
                x = F.conv2d(x, taps, groups=self.in_channels, stride=2, padding=pad)
        if self.weight is not None:
            w = self.weight.to(x.dtype)
            x = F.conv2d(x, w, padding=w.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(32, C // 4) groups (EDM's ``GroupNorm``), in x's dtype."""

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        min_channels_per_group: int = 4,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(
            x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps
        )


def _attention_weights(q: Tensor, k: Tensor) -> Tensor:
    """softmax_k(qᵀk / sqrt(c)) per head, computed in at least float32, returned in q's dtype."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scaled_k = k / math.sqrt(k.shape[1])  # EDM scales k in the activation dtype
    w = torch.einsum("ncq,nck->nqk", q.to(acc), scaled_k.to(acc)).softmax(dim=2)
    return w.to(q.dtype)


class UNetBlock(nn.Module):
    """EDM's residual block (ADM flavour): adaptive scale-shift, optional resampling, attention.

    h = conv0(silu(norm0(x))); [scale, shift] = affine(emb);
    h = silu(shift + norm1(h) (scale + 1)); h = conv1(dropout(h)) + skip(x);
    with attention (heads = C // channels_per_head): h = h + proj(attn(norm2(h))).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down)
        self.affine = Linear(emb_channels, out_channels * 2)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3)
        self.skip: Conv2d | None = None
        if out_channels != in_channels or up or down:
            # A 1×1 projection when the width changes, else resampling only (kernel 0).
            kernel = 1 if out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1)
            self.proj = Conv2d(out_channels, out_channels, kernel=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        scale, shift = params.chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = h + (self.skip(x) if self.skip is not None else x)
        if self.num_heads:
            n, c = h.shape[0], h.shape[1]
            # qkv channels are laid out (head, channel, q/k/v): EDM's reshape order.
            qkv = self.qkv(self.norm2(h)).reshape(n * self.num_heads, c // self.num_heads, 3, -1)
            q, k, v = qkv.unbind(2)
            a = torch.einsum("nqk,nck->ncq", _attention_weights(q, k), v)
            h = self.proj(a.reshape(h.shape)) + h
        return h


class PositionalEmbedding(nn.Module):
    """[cos(c ω), sin(c ω)], ω_j = (1/10000)^(j / (C/2)) (cos first; ω in float32, as EDM)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = (
            num_channels,
            max_positions,
            endpoint,
        )

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        acc = torch.promote_types(x.dtype, torch.float32)
        freqs = torch.arange(half, dtype=acc, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x[:, None] * freqs.to(x.dtype)[None, :]
        return torch.cat([x.cos(), x.sin()], dim=1)


class DhariwalUNet(nn.Module):
    """EDM's re-implementation of the ADM UNet (``DhariwalUNet``), keys as NVlabs names them.

    Encoder ``enc`` and decoder ``dec`` are ``ModuleDict``s keyed ``"{res}x{res}_conv"``,
    ``"_down"``, ``"_block{i}"``, ``"_in0"``, ``"_in1"``, ``"_up"``; attention at the listed
    resolutions (and always in the lowest-resolution ``_in0``), heads of 64 channels.
    Embedding: emb = silu(W1 silu(W0 (PE(c_noise) + A aug)) + L labels).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
    ):
        super().__init__()
        self.img_resolution, self.label_dim = img_resolution, label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        block: dict[str, Any] = {"emb_channels": emb_channels, "dropout": dropout}

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.map_label = Linear(label_dim, emb_channels, bias=False) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block
                )
        skips = [_out_channels(m) for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block
                )
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3)

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None and class_labels is not None:
            y = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                y = y * keep.to(y.dtype)
            emb = emb + self.map_label(y)
        emb = F.silu(emb)

        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        for layer in self.dec.values():
            if x.shape[1] != layer.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


def _out_channels(m: nn.Module) -> int:
    return int(m.out_channels)  # type: ignore[arg-type]


class EDMPrecond(nn.Module):
    """EDM's preconditioned denoiser D(x, σ) around a :class:`DhariwalUNet` (see module doc).

    ``forward(x, sigma, class_labels=None)``: ``sigma`` a scalar or one value per sample,
    ``class_labels`` one-hot rows [B, label_dim] (a zero row when None, as EDM). Returns
    float32 (float64 for a float64 module and input). ``sigma_min``/``sigma_max`` bound the
    supported noise levels (EDM: 0 and ∞), ``round_sigma`` is the identity.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.0,
        sigma_max: float = float("inf"),
        sigma_data: float = 0.5,
        model_type: str = "DhariwalUNet",
        **model_kwargs: Any,
    ):
        if model_type != "DhariwalUNet":
            raise ValueError(
                f"EDMPrecond: model_type {model_type!r} is not supported; fguide implements "
                "EDM's 'DhariwalUNet' (the ADM architecture of the ImageNet models) only"
            )
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.use_fp16 = label_dim, use_fp16
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.model = DhariwalUNet(
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            **model_kwargs,
        )

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        class_labels: Tensor | None = None,
        force_fp32: bool = False,
    ) -> Tensor:
        # EDM's float32, or float64 throughout for a float64 module and input (parity runs).
        f64 = x.dtype == torch.float64 and self.model.map_layer0.weight.dtype == torch.float64
        work = torch.float64 if f64 else torch.float32
        x = x.to(work)
        sigma = torch.as_tensor(sigma, device=x.device).to(work).reshape(-1, 1, 1, 1)
        y: Tensor | None = None
        if self.label_dim:
            y = (
                torch.zeros([1, self.label_dim], device=x.device, dtype=work)
                if class_labels is None
                else class_labels.to(work).reshape(-1, self.label_dim)
            )
        fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if fp16 else work

        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4

        f_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=y)
        return c_skip * x + c_out * f_x.to(work)

    def round_sigma(self, sigma: Tensor | float) -> Tensor:
        return torch.as_tensor(sigma)


class EDMDenoiser:
    """An :class:`EDMPrecond` as fguide's :data:`~fguide.samplers.Denoiser`.

    ``(x, σ[B], labels[B] long or None) -> D(x, σ)`` in x's dtype. Integer labels become the
    one-hot ``class_labels`` EDM feeds its network (``generate.py``:
    ``torch.eye(label_dim)[labels]``); None gives EDM's zero row; an unconditional network
    (``label_dim == 0``) ignores them (they still steer a guide). ``forward``, when given,
    is called in place of ``net`` (e.g. its ``torch.compile``d form). Labels are validated and
    one-hot encoded once per labels tensor, so that a sampling loop reads nothing back from
    the device per step.
    """

    def __init__(self, net: EDMPrecond, forward: Callable[..., Tensor] | None = None):
        self.net = net
        self.forward: Callable[..., Tensor] = forward if forward is not None else net
        self._labels: Tensor | None = None
        self._one_hot: Tensor | None = None

    def to(self, device: torch.device | str) -> EDMDenoiser:
        """Move the network (in place) and return self."""
        self.net.to(device)
        return self

    @property
    def label_dim(self) -> int:
        return int(self.net.label_dim)

    @property
    def sigma_min(self) -> float:
        return float(self.net.sigma_min)

    @property
    def sigma_max(self) -> float:
        return float(self.net.sigma_max)

    def one_hot(self, labels: Tensor) -> Tensor:
        """Integer class labels [B] -> EDM's one-hot rows [B, label_dim] (float32)."""
        if labels.dtype.is_floating_point or labels.ndim != 1:
            raise ValueError(
                f"labels must be a 1-D integer tensor of class indices; got {labels.dtype} "
                f"of shape {tuple(labels.shape)}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.label_dim):
            raise ValueError(
                f"labels must lie in [0, {self.label_dim}) for this network (label_dim "
                f"{self.label_dim}); got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        return F.one_hot(labels.long(), self.label_dim).to(torch.float32)

    def __call__(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        y = None
        if self.label_dim and labels is not None:
            labels = labels.to(x.device)
            if labels is not self._labels:  # a new batch: checked and encoded once
                self._one_hot, self._labels = self.one_hot(labels), labels
            y = self._one_hot
        return self.forward(x, sigma, y).to(x.dtype)
