"""torchvision-compatible ResNets: parity with torchvision (fixtures), input modes, loading."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import tolerances
import torch
import torch.nn.functional as F
from fixture_utils import (
    assert_close_float32,
    assert_close_float64,
    case_names,
    fixture_init,
    get_case,
    load_fixture,
)
from tolerances import network_depth
from torch import nn

from fguide.models.resnet import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BasicBlock,
    Bottleneck,
    ImageClassifier,
    ResNet,
    load_resnet,
    replace_relu_with_softplus,
    resnet,
)

FIXTURE = "resnet_forward.pt"


def _grad_log_prob(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dx Σ_i log_softmax(f(x))[i, y_i]."""
    x = x.detach().clone().requires_grad_(True)
    log_p = torch.log_softmax(model(x), dim=1)
    (grad,) = torch.autograd.grad(log_p[torch.arange(len(y)), y].sum(), x)
    return grad


@functools.lru_cache(maxsize=1)
def _fixture_weights(keys: tuple[tuple[str, tuple[int, ...]], ...], seed: int) -> dict:
    # The ReLU and Softplus cases of an arch share weights: draw them once.
    return {k: fixture_init(k, s, seed) for k, s in keys}


@pytest.mark.parametrize("name", case_names(FIXTURE))
def test_resnet_matches_torchvision(name: str) -> None:
    case = get_case(FIXTURE, name)
    beta = case["softplus_beta"] if case["activation"] == "softplus" else None
    threshold = case["softplus_threshold"] or 20.0
    # Built on the meta device and filled by assignment: no random init, no copies.
    with torch.device("meta"):
        net = resnet(
            case["arch"],
            **case["constructor_kwargs"],
            softplus_beta=beta,
            softplus_threshold=threshold,
        )

    shapes = tuple((k, tuple(v.shape)) for k, v in net.state_dict().items())
    assert list(shapes) == [(k, tuple(s)) for k, s in case["state_dict_shapes"]]
    assert sum(p.numel() for p in net.parameters()) == case["num_params"]

    softplus = [n for n, m in net.named_modules() if isinstance(m, nn.Softplus)]
    assert softplus == list(case["replaced_modules"])
    if beta is None:
        assert not softplus
    else:
        assert not any(isinstance(m, nn.ReLU) for m in net.modules())
        for m in net.modules():
            if isinstance(m, nn.Softplus):
                assert (m.beta, m.threshold) == (beta, threshold)

    net.load_state_dict(dict(_fixture_weights(shapes, case["seed"])), assign=True)
    net.eval()
    assert next(net.parameters()).dtype == torch.float64
    x, y = case["x"], case["y"]
    # ImageClassifier in "elucd" mode must be a pure pass-through.
    model = ImageClassifier(net, "elucd")
    logits, grad = model(x), _grad_log_prob(model, x, y)
    exp_logits, exp_grad = case["expected_logits"], case["expected_grad_log_prob_y"]
    depth = network_depth(net)  # the gradient runs the graph back: twice the stages
    assert_close_float64(logits.detach(), exp_logits, depth, "float64 logits")
    assert_close_float64(grad, exp_grad, 2 * depth, "float64 grad log p_y")

    model.float()
    x32 = x.float()
    assert_close_float32(model(x32).detach(), exp_logits, depth, "float32 logits")
    if beta is not None:  # a ReLU net's gradient jumps where float32 moves a unit across 0
        assert_close_float32(_grad_log_prob(model, x32, y), exp_grad, 2 * depth, "float32 grad")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_state_dict_equals_official_torchvision(arch: str) -> None:
    preset = load_fixture("official_state_dict_keys.json")["presets"][arch]
    with torch.device("meta"):
        net = resnet(arch, **preset["constructor_kwargs"])
    got = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    assert got == [(k, list(s)) for k, s in preset["keys"].items()]
    assert sum(p.numel() for p in net.parameters()) == preset["num_params"]


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_softplus_replaces_every_activation_call(block: type[BasicBlock | Bottleneck]) -> None:
    """Each block calls its one activation module 2x (BasicBlock) or 3x (Bottleneck)."""
    torch.manual_seed(0)
    layers = (2, 1, 1, 2)
    net = ResNet(block, layers, num_classes=10, softplus_beta=3.0).eval()
    calls: dict[str, int] = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.Softplus):
            m.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
    x = torch.randn(2, 3, 32, 32)
    smooth = net(x)
    assert calls.pop("relu") == 1
    assert len(calls) == sum(layers)
    assert set(calls.values()) == {2 if block is BasicBlock else 3}

    # Same weights with ReLU: a different function, until the in-place helper smooths it.
    relu_net = ResNet(block, layers, num_classes=10).eval()
    relu_net.load_state_dict(net.state_dict())
    assert (relu_net(x) - smooth).abs().max() > 1e-3
    names = replace_relu_with_softplus(relu_net, beta=3.0)
    assert names == ["relu", *calls]
    torch.testing.assert_close(relu_net(x), smooth, rtol=0, atol=0)


