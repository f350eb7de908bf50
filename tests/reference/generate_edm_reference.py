"""Generate the EDM reference outputs in this folder from the pinned reference code.

Reference: NVlabs/edm at commit 008a4e5316c8e3bfe61a62f874bddba254295afb (``training/networks.py``,
``torch_utils/persistence.py``, ``generate.py``), and openai/guided-diffusion (``script_util.py``,
``unet.py``; commit 22e0df8183507e13a7813f8d38d51b072ca1e67c) for the 512×512 key lists.
Neither repository enters fguide: check them out elsewhere and run, from the repository root::

    python3 tests/reference/generate_edm_reference.py \
        --edm /tmp/edm_ref --guided-diffusion /tmp/gd_ref

It writes, next to this script:

* ``edm_reference.pt`` (``torch.load(weights_only=True)``): ``forward`` cases (EDMPrecond around
  DhariwalUNet on tiny configurations, weights from the fixture-init rule of
  ``../shared/fixtures/README.md`` for every key except the constant ``resample_filter``
  buffers): inputs, the float64 output (EDM's hard-coded float32 lifted to float64 by running
  the reference module with ``torch.float32`` resolving to ``torch.float64``) and the float32
  output of the unmodified reference; ``fp16_body`` cases: the DhariwalUNet body run in
  float16 as EDMPrecond runs it with ``use_fp16`` on CUDA (run here on the CPU); ``sampler``
  cases: EDM's ``edm_sampler`` with EluCD's guided displacement inserted as EluCD's
  ``EDM/generate.py`` does (METHODS.md §5), with a tiny Softplus classifier and stored
  per-step noise (float64); ``pickle`` cases: input and float32
  output of the NVlabs-unpickled tiny networks below.
* ``edm_tiny_bare.pkl`` (a bare ``EDMPrecond``) and ``edm_tiny_snapshot.pkl`` (a training
  snapshot ``{'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}``), pickled by NVlabs' own
  ``torch_utils.persistence`` (source code embedded, as in the released pickles).
* ``edm_imagenet64_state_dict_keys.json``: state-dict keys and shapes of NVlabs' ``EDMPrecond``
  with the constructor arguments of ``edm-imagenet-64x64-cond-adm.pkl`` (built on ``meta``).
* ``adm512_state_dict_keys.json``: state-dict keys, shapes and parameter counts of
  guided-diffusion's ``create_model`` / ``create_classifier`` at the README's 512×512 flags.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
import types
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

EDM_COMMIT = "008a4e5316c8e3bfe61a62f874bddba254295afb"
GD_COMMIT = "22e0df8183507e13a7813f8d38d51b072ca1e67c"
HERE = Path(__file__).resolve().parent


def fixture_init(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The fixtures' deterministic weight rule (``../shared/fixtures/README.md``)."""
    g = torch.Generator().manual_seed((zlib.crc32(name.encode("utf-8")) + seed) % (2**63))
    if len(shape) <= 1:
        base = 1.0 if name.endswith("weight") or name.endswith("gamma") else 0.0
        return base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)


def init_weights(net: torch.nn.Module, seed: int) -> None:
    """Fixture-init every state-dict entry except the constant resampling filters."""
    sd = net.state_dict()
    new = {
        k: v if k.endswith("resample_filter") else fixture_init(k, tuple(v.shape), seed).to(v)
        for k, v in sd.items()
    }
    net.load_state_dict(new)


class _Torch64(types.ModuleType):
    """``torch`` with ``float32`` resolving to ``float64``: lifts EDM's hard-coded casts."""

    def __getattr__(self, name: str) -> Any:
        return torch.float64 if name == "float32" else getattr(torch, name)


def run64(networks: Any, net: torch.nn.Module, *args: Any) -> torch.Tensor:
    saved = networks.torch
    networks.torch = _Torch64("torch")
    try:
        with torch.no_grad():
            return net(*args)
    finally:
        networks.torch = saved


