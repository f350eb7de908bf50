"""EDM networks and sampler against NVlabs/edm (tests/reference/edm_reference.pt).

The reference outputs come from ``tests/reference/generate_edm_reference.py`` (NVlabs/edm
008a4e5, run in float64 with EDM's float32 lifted, and as-is in float32). Weights follow the
fixture-init rule for every key but the constant ``resample_filter`` buffers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tolerances
import torch
from fixture_utils import fixture_init
from tolerances import layer_count, network_depth

import fguide
from fguide.models.edm import DhariwalUNet, EDMDenoiser, EDMPrecond

REF = Path(__file__).parent / "reference" / "edm_reference.pt"
DATA: dict[str, Any] = torch.load(REF, weights_only=True)


def _cases(section: str) -> list[dict[str, Any]]:
    return list(DATA[section])


def _ids(section: str) -> list[str]:
    return [c["name"] for c in DATA[section]]


def _weights(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    return {
        k: v if k.endswith("resample_filter") else fixture_init(k, tuple(v.shape), seed).to(v)
        for k, v in net.state_dict().items()
    }


def _net(kwargs: dict[str, Any], seed: int) -> EDMPrecond:
    net = EDMPrecond(**kwargs).double().eval()
    net.load_state_dict(_weights(net, seed))
    return net


def _depth(kwargs: dict[str, Any]) -> int:
    with torch.device("meta"):
        return network_depth(EDMPrecond(**kwargs))


# -- networks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases("forward"), ids=_ids("forward"))
def test_state_dict_keys_are_nvlabs(case: dict[str, Any]) -> None:
    """Same keys, order and shapes as NVlabs' EDMPrecond(**init_kwargs): state dicts load 1:1."""
    net = EDMPrecond(**case["init_kwargs"])
    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(got.items()) == list(case["state_dict_shapes"].items())


def test_imagenet64_layout_matches_nvlabs() -> None:
    """edm-imagenet-64x64-cond-adm.pkl's network at full size: keys, shapes, parameter count."""
    ref = json.loads((REF.parent / "edm_imagenet64_state_dict_keys.json").read_text())
    with torch.device("meta"):
        net = EDMPrecond(**ref["init_kwargs"])
    assert [(k, list(v.shape)) for k, v in net.state_dict().items()] == list(ref["keys"].items())
    assert sum(p.numel() for p in net.parameters()) == ref["num_params"]


@pytest.mark.parametrize("case", _cases("forward"), ids=_ids("forward"))
def test_forward_matches_reference_float64(case: dict[str, Any]) -> None:
    net = _net(case["init_kwargs"], case["seed"])
    with torch.no_grad():
        out = net(case["x"], case["sigma"], case["class_labels"])
    assert out.dtype == torch.float64
    tolerances.assert_close(out, case["expected"], torch.float64, _depth(case["init_kwargs"]))


@pytest.mark.parametrize("case", _cases("forward"), ids=_ids("forward"))
def test_forward_matches_reference_float32(case: dict[str, Any]) -> None:
    """float32 module (use_fp16 runs float32 on CPU, as EDM): the reference's float32 output."""
    net = _net(case["init_kwargs"], case["seed"]).float()
    y = case["class_labels"]
    with torch.no_grad():
        out = net(case["x"].float(), case["sigma"].float(), None if y is None else y.float())
    assert out.dtype == torch.float32
    depth = _depth(case["init_kwargs"])
    tolerances.assert_close(out, case["expected_float32"], torch.float32, depth, msg="float32 ref")
    tolerances.assert_close(out, case["expected"], torch.float32, depth, msg="float64 ref")


