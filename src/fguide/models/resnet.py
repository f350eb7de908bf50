"""torchvision-compatible ResNets for guidance on x̂0 (METHODS.md section 2).

The networks have torchvision's module names, so their ``state_dict`` keys and shapes equal
torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``, BN
buffers with ``num_batches_tracked``) and the public ImageNet files (e.g.
``resnet50-11ad3fa6.pth``, ``resnet101-cd907fc2.pth``) load without renaming.

Smoothing: every block holds ONE activation module that it applies two (BasicBlock) or three
(Bottleneck) times, as torchvision does. Building with ``softplus_beta=β`` (or calling
:func:`replace_relu_with_softplus`) swaps every ReLU module for ``Softplus(β, threshold=20)``,
so every activation of the forward pass becomes smooth: EluCD's choice for all ResNets, not
only the Bottleneck ones its own replacement loop visits.

:class:`ImageClassifier` turns the library's images (NCHW in [-1, 1]) into the network's input:
``"elucd"`` feeds x̂0 as it is, at native size (EluCD); ``"imagenet"`` maps to [0, 1],
optionally resizes bilinearly and applies the ImageNet mean/std normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fguide.models.loading import read_torch_file

__all__ = [
    "ARCHS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BasicBlock",
    "Bottleneck",
    "ImageClassifier",
    "InputMode",
    "ResNet",
    "load_resnet",
    "replace_relu_with_softplus",
    "resnet",
]

InputMode = Literal["elucd", "imagenet"]
INPUT_MODES: tuple[str, ...] = ("elucd", "imagenet")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _activation(softplus_beta: float | None, softplus_threshold: float) -> nn.Module:
    if softplus_beta is None:
        return nn.ReLU(inplace=True)
    return nn.Softplus(beta=softplus_beta, threshold=softplus_threshold)


class BasicBlock(nn.Module):
    """Two 3×3 convs: ``act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        make_act: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = make_act()  # one module, applied twice (torchvision's layout)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.relu(h + shortcut)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (carries the stride: ResNet "V1.5") → 1×1 ×4 channels, plus shortcut."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        make_act: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        # Registration order fixes the state_dict order; it follows torchvision's.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = make_act()  # one module, applied three times
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return self.relu(h + shortcut)


_Block = type[BasicBlock] | type[Bottleneck]