# -- forward cases -----------------------------------------------------------------------------

FORWARD_CONFIGS: list[dict[str, Any]] = [
    {
        "name": "cond_attn_augment",
        "kwargs": {
            "img_resolution": 8,
            "img_channels": 3,
            "label_dim": 10,
            "use_fp16": True,
            "model_type": "DhariwalUNet",
            "model_channels": 64,
            "channel_mult": [1, 2],
            "channel_mult_emb": 2,
            "num_blocks": 1,
            "attn_resolutions": [4],
            "augment_dim": 9,
            "dropout": 0.1,
        },
        "labels": [3, 7, 0],
        "sigma": [0.02, 0.7, 35.0],
        "seed": 0,
    },
    {
        "name": "cond_no_labels",
        "kwargs": "cond_attn_augment",
        "labels": None,
        "sigma": [2.5, 0.1, 80.0],
        "seed": 0,
    },
    {
        "name": "uncond_three_levels",
        "kwargs": {
            "img_resolution": 8,
            "img_channels": 3,
            "label_dim": 0,
            "sigma_data": 0.6,
            "model_channels": 32,
            "channel_mult": [1, 2, 4],
            "channel_mult_emb": 4,
            "num_blocks": 2,
            "attn_resolutions": [4, 2],
            "dropout": 0.0,
        },
        "labels": None,
        "sigma": [0.3, 5.0],
        "seed": 1,
    },
]


def forward_cases(networks: Any) -> list[dict[str, Any]]:
    cases = []
    by_name: dict[str, dict[str, Any]] = {}
    for cfg in FORWARD_CONFIGS:
        kwargs = cfg["kwargs"] if isinstance(cfg["kwargs"], dict) else by_name[cfg["kwargs"]]
        by_name[cfg["name"]] = kwargs
        torch.manual_seed(0)
        net = networks.EDMPrecond(**kwargs).double().eval()
        init_weights(net, cfg["seed"])
        batch = len(cfg["sigma"])
        g = torch.Generator().manual_seed(zlib.crc32(cfg["name"].encode()))
        c, r = kwargs["img_channels"], kwargs["img_resolution"]
        sigma = torch.tensor(cfg["sigma"], dtype=torch.float64)
        x = torch.randn(batch, c, r, r, generator=g, dtype=torch.float64)
        x = x * (sigma**2 + 0.25).sqrt()[:, None, None, None]
        labels = None if cfg["labels"] is None else torch.tensor(cfg["labels"])
        one_hot = None if labels is None else torch.eye(kwargs["label_dim"])[labels]
        y64 = None if one_hot is None else one_hot.double()
        expected64 = run64(networks, net, x, sigma, y64)
        net32 = net.float()
        with torch.no_grad():
            expected32 = net32(x.float(), sigma.float(), one_hot)
        assert expected32.dtype == torch.float32
        rel = ((expected32.double() - expected64).norm() / expected64.norm()).item()
        print(f"forward {cfg['name']}: |D| max {expected64.abs().max():.3g}, f32 rel err {rel:.2e}")
        cases.append(
            {
                "name": cfg["name"],
                "init_kwargs": kwargs,
                "seed": cfg["seed"],
                "state_dict_shapes": {k: list(v.shape) for k, v in net.state_dict().items()},
                "x": x,
                "sigma": sigma,
                "labels": labels,
                "class_labels": one_hot,
                "expected": expected64,
                "expected_float32": expected32,
            }
        )
    return cases