def test_float32_module_casts_input_like_edm() -> None:
    """A float32 network given float64 x (EDM's sampler state) computes and returns float32."""
    case = _cases("forward")[0]
    net = _net(case["init_kwargs"], case["seed"]).float()
    y = case["class_labels"]
    with torch.no_grad():
        out = net(case["x"], case["sigma"], y)
        ref = net(case["x"].float(), case["sigma"].float(), y.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    den = EDMDenoiser(net)
    assert den(case["x"], case["sigma"], case["labels"]).dtype == torch.float64


def test_preconditioning_closed_form() -> None:
    """D = c_skip x + c_out F(c_in x, log(σ)/4): checked through a stub UNet that records."""
    net = EDMPrecond(
        img_resolution=4,
        img_channels=1,
        sigma_data=0.7,
        model_channels=8,
        channel_mult=[1],
        num_blocks=1,
        attn_resolutions=[],
    ).double()
    seen: dict[str, torch.Tensor] = {}

    def stub(x: torch.Tensor, noise: torch.Tensor, class_labels: Any = None) -> torch.Tensor:
        seen["x"], seen["noise"] = x, noise
        return torch.full_like(x, 2.0)

    net.model.forward = stub  # type: ignore[method-assign]
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.3, 60.0], dtype=torch.float64)
    out = net(x, sigma)
    s, sd = sigma[:, None, None, None], 0.7
    f64 = torch.float64
    tolerances.assert_close(seen["x"], x / (s**2 + sd**2).sqrt(), f64, depth=4)
    tolerances.assert_close(seen["noise"], sigma.log() / 4, f64, depth=2)
    expected = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * 2.0
    tolerances.assert_close(out, expected, f64, depth=6)


@pytest.mark.parametrize("case", _cases("fp16_body"), ids=_ids("fp16_body"))
def test_fp16_body_matches_reference(case: dict[str, Any]) -> None:
    """The body in float16 as EDM runs it with use_fp16 (float32 weights cast per layer,
    float32 embeddings and attention softmax): within float16 rounding of NVlabs' float32 and
    float16 outputs (computed on another CPU, whose float16 kernels round differently)."""
    unet = EDMPrecond(**case["init_kwargs"]).eval()
    unet.load_state_dict(_weights(unet, case["seed"]))
    with torch.no_grad():
        out = unet.model(case["x_in"], case["noise_labels"], case["class_labels"])
    assert out.dtype == torch.float16
    depth = layer_count(unet.model)  # float16 layers accumulating in float32: one rounding each
    exact = case["expected_float32"]  # float16 error ≫ float32's: the exact value here
    tolerances.assert_close(out, exact, torch.float16, depth, msg="float32 ref")
    tolerances.assert_close(out, case["expected_float16"], torch.float16, depth, msg="float16 ref")
    # Computed in float16, not in float32 and rounded at the end: the rounding of every layer
    # moves most elements off the correctly rounded value (float32 body: almost none).
    off = (out != exact.half()).double().mean().item()
    assert off > 0.5, f"only {off:.0%} of the elements differ from the float32 result rounded"


def test_fp16_body_only_on_cuda() -> None:
    """use_fp16: the UNet body sees float16 on CUDA only; on CPU float32 (EDM's rule)."""
    case = _cases("forward")[0]
    net = _net(case["init_kwargs"], case["seed"]).float()
    assert net.use_fp16
    dtypes: list[torch.dtype] = []
    net.model.register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype))
    y = case["class_labels"].float()
    with torch.no_grad():
        out = net(case["x"].float(), case["sigma"].float(), y)
    assert dtypes == [torch.float32] and out.dtype == torch.float32
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        net = net.to(dev)
        with torch.no_grad():
            out16 = net(case["x"].float().to(dev), case["sigma"].float().to(dev), y.to(dev))
        assert dtypes[-1] == torch.float16 and out16.dtype == torch.float32
        # float16 layers accumulating in float32: one float16 rounding per layer
        depth = layer_count(net.model)
        tolerances.assert_close(out16.cpu(), case["expected"], torch.float16, depth)


