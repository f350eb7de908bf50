"""Start-up cost: ``import fguide`` and a ResNet guide import nothing heavy they do not use.

Building a network on the meta device imports ``torch._dynamo`` (~1 s, ~70 MiB) and
``autograd.grad(..., grad_outputs=c)`` imports sympy (~0.25 s, ~36 MiB); the FID's scipy.linalg
is only needed to evaluate. Checked in a fresh interpreter, where ``sys.modules`` is clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fguide.models.resnet import ARCHS, _shapes, resnet

SRC = Path(__file__).resolve().parents[1] / "src"

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    import fguide
    from fguide.guides import load_classifier

    after_import = {m: m in sys.modules for m in ("torch._dynamo", "sympy", "scipy")}
    loaded = load_classifier("resnet18", sys.argv[1], image_size=8)
    guide = fguide.ClassifierGuide(loaded.module, fguide.objective("js", alpha=0.1, eps=0.1))
    x = torch.randn(2, 3, 8, 8)
    res = guide(x, x, torch.zeros(2), torch.tensor([0, 7]), 0.0)
    assert res.grad.shape == x.shape and bool(torch.isfinite(res.grad).all())
    after_guide = {m: m in sys.modules for m in ("torch._dynamo", "sympy", "scipy")}
    print(json.dumps({"import": after_import, "guide": after_guide}))
    """
)


def test_import_and_resnet_guide_do_not_import_dynamo_sympy_or_scipy(tmp_path: Path) -> None:
    weights = tmp_path / "r18.pt"
    torch.save(resnet("resnet18", 10).state_dict(), weights)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(weights)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert not any(seen["import"].values()), seen
    assert not any(seen["guide"].values()), seen


@pytest.mark.parametrize("arch", list(ARCHS))
def test_resnet_shapes_from_the_architecture_equal_the_built_network(arch: str) -> None:
    for num_classes in (10, 1000):
        with torch.device("meta"):  # in the test only: it imports torch._dynamo
            net = resnet(arch, num_classes)
        built = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
        assert list(_shapes(arch, num_classes).items()) == built