def fp16_cases(networks: Any) -> list[dict[str, Any]]:
    """The UNet body run in float16 as EDMPrecond runs it with use_fp16 on CUDA (here on CPU).

    EDMPrecond feeds the body c_in·x cast to float16, c_noise and the one-hot labels in float32;
    each layer casts its float32 weights to float16, the attention softmax is float32.
    """
    cases = []
    for cfg in FORWARD_CONFIGS[:1] + FORWARD_CONFIGS[2:]:
        kwargs = cfg["kwargs"]
        assert isinstance(kwargs, dict)
        torch.manual_seed(0)
        net = networks.EDMPrecond(**kwargs).eval()
        init_weights(net, cfg["seed"])
        g = torch.Generator().manual_seed(zlib.crc32(("fp16" + cfg["name"]).encode()))
        c, r = kwargs["img_channels"], kwargs["img_resolution"]
        sigma = torch.tensor(cfg["sigma"], dtype=torch.float32)
        x_in = torch.randn(len(cfg["sigma"]), c, r, r, generator=g).half()
        noise_labels = sigma.log() / 4
        labels = None if cfg["labels"] is None else torch.tensor(cfg["labels"])
        one_hot = None if labels is None else torch.eye(kwargs["label_dim"])[labels]
        with torch.no_grad():
            out = net.model(x_in, noise_labels, class_labels=one_hot)
            out32 = net.model(x_in.float(), noise_labels, class_labels=one_hot)
        assert out.dtype == torch.float16
        print(
            f"fp16 {cfg['name']}: |F| max {out32.abs().max():.3g}, fp16 - fp32 "
            f"{(out.float() - out32).abs().max():.3g}"
        )
        cases.append(
            {
                "name": cfg["name"],
                "init_kwargs": kwargs,
                "seed": cfg["seed"],
                "x_in": x_in,
                "noise_labels": noise_labels,
                "class_labels": one_hot,
                "expected_float16": out,
                "expected_float32": out32,
            }
        )
    return cases


# -- sampler cases -----------------------------------------------------------------------------