def test_denoiser_one_hot_labels() -> None:
    """Integer labels become EDM's one-hot class_labels; None gives EDM's zero row."""
    by_name = {c["name"]: c for c in _cases("forward")}
    case = by_name["cond_attn_augment"]
    den = EDMDenoiser(_net(case["init_kwargs"], case["seed"]))
    assert den.label_dim == 10 and den.sigma_min == 0 and den.sigma_max == float("inf")
    assert den.to("cpu") is den
    out = den(case["x"], case["sigma"], case["labels"])
    depth = _depth(case["init_kwargs"])
    tolerances.assert_close(out, case["expected"], torch.float64, depth)
    none = by_name["cond_no_labels"]
    out = den(none["x"], none["sigma"], None)
    tolerances.assert_close(out, none["expected"], torch.float64, _depth(none["init_kwargs"]))
    with pytest.raises(ValueError, match="labels must lie in"):
        den(case["x"], case["sigma"], torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="integer tensor"):
        den(case["x"], case["sigma"], torch.eye(10)[:3])


def test_unsupported_model_type_is_refused() -> None:
    with pytest.raises(ValueError, match="SongUNet"):
        EDMPrecond(img_resolution=8, img_channels=3, model_type="SongUNet")
    assert isinstance(EDMPrecond(8, 3, model_channels=8, channel_mult=[1]).model, DhariwalUNet)


# -- guided Heun and stochastic sampler --------------------------------------------------------


def _classifier(spec: dict[str, Any]) -> torch.nn.Module:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.Softplus(beta=spec["softplus_beta"]),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(6, spec["num_classes"]),
    ).double()
    net.load_state_dict(
        {k: fixture_init(spec["prefix"] + k, tuple(v.shape)) for k, v in net.state_dict().items()}
    )
    return net.eval()


def _stored_noise(noise: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]:
    """noise(like) returns the stored draw of the next step; counts the draws."""
    used = [0]

    def draw(like: torch.Tensor) -> torch.Tensor:
        z = noise[used[0]]
        used[0] += 1
        assert z.shape == like.shape
        return z.to(like)

    return draw, used


def _sampler_params() -> list[Any]:
    return [pytest.param(c, id=c["name"]) for c in _cases("sampler")]


@pytest.mark.parametrize("case", _sampler_params())
def test_guided_sampler_matches_reference(case: dict[str, Any]) -> None:
    """fguide.heun (EluCD displacement, EDM churn) equals NVlabs' edm_sampler + EluCD's code."""
    den = EDMDenoiser(_net(case["net_kwargs"], case["net_seed"]))
    sigmas = fguide.karras_sigmas(case["num_steps"])
    tolerances.assert_close(sigmas, case["sigmas"], torch.float64, depth=4)  # (a + i·b)^ρ
    guide = None
    if case["max_guidance"] > 0:
        obj = fguide.objective("base", tau1=case["tau1"], tau2=case["tau2"])
        guide = fguide.ClassifierGuide(_classifier(case["classifier"]), obj, case["max_guidance"])
    churn = case["churn"]
    noise, used = _stored_noise(case["noise"])
    out = fguide.heun(
        den,
        case["latents"],
        sigmas,
        labels=case["labels"],
        guide=guide,
        noise=noise,
        sine_factor=case["sine_factor"],
        s_churn=churn.get("S_churn", 0.0),
        s_tmin=churn.get("S_min", 0.0),
        s_tmax=churn.get("S_max", float("inf")),
        s_noise=churn.get("S_noise", 1.0),
    )
    # Heun: two network evaluations per step, each with the classifier's gradient (forward
    # and back)
    clf = 2 * network_depth(_classifier(case["classifier"])) if guide is not None else 0
    depth = 2 * case["num_steps"] * (_depth(case["net_kwargs"]) + clf)
    tolerances.assert_close(out, case["expected"], torch.float64, depth)
    if churn.get("S_churn", 0.0) > 0:
        assert used[0] == case["num_steps"]  # EDM draws once per step, in or out of the window
