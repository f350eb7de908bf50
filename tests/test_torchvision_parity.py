"""fguide's ResNets against torchvision's on the same weights (where torchvision is installed,
e.g. the GPU machines; where torchvision is missing or its import fails, e.g. a wheel whose C++
ops do not load against a CPU torch, the module skips with the error text)."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close, network_depth

from fguide.models.resnet import ImageClassifier, replace_relu_with_softplus, resnet

try:
    import torchvision.models as tv_models
except Exception as exc:  # any failure: a missing wheel, C++ ops that do not load, ...
    # A torchvision wheel built for another torch fails inside its import with a RuntimeError
    # ("operator torchvision::nms does not exist"), not an ImportError: skip with the reason.
    pytest.skip(
        f"torchvision cannot be imported: {type(exc).__name__}: {exc}", allow_module_level=True
    )
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
@pytest.mark.parametrize("softplus_beta", [None, 3.0])
def test_resnet_matches_torchvision(arch: str, softplus_beta: float | None) -> None:
    torch.manual_seed(0)
    ref = getattr(tv_models, arch)(num_classes=1000).double().eval()
    for m in ref.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    if softplus_beta is not None:
        replace_relu_with_softplus(ref, softplus_beta)
    ours = resnet(arch, softplus_beta=softplus_beta).double().eval()
    ours.load_state_dict(ref.state_dict())
    ref, ours = ref.to(DEVICE), ours.to(DEVICE)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, device=DEVICE) * 2 - 1
    depth = network_depth(ours)  # two float64 implementations of the same network
    with torch.no_grad():
        assert_close(ours(x), ref(x), torch.float64, depth, msg="logits")
    # the guidance path: gradients of log p_y with respect to x0 through the EluCD wrapper
    y = torch.tensor([3, 999], device=DEVICE)
    grads = []
    for net in (ImageClassifier(ours), ref):
        xg = x.clone().requires_grad_(True)
        torch.log_softmax(net(xg), -1)[torch.arange(2), y].sum().backward()
        grads.append(xg.grad)
    assert_close(grads[0], grads[1], torch.float64, 2 * depth, msg="gradient")  # and back