SAMPLER_NET = {
    "img_resolution": 4,
    "img_channels": 3,
    "label_dim": 4,
    "model_type": "DhariwalUNet",
    "model_channels": 64,
    "channel_mult": [1],
    "channel_mult_emb": 1,
    "num_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
SAMPLER_SEED = 2


def make_classifier(num_classes: int = 4, softplus_beta: float = 5.0) -> torch.nn.Module:
    """Tiny off-the-shelf-style classifier: conv 3→6 (3×3), Softplus(β), mean pool, linear."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.Softplus(beta=softplus_beta),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(6, num_classes),
    ).double()
    sd = {k: fixture_init("classifier." + k, tuple(v.shape)) for k, v in net.state_dict().items()}
    net.load_state_dict(sd)
    return net.eval()


def elucd_displacement(
    classifier: torch.nn.Module,
    x_cur: torch.Tensor,
    one_hot: torch.Tensor,
    i: int,
    num_steps: int,
    max_guidance: float,
    add_factor: float,
    joint_temperature: float = 1.0,
    uncond_temperature: float = 0.0,
) -> torch.Tensor:
    """EluCD's ``EDM/generate.py`` guidance at step i (computed at x_cur, before the churn)."""
    with torch.enable_grad():
        x_cur_norm = ((x_cur**2).mean((1, 2, 3))) ** 0.5
        x0 = x_cur * 0
        for index in range(x_cur_norm.shape[0]):
            x0[index] = x_cur[index] / x_cur_norm[index] if x_cur_norm[index] > 1 else x_cur[index]
        x0 = x0.detach().requires_grad_(True)
        logits = classifier(x0)
        numerator = torch.exp(logits * joint_temperature)[one_hot != 0].unsqueeze(1)
        denominator = torch.exp(logits * uncond_temperature).sum(1, keepdims=True)
        selected = torch.log(numerator / denominator)
        n_t = num_steps + 1  # len(t_steps) in EluCD, t_N = 0 included
        current_guidance = max((max_guidance / n_t) * (n_t - i), 0.00001)
        current_guidance += np.sin(i / (n_t - 1) * np.pi) * max_guidance * add_factor
        grads = torch.autograd.grad(selected.sum(), x0)[0]
        grads_norm = ((grads**2).mean((1, 2, 3))) ** 0.5
        for index in range(x_cur_norm.shape[0]):
            grads[index] = grads[index] / grads_norm[index] * x_cur_norm[index] * current_guidance
    return grads


def guided_edm_sampler(
    net: Any,
    latents: torch.Tensor,
    class_labels: torch.Tensor,
    noise: torch.Tensor,
    classifier: torch.nn.Module | None,
    num_steps: int,
    max_guidance: float = 0.0,
    add_factor: float = 0.3,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,  # noqa: N803 (EDM's names)
    S_min: float = 0.0,  # noqa: N803
    S_max: float = float("inf"),  # noqa: N803
    S_noise: float = 1.0,  # noqa: N803
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVlabs' ``edm_sampler`` (generate.py) with EluCD's displacement; noise[i] is step i's draw.

    Returns the final sample, the states entering each step and the σ grid.
    """
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (
        sigma_max ** (1 / rho)
        + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    states = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        x_cur = x_next
        states.append(x_cur)
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        add_noise = S_noise * noise[i]  # EDM draws randn_like(x_cur) at every step
        grads: torch.Tensor | float = 0.0
        if classifier is not None and max_guidance > 0:
            grads = elucd_displacement(
                classifier, x_cur, class_labels, i, num_steps, max_guidance, add_factor
            )
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * add_noise + grads
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next, torch.stack(states), t_steps


SAMPLER_CONFIGS: list[dict[str, Any]] = [
    {"name": "heun_unguided", "num_steps": 5, "max_guidance": 0.0},
    {"name": "heun_guided", "num_steps": 5, "max_guidance": 0.05},
    {
        "name": "churn_window_guided",
        "num_steps": 6,
        "max_guidance": 0.05,
        "S_churn": 40.0,
        "S_min": 0.05,
        "S_max": 50.0,
        "S_noise": 1.003,
    },
    {
        "name": "churn_all_guided",
        "num_steps": 4,
        "max_guidance": 0.02,
        "S_churn": 1.0,
        "S_min": 0.0,
        "S_max": float("inf"),
        "S_noise": 1.0,
    },
]


class _Lifted:
    """Calls the reference network with EDM's float32 lifted to float64."""

    def __init__(self, networks: Any, net: Any):
        self.networks, self.net = networks, net
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.net.round_sigma(sigma)

    def __call__(self, x: torch.Tensor, sigma: Any, y: torch.Tensor) -> torch.Tensor:
        return run64(self.networks, self.net, x, torch.as_tensor(sigma, dtype=torch.float64), y)


def sampler_cases(networks: Any, generate: Any) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    net = networks.EDMPrecond(**SAMPLER_NET).double().eval()
    init_weights(net, SAMPLER_SEED)
    lifted = _Lifted(networks, net)
    classifier = make_classifier()
    labels = torch.tensor([1, 3])
    one_hot = torch.eye(SAMPLER_NET["label_dim"], dtype=torch.float64)[labels]
    cases = []
    for cfg in SAMPLER_CONFIGS:
        g = torch.Generator().manual_seed(zlib.crc32(cfg["name"].encode()))
        latents = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
        noise = torch.randn(cfg["num_steps"], 2, 3, 4, 4, generator=g, dtype=torch.float64)
        churn = {k: cfg[k] for k in ("S_churn", "S_min", "S_max", "S_noise") if k in cfg}
        final, _, sigmas = guided_edm_sampler(
            lifted,
            latents,
            one_hot,
            noise,
            classifier,
            cfg["num_steps"],
            max_guidance=cfg["max_guidance"],
            **churn,
        )
        # The reference sampler without guidance is NVlabs' edm_sampler itself, draw for draw.
        draws = iter(noise)
        plain = generate.edm_sampler(
            lifted,
            latents,
            one_hot,
            randn_like=lambda like, d=draws: next(d),
            num_steps=cfg["num_steps"],
            **churn,
        )
        plain_ours, _, _ = guided_edm_sampler(
            lifted, latents, one_hot, noise, None, cfg["num_steps"], **churn
        )
        # Equal up to rounding: EDM multiplies sqrt(t̂² − t²)·S_noise first, EluCD S_noise·z.
        torch.testing.assert_close(plain, plain_ours, rtol=1e-12, atol=1e-12)
        if cfg["max_guidance"] > 0:
            assert (final - plain).abs().max() > 1e-3, "guidance must change the sample"
        print(
            f"sampler {cfg['name']}: |x| max {final.abs().max():.3g}, "
            f"guided - unguided {(final - plain).abs().max():.3g}"
        )
        cases.append(
            {
                "name": cfg["name"],
                "net_kwargs": SAMPLER_NET,
                "net_seed": SAMPLER_SEED,
                "classifier": {"softplus_beta": 5.0, "num_classes": 4, "prefix": "classifier."},
                "num_steps": cfg["num_steps"],
                "max_guidance": cfg["max_guidance"],
                "sine_factor": 0.3,
                "tau1": 1.0,
                "tau2": 0.0,
                "churn": {k: float(v) for k, v in churn.items()},
                "latents": latents,
                "labels": labels,
                "noise": noise,
                "sigmas": sigmas,
                "expected": final,
                "expected_unguided": plain,
            }
        )
    return cases


# -- NVlabs pickles ----------------------------------------------------------------------------

PICKLE_NET = {
    "img_resolution": 8,
    "img_channels": 3,
    "label_dim": 4,
    "use_fp16": True,
    "model_type": "DhariwalUNet",
    "model_channels": 4,
    "channel_mult": [1, 2],
    "channel_mult_emb": 2,
    "num_blocks": 1,
    "attn_resolutions": [4],
    "augment_dim": 9,
    "dropout": 0.1,
}


def pickle_cases(networks: Any, loss: Any, augment: Any) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    net = networks.EDMPrecond(**PICKLE_NET).eval().requires_grad_(False)
    init_weights(net, 3)
    snapshot = {
        "ema": net,
        "loss_fn": loss.EDMLoss(),
        "augment_pipe": augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, aniso=1),
        "dataset_kwargs": {
            "class_name": "training.dataset.ImageFolderDataset",
            "path": "datasets/tiny-8x8.zip",
            "use_labels": True,
            "xflip": False,
            "cache": True,
            "resolution": 8,
            "max_size": 100,
        },
    }
    files = {"edm_tiny_bare.pkl": net, "edm_tiny_snapshot.pkl": snapshot}
    for fname, obj in files.items():
        with open(HERE / fname, "wb") as f:
            pickle.dump(obj, f)
        print(f"{fname}: {(HERE / fname).stat().st_size} bytes")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.5, 3.0])
    labels = torch.tensor([2, 0])
    cases = []
    for fname in files:
        with open(HERE / fname, "rb") as f:  # NVlabs' own loading path (executes the source)
            obj = pickle.load(f)
        loaded = obj["ema"] if isinstance(obj, dict) else obj
        with torch.no_grad():
            out = loaded(x, sigma, torch.eye(4)[labels])
        cases.append(
            {
                "name": fname,
                "init_kwargs": PICKLE_NET,
                "snapshot_keys": sorted(obj) if isinstance(obj, dict) else None,
                "seed": 3,
                "x": x,
                "sigma": sigma,
                "labels": labels,
                "expected_float32": out,
            }
        )
    return cases