#: arch -> (block type, blocks per stage), as in He et al. (2016) and torchvision.
ARCHS: dict[str, tuple[_Block, tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """ResNet with torchvision's module names; ``forward(x) -> logits f(x)`` of shape [B, N].

    ``x`` is whatever the network expects (no normalisation here; see :class:`ImageClassifier`).
    Any spatial size works: the head is a global average pool.
    """

    def __init__(
        self,
        block: _Block,
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        softplus_beta: float | None = None,
        softplus_threshold: float = 20.0,
    ) -> None:
        super().__init__()

        def make_act() -> nn.Module:
            return _activation(softplus_beta, softplus_threshold)

        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = make_act()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        stages: list[nn.Sequential] = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            out = planes * block.expansion
            downsample: nn.Module | None = None
            if stride != 1 or inplanes != out:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
                )
            blocks = [block(inplanes, planes, stride, downsample, make_act)]
            blocks += [block(out, planes, 1, None, make_act) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        # torchvision's initialisation (weights are normally loaded over it).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        h = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(torch.flatten(self.avgpool(h), 1))


def _check_arch(arch: str) -> tuple[_Block, tuple[int, int, int, int]]:
    if arch not in ARCHS:
        raise ValueError(f"arch: unknown ResNet {arch!r}; valid: {', '.join(ARCHS)}")
    return ARCHS[arch]


def resnet(
    arch: str,
    num_classes: int = 1000,
    softplus_beta: float | None = None,
    softplus_threshold: float = 20.0,
) -> ResNet:
    """Build ``arch`` (``resnet18`` … ``resnet152``), randomly initialised.

    ``softplus_beta=None`` keeps ReLU; a number β makes every activation
    ``Softplus(β, threshold)`` (EluCD: β = 3 for DDPM, 5 for EDM).
    """
    block, layers = _check_arch(arch)
    if softplus_beta is not None and not softplus_beta > 0:
        raise ValueError(f"softplus_beta must be positive or None, got {softplus_beta}")
    return ResNet(block, layers, num_classes, softplus_beta, softplus_threshold)


def replace_relu_with_softplus(
    module: nn.Module, beta: float, threshold: float = 20.0
) -> list[str]:
    """Replace every ``nn.ReLU`` submodule of ``module`` in place by ``Softplus(beta, threshold)``.

    Works on any network (a torchvision ResNet included). Returns the qualified names of the
    replaced modules. A ReLU called several times (torchvision's blocks) is one module, so all
    its uses change; one registered under several names gets one shared Softplus.
    """
    names: list[str] = []
    new: dict[int, nn.Softplus] = {}
    for name, m in list(module.named_modules(remove_duplicate=False)):
        if isinstance(m, nn.ReLU):
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, new.setdefault(id(m), nn.Softplus(beta, threshold)))
            names.append(name)
    return names


class ImageClassifier(nn.Module):
    """Wraps a classifier so that it takes the library's images x̂0 ∈ [-1, 1]^{B×3×H×W}.

    - ``input_mode="elucd"``: the network sees x̂0 unchanged, at native size (EluCD).
    - ``input_mode="imagenet"``: u = (x̂0 + 1)/2 ∈ [0, 1], bilinearly resized to ``resize``
      when given, then (u − mean)/std with the ImageNet mean/std (torchvision's preset).

    ``resize`` (an int for a square, or (H, W)) applies in either mode. Bilinear
    interpolation and the per-channel affine map commute, so the order does not matter. The
    map is differentiable, as guidance needs: ∂S/∂x̂0 flows through it.
    """

    def __init__(
        self,
        net: nn.Module,
        input_mode: InputMode = "elucd",
        resize: int | tuple[int, int] | None = None,
        antialias: bool = False,
    ) -> None:
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
        self.net = net
        self.input_mode = input_mode
        if isinstance(resize, int):
            resize = (resize, resize)
        self.resize = None if resize is None else (int(resize[0]), int(resize[1]))
        self.antialias = antialias

    def preprocess(self, x: Tensor) -> Tensor:
        """The network's input for images ``x`` in [-1, 1] (see the class docstring)."""
        if self.input_mode == "imagenet":
            x = (x + 1) / 2
        if self.resize is not None and tuple(x.shape[-2:]) != self.resize:
            x = F.interpolate(
                x, size=self.resize, mode="bilinear", align_corners=False, antialias=self.antialias
            )
        if self.input_mode == "imagenet":
            # Built in x's dtype: float64 guidance keeps the constants exact to float64.
            mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Logits f(x̂0) of shape [B, N]."""
        out: Tensor = self.net(self.preprocess(x))
        return out


def _bn_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    names = ("weight", "bias", "running_mean", "running_var")
    return {**{f"{prefix}.{n}": (channels,) for n in names}, f"{prefix}.num_batches_tracked": ()}


def _shapes(arch: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The state dict's keys and shapes of ``resnet(arch, num_classes)``, in its order,
    computed from the architecture alone: building the network, even on the meta device,
    imports torch._dynamo (~1 s and ~70 MiB at start-up)."""
    block, layers = _check_arch(arch)
    shapes = {"conv1.weight": (64, 3, 7, 7), **_bn_shapes("bn1", 64)}
    inplanes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
        out = planes * block.expansion
        for j in range(n):
            p, cin = f"layer{i + 1}.{j}", inplanes if j == 0 else out
            if block is BasicBlock:
                convs = [(planes, cin, 3, 3), (planes, planes, 3, 3)]
            else:
                convs = [(planes, cin, 1, 1), (planes, planes, 3, 3), (out, planes, 1, 1)]
            for k, shape in enumerate(convs, start=1):
                shapes[f"{p}.conv{k}.weight"] = shape
                shapes.update(_bn_shapes(f"{p}.bn{k}", shape[0]))
            if j == 0 and (i > 0 or inplanes != out):  # stride 2, or more channels
                shapes[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1)
                shapes.update(_bn_shapes(f"{p}.downsample.1", out))
        inplanes = out
    shapes["fc.weight"] = (num_classes, 512 * block.expansion)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def _unwrap_state_dict(obj: object, path: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    sd = {str(k): v for k, v in obj.items()}
    # Checkpoints saved from nn.DataParallel / DistributedDataParallel prefix every key.
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_resnet(
    arch: str,
    path: str | os.PathLike[str],
    softplus_beta: float | None = None,
    input_mode: InputMode = "elucd",
    resize: int | tuple[int, int] | None = None,
    *,
    num_classes: int | None = None,
    softplus_threshold: float = 20.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ImageClassifier:
    """Load a torchvision-format ResNet file into an eval-mode :class:`ImageClassifier`.

    The file is read with ``torch.load(weights_only=True)`` (no code is executed) and checked
    strictly: missing or unexpected keys and wrong shapes raise a ``ValueError`` that lists them
    and names the architecture the file would fit. Only ``*.num_batches_tracked`` may be
    absent (files written before BatchNorm had it); it does nothing in eval mode.
    ``num_classes`` defaults to the rows of the file's ``fc.weight``.
    """
    _check_arch(arch)
    path = os.fspath(path)
    what = f"a torchvision {arch} state dict (e.g. torchvision's {arch}-*.pth)"
    sd = _unwrap_state_dict(read_torch_file(path, what), path)
    if num_classes is None:
        fc = sd.get("fc.weight")
        num_classes = int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 1000
    file_shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expected = _shapes(arch, num_classes)
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {s}"
        for k, s in expected.items()
        if k in sd and tuple(sd[k].shape) != s
    ]
    if missing or unexpected or wrong:
        fits = [a for a in ARCHS if _core(_shapes(a, num_classes)) == _core(file_shapes)]
        hint = f"it fits {', '.join(fits)}" if fits else "it fits no torchvision ResNet"
        raise ValueError(
            f"{path} is not a {arch} state dict ({hint}).\n"
            f"  missing keys ({len(missing)}): {_preview(missing)}\n"
            f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}\n"
            f"  shape mismatches ({len(wrong)}): {_preview(wrong)}"
        )
    net = resnet(arch, num_classes, softplus_beta, softplus_threshold)
    net.load_state_dict(sd, strict=True)
    model = ImageClassifier(net, input_mode, resize)
    return model.to(device=device, dtype=dtype).eval()


def _core(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {k: s for k, s in shapes.items() if not k.endswith("num_batches_tracked")}


def _preview(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", … (+{len(items) - n} more)" if len(items) > n else "")
