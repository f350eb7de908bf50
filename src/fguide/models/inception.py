"""The TF-compatible FID Inception-v3 (2015-12-05 graph) of ADM's evaluator (METHODS.md section 6).

Pipeline: images (uint8 NHWC or float 0..255 NCHW) → TF1 bilinear resize to 299×299 →
(x − 128)/128 → the network. Outputs (:class:`InceptionOutputs`):

- ``pool``: TF ``pool_3``, the 2048-d global mean of Mixed_7c (FID, precision/recall);
- ``logits``: ``pool @ fc.weight.T``, the 1008-way logits without the fc bias (Inception Score);
- ``spatial``: TF ``mixed_6/conv`` = Mixed_6d's branch1x1 after its ReLU, NHWC, first 7 channels,
  flattened: index (h·17 + w)·7 + c, 2023-d (sFID);
- ``feat_64``, ``feat_192``, ``feat_768``: torch-fidelity's taps after MaxPool_1, MaxPool_2 and
  Mixed_6e, each averaged over space.

Module names equal torch-fidelity's and pytorch-fid's ``pt_inception`` ones
(``Conv2d_1a_3x3.conv.weight`` … ``fc.bias``), so both public weight files load as they are;
pytorch-fid's ``InceptionV3`` wrapper names (``blocks.*``) are renamed on load. The quirks of
the TF graph are kept on purpose, because ADM's numbers depend on them: BatchNorm eps 1e-3,
average pools that exclude padding, a max pool in Mixed_7c's pool branch, 1008 classes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fguide.models.loading import read_torch_file

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_URLS",
    "FIDInception",
    "InceptionOutputs",
    "fid_inception_key_mapping",
    "load_fid_inception",
    "tf1_resize_bilinear",
]

#: Environment variable naming the weight file when no path is given.
INCEPTION_WEIGHTS_ENV = "FGUIDE_INCEPTION_WEIGHTS"
#: Public copies of the 2015-12-05 graph's weights ported to PyTorch (same names, either works).
INCEPTION_WEIGHTS_URLS: dict[str, str] = {
    "pt_inception-2015-12-05-6726825d.pth": (
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth"
    ),
    "weights-inception-2015-12-05-6726825d.pth": (
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth"
    ),
}


def tf1_resize_bilinear(x: Tensor, size: tuple[int, int] = (299, 299)) -> Tensor:
    """TF1 ``ResizeBilinear`` (align_corners=False, no half-pixel centres) of NCHW float ``x``.

    Per axis: scale = float32(in/out), src = i·scale, lo = ⌊src⌋, hi = min(lo + 1, in − 1),
    frac = src − lo; then top = a + (b − a)·fx, bottom = c + (d − c)·fx,
    out = top + (bottom − top)·fy with a, b = row lo at columns lo, hi and c, d = row hi.
    In float32 every step is float32, bit-identical to TF; in float64 the coordinates are
    float64 products with the float32 scale (the fixtures' reference path). Other dtypes raise.
    """
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    h_in, w_in = x.shape[-2:]
    if (h_in, w_in) == tuple(size):
        return x  # scale 1: every output pixel is an input pixel
    ys, fy = _tf1_axis(h_in, size[0], x.dtype, x.device)
    xs, fx = _tf1_axis(w_in, size[1], x.dtype, x.device)
    rows_lo, rows_hi = x.index_select(-2, ys[0]), x.index_select(-2, ys[1])
    a, b = rows_lo.index_select(-1, xs[0]), rows_lo.index_select(-1, xs[1])
    c, d = rows_hi.index_select(-1, xs[0]), rows_hi.index_select(-1, xs[1])
    # Separate ops in TF's order: each rounds once, as TF's kernel does.
    top = a + (b - a) * fx
    bottom = c + (d - c) * fx
    return top + (bottom - top) * fy.unsqueeze(-1)


def _tf1_axis(
    n_in: int, n_out: int, dtype: torch.dtype, device: torch.device
) -> tuple[tuple[Tensor, Tensor], Tensor]:
    # TF computes the scale as a float32 division, whatever the image dtype.
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    src = torch.arange(n_out, dtype=dtype, device=device) * scale.to(dtype)
    lo_f = torch.floor(src)
    lo = lo_f.long()
    hi = torch.clamp(lo + 1, max=n_in - 1)
    return (lo, hi), src - lo_f


class BasicConv2d(nn.Module):
    """conv (no bias) → BatchNorm(eps 1e-3) → ReLU, the graph's only layer type."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    # TF's SAME-padded average pool divides by the number of real pixels only.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d (35×35): 1×1 · 1×1→5×5 · 1×1→3×3→3×3 · avg→1×1."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg3(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    """Mixed_6a (35 → 17): 3×3 s2 · 1×1→3×3→3×3 s2 · max 3×3 s2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    """Mixed_6b..6e (17×17): 1×1 · factorised 7×7 · double factorised 7×7 · avg→1×1."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def branches(self, x: Tensor) -> list[Tensor]:
        """The four branch outputs (branch1x1 first: Mixed_6d's is sFID's tap)."""
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return [
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(_avg3(x)),
        ]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionD(nn.Module):
    """Mixed_7a (17 → 8): 1×1→3×3 s2 · 1×1→1×7→7×1→3×3 s2 · max 3×3 s2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat(
            [
                self.branch3x3_2(self.branch3x3_1(x)),
                self.branch7x7x3_4(b7),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionE(nn.Module):
    """Mixed_7b/7c (8×8): 1×1 · 1×1→(1×3 ‖ 3×1) · 1×1→3×3→(1×3 ‖ 3×1) · pool→1×1.

    ``max_pool=True`` (Mixed_7c) uses a 3×3 max pool in the pool branch, as the TF graph does;
    Mixed_7b uses the padding-excluding average pool.
    """

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(dbl),
                self.branch3x3dbl_3b(dbl),
                self.branch_pool(pooled),
            ],
            1,
        )


class InceptionOutputs(NamedTuple):
    """Features of one batch, all [N, D] in the model's dtype (see the module docstring)."""

    pool: Tensor  # 2048: TF pool_3
    logits: Tensor  # 1008: pool @ fc.weight.T, without the bias
    spatial: Tensor  # 2023: Mixed_6d.branch1x1, NHWC, first 7 channels
    feat_64: Tensor  # mean over space after MaxPool_1
    feat_192: Tensor  # mean over space after MaxPool_2
    feat_768: Tensor  # mean over space of Mixed_6e


class FIDInception(nn.Module):
    """The FID Inception-v3 of the 2015-12-05 TF graph, with ADM's preprocessing built in.

    ``forward(images)`` accepts uint8 images NHWC [N, H, W, 3] (ADM's ``arr_0``) or float
    images NCHW [N, 3, H, W] on the 0..255 scale, resizes them to 299×299 with
    :func:`tf1_resize_bilinear` in the model's dtype, maps x ↦ (x − 128)/128 and returns
    :class:`InceptionOutputs`. Randomly initialised; use :func:`load_fid_inception` for weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def prepare(self, images: Tensor) -> Tensor:
        """Images (uint8 NHWC or float NCHW, 0..255) → resized NCHW 0..255 in the model dtype."""
        if images.ndim != 4:
            raise ValueError(f"images must be 4-d, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            if images.shape[-1] != 3:
                raise ValueError(f"uint8 images must be NHWC with 3 channels, got {images.shape}")
            images = images.permute(0, 3, 1, 2)
        elif not images.is_floating_point() or images.shape[1] != 3:
            raise ValueError(
                "images must be uint8 NHWC [N,H,W,3] or float NCHW [N,3,H,W] on 0..255, got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        x = images.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        # Contiguous NCHW: a channels-last view would switch conv kernels and float32 rounding.
        return tf1_resize_bilinear(x, (299, 299)).contiguous()

    def forward(self, images: Tensor) -> InceptionOutputs:
        x = (self.prepare(images) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        feat_64 = x.mean((2, 3))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        feat_192 = x.mean((2, 3))
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        branches = self.Mixed_6d.branches(x)
        # TF's mixed_6/conv: NHWC order, first 7 of 192 channels, flattened (ADM's sFID).
        spatial = branches[0].permute(0, 2, 3, 1)[..., :7].reshape(x.shape[0], -1)
        x = self.Mixed_6e(torch.cat(branches, 1))
        feat_768 = x.mean((2, 3))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = x.mean((2, 3))
        logits = pool @ self.fc.weight.T
        return InceptionOutputs(pool, logits, spatial, feat_64, feat_192, feat_768)


# pytorch-fid's InceptionV3 wrapper: blocks[i][j] -> the graph's module (pools have no weights).
_WRAPPER_BLOCKS: dict[str, str] = {
    "blocks.0.0": "Conv2d_1a_3x3",
    "blocks.0.1": "Conv2d_2a_3x3",
    "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1",
    "blocks.1.1": "Conv2d_4a_3x3",
    **{f"blocks.2.{i}": f"Mixed_{m}" for i, m in enumerate("5b 5c 5d 6a 6b 6c 6d 6e".split())},
    **{f"blocks.3.{i}": f"Mixed_{m}" for i, m in enumerate("7a 7b 7c".split())},
}


def fid_inception_key_mapping(keys: list[str] | None = None) -> dict[str, str]:
    """Map state-dict keys of any supported naming to fguide's (= torch-fidelity's) names.

    Supported: torch-fidelity's ``FeatureExtractorInceptionV3`` and pytorch-fid's
    ``pt_inception`` file (both ``Conv2d_1a_3x3.conv.weight`` … ``fc.bias``: identity) and
    pytorch-fid's ``InceptionV3`` wrapper (``blocks.0.0.conv.weight`` …, no ``fc``). With
    ``keys=None`` the mapping covers every key of :class:`FIDInception` and of the wrapper.
    Unknown keys map to themselves (the strict load check reports them).
    """
    if keys is None:
        with torch.device("meta"):
            own = list(FIDInception().state_dict())
        inverse = {v: k for k, v in _WRAPPER_BLOCKS.items()}
        heads = [k.split(".", 1) for k in own if not k.startswith("fc.")]
        keys = own + [f"{inverse[module]}.{rest}" for module, rest in heads]
    out = {}
    for k in keys:
        parts = k.split(".")
        prefix = ".".join(parts[:3])
        out[k] = _WRAPPER_BLOCKS[prefix] + k[len(prefix) :] if prefix in _WRAPPER_BLOCKS else k
    return out


def _missing_weights_message(what: str) -> str:
    urls = "\n".join(f"  {name}: {url}" for name, url in INCEPTION_WEIGHTS_URLS.items())
    return (
        f"{what}. The FID Inception-v3 needs the 2015-12-05 TF graph's weights ported to "
        "PyTorch, published by pytorch-fid and torch-fidelity on their GitHub releases (either "
        f"file works):\n{urls}\nDownload one and pass its path, or set {INCEPTION_WEIGHTS_ENV} "
        "(fguide weights download pt_inception-2015-12-05-6726825d.pth --dir DIR verifies it; "
        "then --weights-dir DIR)."
    )


def load_fid_inception(
    path: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    require_logits: bool = True,
) -> FIDInception:
    """Load the FID Inception weights into an eval-mode :class:`FIDInception`.

    ``path`` defaults to the environment variable ``FGUIDE_INCEPTION_WEIGHTS``. The file is
    read with ``torch.load(weights_only=True)``, renamed with :func:`fid_inception_key_mapping`
    and loaded strictly (``*.num_batches_tracked`` may be absent: it is unused in eval mode).
    pytorch-fid's wrapper has no ``fc``: such a file loads only with ``require_logits=False``,
    and its logits are then NaN so that an Inception Score cannot silently be wrong.
    ADM's numbers are defined in float32; float64 gives the fixtures' reference values.
    """
    if path is None:
        env = os.environ.get(INCEPTION_WEIGHTS_ENV)
        if not env:
            raise FileNotFoundError(_missing_weights_message("No Inception weight file given"))
        path = env
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_weights_message(f"Inception weight file {path} not found"))
    what = (
        "the FID Inception-v3 weights ported from TF (pt_inception-2015-12-05-6726825d.pth or "
        "weights-inception-2015-12-05-6726825d.pth)"
    )
    raw = read_torch_file(path, what)
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise ValueError(f"{path}: not a state dict of tensors; expected {what}")
    mapping = fid_inception_key_mapping([str(k) for k in raw])
    sd: dict[str, Tensor] = {mapping[str(k)]: v for k, v in raw.items()}
    bad = [str(k) for k, v in raw.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a damaged file; NaN logits are reserved for "no fc layer" (see below)
        raise ValueError(f"{path}: non-finite values in {bad[:4]}{' …' if len(bad) > 4 else ''}")
    model = FIDInception()
    expected = model.state_dict()
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=torch.long)
    if not require_logits and "fc.weight" not in sd and "fc.bias" not in sd:
        sd["fc.weight"] = torch.full((1008, 2048), float("nan"))
        sd["fc.bias"] = torch.full((1008,), float("nan"))
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        note = ""
        if missing == ["fc.weight", "fc.bias"]:
            note = " (a pytorch-fid wrapper file has no fc: pass require_logits=False)"
        raise ValueError(
            f"{path} is not an FID Inception state dict{note}: "
            f"missing {missing[:8]}{'…' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}, "
            f"wrong shapes {wrong[:8]}"
        )
    model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=dtype).eval()