# -- the released ImageNet-64 network's layout -------------------------------------------------

IMAGENET64 = {
    # train.py --cond=1 --arch=adm --dropout=0.10 --augment=0 --fp16=1 (README), ImageNet-64:
    # the constructor arguments of edm-imagenet-64x64-cond-adm.pkl's EDMPrecond.
    "img_resolution": 64,
    "img_channels": 3,
    "label_dim": 1000,
    "use_fp16": True,
    "model_type": "DhariwalUNet",
    "model_channels": 192,
    "channel_mult": [1, 2, 3, 4],
    "dropout": 0.1,
}


def imagenet64_keys(networks: Any) -> dict[str, Any]:
    with torch.device("meta"):
        net = networks.EDMPrecond(**IMAGENET64)
    keys = {k: list(v.shape) for k, v in net.state_dict().items()}
    num = sum(p.numel() for p in net.parameters())
    print(f"edm-imagenet-64x64-cond-adm layout: {len(keys)} keys, {num} parameters")
    return {"init_kwargs": IMAGENET64, "keys": keys, "num_params": num}


# -- guided-diffusion 512×512 key lists --------------------------------------------------------

README_512_MODEL = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 False --use_scale_shift_norm True"
)
README_512_CLASSIFIER = "--image_size 512"  # classifier_sample.py: defaults otherwise