class _Record(nn.Module):
    """Returns its input flattened, so the wrapper's preprocessing can be read off."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_imagenet_mode_normalises_by_hand() -> None:
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64) * 2 - 1
    out = ImageClassifier(_Record(), "imagenet")(x).view_as(x)
    for c in range(3):
        for value, expected in zip(out[:, c].flatten(), x[:, c].flatten(), strict=True):
            u = (float(expected) + 1.0) / 2.0
            assert math.isclose(
                float(value), (u - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel_tol=1e-6
            )


def test_imagenet_mode_gradient_is_the_chain_rule() -> None:
    """d/dx Σ w·((x+1)/2 − mean)/std = w/(2 std): the guidance gradient flows through."""
    x = (torch.rand(1, 3, 4, 4, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    w = torch.randn(1, 48, dtype=torch.float64)
    model = ImageClassifier(_Record(), "imagenet")
    (grad,) = torch.autograd.grad((model(x) * w).sum(), x)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    tolerances.assert_close(grad, w.view_as(x) / (2 * std), torch.float64, depth=3)


def test_resize_and_elucd_mode() -> None:
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(ImageClassifier(_Record(), "elucd")(x), x.flatten(1))
    out = ImageClassifier(_Record(), "imagenet", resize=224)(x).view(2, 3, 224, 224)
    u = F.interpolate((x + 1) / 2, size=(224, 224), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    # the same interpolation, then (u − mean)/std: a few roundings on the inputs' scale
    tolerances.assert_close(
        out, (u - mean) / std, torch.float32, depth=4, scale=1 / min(IMAGENET_STD)
    )
    with pytest.raises(ValueError, match="input_mode"):
        ImageClassifier(_Record(), "tf")  # type: ignore[arg-type]


def test_unknown_arch_names_valid_ones() -> None:
    with pytest.raises(ValueError, match="resnet18.*resnet152"):
        resnet("resnet20")
    with pytest.raises(ValueError, match="resnet50"):
        load_resnet("wide_resnet50_2", "nowhere.pth")


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    net = resnet("resnet18")
    sd = {k: fixture_init(k, tuple(v.shape), 7).to(v.dtype) for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("resnet") / "resnet18.pth"
    torch.save(sd, path)
    return path, sd


def test_load_resnet_round_trip(resnet18_file: tuple[Path, dict]) -> None:
    path, sd = resnet18_file
    model = load_resnet("resnet18", path, softplus_beta=3.0, input_mode="imagenet", resize=96)
    assert not model.training and model.input_mode == "imagenet" and model.resize == (96, 96)
    assert isinstance(model.net, ResNet)
    assert isinstance(model.net.layer1[0].relu, nn.Softplus)
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, sd[k]), k
    reference = resnet("resnet18", softplus_beta=3.0).eval()
    reference.load_state_dict(sd)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    expected = reference(ImageClassifier(_Record(), "imagenet", 96).preprocess(x))
    assert torch.equal(model(x), expected)  # the same preprocessing, then the same network


def test_load_resnet_tolerates_wrappers_and_old_files(
    resnet18_file: tuple[Path, dict], tmp_path: Path
) -> None:
    _, sd = resnet18_file
    # DataParallel prefix, nested "state_dict", no num_batches_tracked (pre-0.4 files), 10 classes.
    old = {
        f"module.{k}": v
        for k, v in sd.items()
        if not k.endswith("num_batches_tracked") and not k.startswith("fc.")
    }
    old["module.fc.weight"] = torch.randn(10, 512)
    old["module.fc.bias"] = torch.randn(10)
    path = tmp_path / "old.pth"
    torch.save({"state_dict": old, "epoch": torch.tensor(3)}, path)
    model = load_resnet("resnet18", path, dtype=torch.float64)
    net = model.net
    assert isinstance(net, ResNet)
    assert net.fc.out_features == 10 and net.fc.weight.dtype == torch.float64
    assert torch.equal(net.conv1.weight.float(), sd["conv1.weight"])


def test_load_resnet_wrong_arch_says_which_fits(resnet18_file: tuple[Path, dict]) -> None:
    path, _ = resnet18_file
    with pytest.raises(ValueError) as info:
        load_resnet("resnet34", path)
    msg = str(info.value)
    assert "not a resnet34" in msg and "it fits resnet18" in msg
    assert "missing keys (" in msg and "layer1.2.conv1.weight" in msg
    with pytest.raises(ValueError, match=r"shape mismatches \([1-9]"):
        load_resnet("resnet50", path)


def test_load_resnet_rejects_unexpected_keys(
    resnet18_file: tuple[Path, dict], tmp_path: Path
) -> None:
    _, sd = resnet18_file
    path = tmp_path / "extra.pth"
    torch.save({**sd, "head.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"(?s)fits no torchvision.*unexpected keys \(1\): head"):
        load_resnet("resnet18", path)
