"""The OpenAI ADM networks: the diffusion ``UNetModel`` and the noise-aware ``EncoderUNetModel``.

An independent implementation of the architectures of ``openai/guided-diffusion``
(Dhariwal & Nichol, 2021) whose module attribute names reproduce the reference's
``state_dict`` keys exactly, so that the official checkpoints load without renaming. The
numerics follow the reference (see the fixtures README, "Quirks"):

* timestep embedding ``[cos(t f), sin(t f)]`` (cos first), ``f_i = 10000^(-i/half)``, built
  in the dtype of the time-embedding weights (at least float32);
* GroupNorm with 32 groups and eps 1e-5, computed in ``max(float32, input dtype)``;
* scale-shift conditioning ``norm(h) * (1 + scale) + shift``;
* attention with q and k each scaled by ``ch^-1/4`` (here one ``1/sqrt(ch)`` inside
  :func:`torch.nn.functional.scaled_dot_product_attention`, identical in exact arithmetic),
  in the legacy (heads first) or new (q/k/v first) channel layout of the ``qkv`` projection.

Reduced precision
-----------------
The torso dtype is read from the weights at run time (the first input convolution), the head
dtype from the ``out`` block's norm, and the embedding dtype from ``time_embed``. Two schemes
therefore work without any flag:

* the reference's scheme, :meth:`UNetModel.convert_to_fp16` (or
  :meth:`UNetModel.convert_torso` with ``torch.bfloat16``): the convolutions of the input,
  middle and output blocks run in half precision while the time embedding, the norms'
  affine parameters, the embedding projections and the ``out`` head stay float32. This is
  what the reference's ``use_fp16`` flag does and is the recommended way to run in fp16/bf16;
* casting the whole module (``model.half()``, ``model.to(torch.bfloat16)``).

In both, GroupNorm and the attention softmax compute in at least float32 (PyTorch's SDPA
kernels accumulate the softmax in float32 for fp16/bf16 inputs; its math fallback upcasts
unless ``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)`` was set), and the
timestep embedding is built in float32 (half precision cannot resolve ``cos(999 f)``).

``use_fp16`` is recorded (``model.use_fp16``) but, as in the reference, does not convert
anything by itself: the module is built in float32 and the caller runs :meth:`convert_to_fp16`
after loading the weights when the flag is set, as the reference's sampling scripts do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttentionBlock",
    "AttentionPool2d",
    "Downsample",
    "EncoderUNetModel",
    "GroupNorm32",
    "ResBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
    "qkv_attention",
    "timestep_embedding",
]

_REDUCED = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """``max(float32, dtype)``: the dtype in which norms and the embedding are computed."""
    return torch.float32 if dtype in _REDUCED else dtype


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Sinusoidal timestep embedding ``[cos(t f), sin(t f)]`` of shape ``[N, dim]``.

    ``f_i = exp(-ln(max_period) i / half)`` for ``i < half = dim // 2``; an odd ``dim`` gets a
    zero last column. Computed in ``dtype`` (default: float32, or float64 for float64
    timesteps), promoted to at least float32 because ``cos(t f)`` at t near 1000 needs it.
    """
    if dtype is None:
        dtype = torch.float64 if timesteps.dtype == torch.float64 else torch.float32
    dtype = _compute_dtype(dtype)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=dtype, device=timesteps.device) / half
    )
    args = timesteps.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in ``max(float32, input dtype)`` and returned in the input dtype.

    The affine parameters are cast to the compute dtype as well, so the norm works both when
    they are float32 next to a half-precision torso (reference fp16 scheme) and when the whole
    module was cast.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = _compute_dtype(x.dtype)
        weight = self.weight.to(ct) if self.weight is not None else None
        bias = self.bias.to(ct) if self.bias is not None else None
        return F.group_norm(x.to(ct), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """ADM's norm layer: 32 groups, eps 1e-5 (``channels`` must be divisible by 32)."""
    return GroupNorm32(32, channels)


def _param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first parameter (how the dtype schemes are detected)."""
    return next(module.parameters()).dtype


def _zero(module: nn.Conv1d | nn.Conv2d) -> nn.Conv1d | nn.Conv2d:
    """Zero a layer's parameters (the reference's initialisation of residual outputs)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def qkv_attention(qkv: torch.Tensor, num_heads: int, legacy: bool) -> torch.Tensor:
    """Multi-head self-attention on a fused ``qkv`` tensor ``[B, 3 H ch, T]`` -> ``[B, H ch, T]``.

    ``legacy=True`` is the reference's ``QKVAttentionLegacy`` layout, ``[B, H, (q k v), ch, T]``
    (heads first); ``legacy=False`` is ``QKVAttention``, ``[B, (q k v), H, ch, T]``. The
    reference scales q and k by ``ch^-1/4`` each and takes ``softmax(q^T k)``; SDPA's default
    ``1/sqrt(ch)`` scale is the same product. For fp16/bf16 the softmax is computed in float32
    by every SDPA backend (see the module docstring).
    """
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy:
        q, k, v = qkv.reshape(b, num_heads, 3 * ch, length).split(ch, dim=2)
    else:
        q, k, v = (z.reshape(b, num_heads, ch, length) for z in qkv.chunk(3, dim=1))
    # SDPA wants [..., T, ch]; the output comes back as [B, H, T, ch]. The transposed views are
    # made contiguous: for non-contiguous inputs the CPU dispatcher falls back to the unfused
    # math kernel (measured 6.6x slower for the attention op).
    q, k, v = (z.transpose(-1, -2).contiguous() for z in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(ch))
    return out.transpose(-1, -2).reshape(b, num_heads * ch, length)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers where the :class:`ResBlock` children also receive the embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling, optionally followed by a 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv, or 2x2 average pooling (key ``op``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.op: nn.Module
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """ADM residual block conditioned on the timestep (and class) embedding.

    ``h = conv(SiLU(norm(x)))``; the embedding projection is added to ``h`` or, with
    ``use_scale_shift_norm``, applied as ``norm(h) (1 + scale) + shift``; then
    ``SiLU -> dropout -> conv`` and a residual connection (identity, or a 1x1/3x3 conv when
    the channel count changes). With ``up``/``down`` both paths are resampled (nearest / 2x2
    average) after the first norm + SiLU and before the first conv.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.updown = up or down

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.h_upd: nn.Module
        self.x_upd: nn.Module
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        self.skip_connection: nn.Module
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb.to(_param_dtype(self.emb_layers)))
        emb_out = emb_out.to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in list(self.out_layers)[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection: ``x + proj_out(attn(qkv(norm(x))))``.

    The head count is ``num_heads``, or ``channels // num_head_channels`` when
    ``num_head_channels != -1``.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"channels {channels} is not divisible by num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} is not divisible by num_heads {self.num_heads}")
        self.legacy = not use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        h = qkv_attention(self.qkv(self.norm(flat)), self.num_heads, self.legacy)
        return (flat + self.proj_out(h)).reshape(x.shape)


class AttentionPool2d(nn.Module):
    """The classifier's attention pooling (CLIP style), output ``[B, output_dim]``.

    The spatial mean is prepended as token 0, a learned positional embedding
    ``[C, spacial_dim^2 + 1]`` is added, new-order multi-head attention with
    ``C // num_head_channels`` heads runs over the tokens and token 0 of ``c_proj`` is returned.
    Inputs must therefore be exactly ``spacial_dim x spacial_dim``.
    """

    def __init__(
        self,
        spacial_dim: int,
        embed_dim: int,
        num_head_channels: int,
        output_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        if embed_dim % num_head_channels:
            raise ValueError(
                f"channels {embed_dim} are not divisible by num_head_channels {num_head_channels}"
            )
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_head_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        tokens = x.reshape(b, c, -1)
        if tokens.shape[-1] + 1 != self.positional_embedding.shape[-1]:
            side = math.isqrt(self.positional_embedding.shape[-1] - 1)
            raise ValueError(
                f"attention pooling expects {side}x{side} features, got {tuple(x.shape[2:])}: "
                "the classifier only accepts inputs of exactly its image_size"
            )
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1)
        tokens = tokens + self.positional_embedding[None].to(tokens.dtype)
        out = self.c_proj(qkv_attention(self.qkv_proj(tokens), self.num_heads, legacy=False))
        return out[:, :, 0]


def _check_common(dims: int, channel_mult: Sequence[float], model_channels: int) -> None:
    if dims != 2:
        raise ValueError(f"only dims=2 is supported, got dims={dims}")
    if not channel_mult:
        raise ValueError("channel_mult must not be empty")
    for m in channel_mult:
        if int(m * model_channels) % 32:
            raise ValueError(
                f"channel count {int(m * model_channels)} (model_channels {model_channels} x "
                f"channel_mult {m}) is not divisible by the 32 GroupNorm groups"
            )


class _ADMBase(nn.Module):
    """Shared pieces of the UNet and the encoder: embedding, input and middle blocks."""

    model_channels: int
    time_embed: nn.Sequential
    input_blocks: nn.ModuleList
    middle_block: TimestepEmbedSequential
    out: nn.Sequential

    def _build_encoder(
        self,
        in_channels: int,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float,
        channel_mult: Sequence[float],
        conv_resample: bool,
        num_heads: int,
        num_head_channels: int,
        use_scale_shift_norm: bool,
        resblock_updown: bool,
        use_new_attention_order: bool,
    ) -> tuple[int, int, list[int]]:
        """Build ``input_blocks`` and ``middle_block`` (after ``time_embed``, for key order).

        Returns the final channel count, the final downsample factor and the channel count
        after every input block (the UNet's skip connections).
        """
        emb_dim = 4 * model_channels
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        )
        chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out_ch = int(mult * model_channels)
                layers: list[nn.Module] = [
                    ResBlock(
                        ch,
                        emb_dim,
                        dropout,
                        out_channels=out_ch,
                        use_scale_shift_norm=use_scale_shift_norm,
                    )
                ]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(
                        AttentionBlock(ch, num_heads, num_head_channels, use_new_attention_order)
                    )
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                down: nn.Module
                if resblock_updown:
                    down = ResBlock(
                        ch, emb_dim, dropout, use_scale_shift_norm=use_scale_shift_norm, down=True
                    )
                else:
                    down = Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, dropout, use_scale_shift_norm=use_scale_shift_norm),
            AttentionBlock(ch, num_heads, num_head_channels, use_new_attention_order),
            ResBlock(ch, emb_dim, dropout, use_scale_shift_norm=use_scale_shift_norm),
        )
        return ch, ds, chans

    def _build_time_embed(self, model_channels: int) -> None:
        """The MLP ``Linear(C, 4C) -> SiLU -> Linear(4C, 4C)`` on the sinusoidal embedding."""
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

    # -- dtype handling ---------------------------------------------------------------------
    def _torso_modules(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block]

    def convert_torso(self, dtype: torch.dtype) -> None:
        """Cast the torso's convolutions (input, middle and UNet output blocks) to ``dtype``.

        This is the reference's ``convert_to_fp16`` generalised: norms, embedding
        projections, the time embedding and the ``out`` head keep their dtype.
        """
        for torso in self._torso_modules():
            for m in torso.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.to(dtype)

    def convert_to_fp16(self) -> None:
        """The reference's fp16 scheme: torso convolutions in float16, the rest float32."""
        self.convert_torso(torch.float16)

    def convert_to_fp32(self) -> None:
        """Undo :meth:`convert_to_fp16`: torso convolutions back to float32."""
        self.convert_torso(torch.float32)

    @property
    def dtype(self) -> torch.dtype:
        """The torso's compute dtype (the dtype of the first input convolution)."""
        return _param_dtype(self.input_blocks[0])

    def _embed(
        self, timesteps: torch.Tensor | float, batch: int, device: torch.device
    ) -> torch.Tensor:
        """``time_embed(timestep_embedding(t))`` with ``t`` broadcast to the batch."""
        t = torch.as_tensor(timesteps, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        emb_dtype = _param_dtype(self.time_embed)
        temb = timestep_embedding(t, self.model_channels, dtype=emb_dtype)
        return self.time_embed(temb.to(emb_dtype))

    def _encode(
        self, x: torch.Tensor, emb: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the input and middle blocks; returns the features and the skip activations."""
        h = x.to(self.dtype)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        return self.middle_block(h, emb), hs


class UNetModel(_ADMBase):
    """ADM's diffusion UNet: ``model(x, t, y) -> eps`` (``[B, out_channels, H, W]``).

    With ``out_channels = 2 * in_channels`` (``learn_sigma``) the second half of the channels
    holds the variance interpolation values. Arguments are the reference constructor's;
    ``attention_resolutions`` are downsample factors (``image_size // resolution``),
    ``use_checkpoint`` is accepted and ignored (gradient checkpointing does not change values),
    ``use_fp16`` is recorded (see the module docstring), and ``dims`` must be 2.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        _check_common(dims, channel_mult, model_channels)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        self._build_time_embed(model_channels)
        if num_classes is not None:
            # Added to the time embedding after the MLP.
            self.label_emb = nn.Embedding(num_classes, 4 * model_channels)
        ch, ds, chans = self._build_encoder(
            in_channels,
            model_channels,
            num_res_blocks,
            attention_resolutions,
            dropout,
            channel_mult,
            conv_resample,
            num_heads,
            num_head_channels,
            use_scale_shift_norm,
            resblock_updown,
            use_new_attention_order,
        )
        emb_dim = 4 * model_channels
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                out_ch = int(model_channels * mult)
                layers: list[nn.Module] = [
                    ResBlock(
                        ch + chans.pop(),
                        emb_dim,
                        dropout,
                        out_channels=out_ch,
                        use_scale_shift_norm=use_scale_shift_norm,
                    )
                ]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(
                        AttentionBlock(
                            ch, num_heads_upsample, num_head_channels, use_new_attention_order
                        )
                    )
                if level and i == num_res_blocks:
                    up: nn.Module
                    if resblock_updown:
                        up = ResBlock(
                            ch, emb_dim, dropout, use_scale_shift_norm=use_scale_shift_norm, up=True
                        )
                    else:
                        up = Upsample(ch, conv_resample)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), _zero(nn.Conv2d(input_ch, out_channels, 3, padding=1))
        )

    def _torso_modules(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | float, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise (and variance values) for ``x`` ``[B, C, H, W]`` at ``timesteps``.

        ``timesteps`` is ``[B]`` (or a scalar, broadcast); ``y`` ``[B]`` class labels are
        required exactly when the model is class-conditional. The output is in the dtype of
        the ``out`` head (float32 under the fp16 torso scheme).
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "y (class labels) must be given exactly when the model is class-conditional "
                f"(num_classes={self.num_classes})"
            )
        emb = self._embed(timesteps, x.shape[0], x.device)
        if y is not None:
            emb = emb + self.label_emb(y)
        h, hs = self._encode(x, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.to(_param_dtype(self.out)))


class EncoderUNetModel(_ADMBase):
    """ADM's noise-aware classifier: the UNet's encoder half and a pooling head.

    ``model(x, t) -> logits`` ``[B, out_channels]``. ``pool`` is ``"attention"``
    (:class:`AttentionPool2d`, which needs ``num_head_channels != -1`` and inputs of exactly
    ``image_size``) or ``"adaptive"`` (global average pooling and a 1x1 conv). The reference's
    ``spatial`` pools are not implemented (no official checkpoint uses them). The other
    arguments are the reference constructor's, as for :class:`UNetModel` (``use_checkpoint``
    and ``num_heads_upsample`` are accepted and have no effect).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ) -> None:
        super().__init__()
        _check_common(dims, channel_mult, model_channels)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.pool = pool

        self._build_time_embed(model_channels)
        ch, ds, _ = self._build_encoder(
            in_channels,
            model_channels,
            num_res_blocks,
            attention_resolutions,
            dropout,
            channel_mult,
            conv_resample,
            num_heads,
            num_head_channels,
            use_scale_shift_norm,
            resblock_updown,
            use_new_attention_order,
        )
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                _zero(nn.Conv2d(ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels != -1")
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        else:
            raise ValueError(f"pool must be 'attention' or 'adaptive', got {pool!r}")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float) -> torch.Tensor:
        """Class logits ``[B, out_channels]`` for noisy images ``x`` at ``timesteps``."""
        emb = self._embed(timesteps, x.shape[0], x.device)
        h, _ = self._encode(x, emb)
        return self.out(h.to(_param_dtype(self.out)))