def adm512_keys(gd_root: Path) -> dict[str, Any]:
    # guided_diffusion/__init__ is empty; script_util pulls unet → fp16_util → logger (stdlib).
    sys.path.insert(0, str(gd_root))
    from guided_diffusion import script_util as su

    def parse(flags: str, defaults: dict[str, Any]) -> dict[str, Any]:
        parser = argparse.ArgumentParser()
        su.add_dict_to_argparser(parser, defaults)
        return vars(parser.parse_args(flags.split()))

    out: dict[str, Any] = {}
    model_args = parse(README_512_MODEL, su.model_and_diffusion_defaults())
    cls_args = parse(README_512_CLASSIFIER, su.classifier_defaults())
    with torch.device("meta"):  # no 500M-parameter allocation
        model, _ = su.create_model_and_diffusion(**model_args)
        classifier = su.create_classifier(**cls_args)
    for name, net, flags, args in (
        ("512x512_diffusion", model, README_512_MODEL, model_args),
        ("512x512_classifier", classifier, README_512_CLASSIFIER, cls_args),
    ):
        out[name] = {
            "readme_flags": flags,
            "resolved_flags": args,
            "keys": {k: list(v.shape) for k, v in net.state_dict().items()},
            "num_params": sum(p.numel() for p in net.parameters()),
        }
        print(f"{name}: {len(out[name]['keys'])} keys, {out[name]['num_params']} parameters")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edm", type=Path, required=True, help=f"NVlabs/edm checkout at {EDM_COMMIT}")
    ap.add_argument("--guided-diffusion", type=Path, required=True, help="openai/guided-diffusion")
    args = ap.parse_args()
    torch.set_num_threads(1)

    sys.path.insert(0, str(args.edm))
    import generate  # NVlabs/edm generate.py (edm_sampler)
    from training import augment, loss, networks

    data = {
        "format": 1,
        "description": __doc__,
        "reference_commits": {"NVlabs/edm": EDM_COMMIT, "openai/guided-diffusion": GD_COMMIT},
        "torch_version": str(torch.__version__),
        "forward": forward_cases(networks),
        "fp16_body": fp16_cases(networks),
        "sampler": sampler_cases(networks, generate),
        "pickle": pickle_cases(networks, loss, augment),
    }
    torch.save(data, HERE / "edm_reference.pt")
    layout = {"reference_commit": EDM_COMMIT, **imagenet64_keys(networks)}
    (HERE / "edm_imagenet64_state_dict_keys.json").write_text(json.dumps(layout, indent=0) + "\n")
    keys = adm512_keys(args.guided_diffusion)
    keys = {"reference_commit": GD_COMMIT, "presets": keys}
    (HERE / "adm512_state_dict_keys.json").write_text(json.dumps(keys, indent=0) + "\n")
    for p in sorted(HERE.iterdir()):
        if p.suffix in {".pt", ".pkl", ".json"}:
            print(f"{p.name}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
