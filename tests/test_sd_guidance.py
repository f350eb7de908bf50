"""Guidance of Stable Diffusion through the decoded image (:func:`build_sd_sampling`): the latent
gradient of an image classifier, a CLIP head (the generation prompts, zero-shot or one-prompt
cosine) and a CLIP reward head against float64 autograd through the VAE decoder and the guide
written out here; one guided step of each sampler against its formula; the reward head's file
reading and the objectives a scalar reward accepts."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fguide

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from sd_folders import LATENT, build_clip_folder, build_sd_folder, one_thread  # noqa: E402

from fguide.models.clip import load_clip_head  # noqa: E402
from fguide.models.clip_reward import (  # noqa: E402
    load_reward_head,
    parse_reward_spec,
    read_linear_stack,
    reward_objective,
)
from fguide.models.latent_guidance import MicrobatchGuide  # noqa: E402
from fguide.models.loading import UnsafeCheckpointError  # noqa: E402
from fguide.models.stable_diffusion import SDModel, build_sd_sampling, load_sd_pipeline  # noqa: E402

PROMPTS = ["a red photo", "hot dog at sea"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64)[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64)[:, None, None]
_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sd_folder(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture(scope="module")
def sd(sd_dir: Path) -> SDModel:
    return load_sd_pipeline(sd_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_clip_folder(tmp_path_factory.mktemp("clip") / "clip")


def _classifier() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2),
        nn.Softplus(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).double()


def _layers(width: int, seed: int = 6) -> dict[str, Tensor]:
    """A LAION-style head: linear layers named layers.0, layers.2, layers.10 (natural order;
    the shapes only chain in that order)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.weight": torch.randn(7, width, generator=g, dtype=torch.float64) / 3,
        "layers.0.bias": torch.randn(7, generator=g, dtype=torch.float64),
        "layers.2.weight": torch.randn(5, 7, generator=g, dtype=torch.float64) / 2,
        "layers.2.bias": torch.randn(5, generator=g, dtype=torch.float64),
        "layers.10.weight": torch.randn(1, 5, generator=g, dtype=torch.float64),
        "layers.10.bias": torch.randn(1, generator=g, dtype=torch.float64),
    }


# -- the composite, written out -----------------------------------------------------------------


def _image_features(model: Any, img: Tensor) -> Tensor:
    """Unit CLIP image embeddings of x ∈ [−1, 1] 32×32: resize to 16 (PIL's antialiased bicubic,
    no crop needed), normalise, transformers' own get_image_features."""
    v = F.interpolate((img + 1) / 2, size=(16, 16), mode="bicubic", antialias=True)
    out = model.get_image_features(pixel_values=(v - MEAN) / STD)
    e = out if isinstance(out, Tensor) else out.pooler_output
    return e / e.norm(dim=-1, keepdim=True)


def _reference_grad(sd: SDModel, score: Callable[[Tensor], Tensor], z0: Tensor) -> Tensor:
    """∇_{ẑ0} Σ score(clip(Dec(ẑ0))) by plain autograd: the score's gradient at the clipped
    image (straight-through clip), pulled back through the VAE decoder."""
    vae = sd.decoder.vae
    z = z0.detach().requires_grad_(True)
    img = vae.decode(z / vae.config.scaling_factor).sample
    xc = img.detach().clamp(-1, 1).requires_grad_(True)
    (gx,) = torch.autograd.grad(score(xc).sum(), xc)
    return torch.autograd.grad(img, z, gx)[0]


def _guides(sd: SDModel, clip_dir: Path, tmp: Path) -> dict[str, Any]:
    """name → (guide for fguide, labels, objective, independent per-sample score)."""
    y3 = torch.tensor([0, 3, 1])
    clf = _classifier()
    zero_shot = load_clip_head(clip_dir, PROMPTS, dtype=torch.float64)
    one = load_clip_head(clip_dir, PROMPTS[:1], dtype=torch.float64)
    model = zero_shot.model
    text = zero_shot.text_embeds
    s = float(model.logit_scale.exp())
    torch.save({k: v.float() for k, v in _layers(text.shape[1]).items()}, tmp / "head.pt")
    reward = load_reward_head(clip_dir, tmp / "head.pt", dtype=torch.float64)
    w = {k: v.float().double() for k, v in _layers(text.shape[1]).items()}

    def r(img: Tensor) -> Tensor:
        h = _image_features(model, img)
        for name in ("layers.0", "layers.2", "layers.10"):
            h = h @ w[f"{name}.weight"].T + w[f"{name}.bias"]
        return h[:, 0]

    by_prompt = torch.tensor([0, 1, 0])  # sample i takes prompt i mod 2
    tilted = fguide.objective("tilted", t_tilt=-0.5, group_size=3)
    js = fguide.objective("js", entropy=True)
    return {
        "classifier-base": (clf, y3, fguide.objective("base"), None),
        "classifier-js": (clf, y3, js, None),
        "classifier-tilted": (clf, y3, tilted, None),
        "clip-zero-shot-js": (
            zero_shot,
            by_prompt,
            js,
            lambda x: s * _image_features(model, x) @ text.T,
        ),
        "clip-one-prompt": (
            one,
            torch.zeros(3, dtype=torch.long),
            fguide.objective("base", tau2=0.0),
            lambda x: s * _image_features(model, x) @ text[:1].T,
        ),
        "reward-base": (
            reward,
            torch.zeros(3, dtype=torch.long),
            reward_objective(fguide.objective("base")),
            r,
        ),
        "reward-tilted": (reward, torch.zeros(3, dtype=torch.long), reward_objective(tilted), r),
    }


GUIDES = [
    "classifier-base",
    "classifier-js",
    "classifier-tilted",
    "clip-zero-shot-js",
    "clip-one-prompt",
    "reward-base",
    "reward-tilted",
]


@pytest.mark.parametrize("name", GUIDES)
def test_latent_gradient_is_float64_autograd_through_decoder_and_guide(
    sd: SDModel, clip_dir: Path, tmp_path: Path, name: str
) -> None:
    guide_fn, y, obj, logits_of = _guides(sd, clip_dir, tmp_path)[name]
    gen = torch.Generator().manual_seed(7)
    z0 = 6 * torch.randn(3, 4, LATENT, LATENT, generator=gen, dtype=torch.float64)
    assert (sd.decoder(z0).abs() > 1).any()  # the straight-through clip acts somewhere
    progress = 0.4
    for microbatch in (None, 2):
        g = MicrobatchGuide(sd.guidance_classifier(guide_fn), obj, 1.0, microbatch)
        ours = g(z0, z0, torch.full((3,), 500), y, progress).grad

        if name.startswith("reward"):

            def score(x: Tensor) -> Tensor:
                r = logits_of(x)
                w = obj.tilt.weights(r.detach()) if obj.tilt else torch.ones_like(r)
                return w * r  # S = r, tilted by weights from r (no gradient through them)
        else:
            f = logits_of or guide_fn

            def score(x: Tensor, f: Callable[[Tensor], Tensor] = f) -> Tensor:
                return obj.tilted_score(f(x), y, progress)

        ref = _reference_grad(sd, score, z0)
        assert ref.abs().max() > 1e-6
        # float64 through a ~20-layer decoder and the guide: agreement to ~1e-10
        torch.testing.assert_close(ours, ref, atol=1e-10 * float(ref.abs().max()), rtol=0)


# -- one guided step of each sampler ------------------------------------------------------------


def _cfg_eps(sd: SDModel, x: Tensor, k: int, s: float) -> Tensor:
    """ε_u + s (ε_c − ε_u) by two separate UNet calls."""
    cond = sd.conditioning(sd.encode(PROMPTS), range(len(x)))
    uncond = sd.negative(None, cond).rows([0] * len(x))
    t = torch.full((len(x),), k)
    e_c = sd.unet(x, t, encoder_hidden_states=cond.hidden).sample
    e_u = sd.unet(x, t, encoder_hidden_states=uncond.hidden).sample
    return e_u + s * (e_c - e_u)


class _Record:
    def __init__(self) -> None:
        self.x: dict[int, Tensor] = {}

    def __call__(self, rec: Any) -> None:
        self.x[rec.step] = rec.x


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp-2m"])
def test_guided_step_is_its_formula(sd: SDModel, sampler: str) -> None:
    """The state after the first guided step against the sampler's formula written out:
    DDIM/DPM-Solver ε̃ = ε − √(1 − ᾱ_t) γ g; DDPM μ' = μ + (Σ + a_t) γ g (+ √Σ · draw)."""
    cfg, gamma, steps, b = 3.0, 500.0, 3, 2
    clf = _classifier()
    y = torch.tensor([4, 1])
    obj = fguide.objective("base")
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(b, 4, LATENT, LATENT, generator=gen, dtype=torch.float64)
    draws = [
        torch.randn(b, 4, LATENT, LATENT, generator=gen, dtype=torch.float64) for _ in range(3)
    ]
    emb = sd.encode(PROMPTS)
    s = build_sd_sampling(
        sd,
        emb,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg,
        classifier=clf,
        objective=obj,
        scale=gamma,
    )
    rec, it = _Record(), iter(draws)
    s.sample(z, labels=y, noise=lambda like: next(it), callback=rec)

    ks = s.schedule.timesteps  # [667, 334, 1] for SD 1.5's leading spacing + offset 1
    abar = np.cumprod(1 - sd.betas)
    a_s, a_to = float(abar[ks[0]]), float(abar[ks[1]])
    with torch.no_grad():
        eps = _cfg_eps(sd, z, int(ks[0]), cfg)
    x0 = (z - math.sqrt(1 - a_s) * eps) / math.sqrt(a_s)
    g = _reference_grad(sd, lambda x: obj.tilted_score(clf(x), y, 0.0), x0)
    if sampler == "ddpm":
        beta = 1 - a_s / a_to
        var = beta * (1 - a_to) / (1 - a_s)
        mean = (math.sqrt(a_to) * beta * x0 + math.sqrt(1 - beta) * (1 - a_to) * z) / (1 - a_s)
        boost = max(math.sin(math.pi * (steps - 1) / steps) * var * 0.3, 0.0)  # EluCD's a_t
        ref = mean + (var + boost) * gamma * g + math.sqrt(var) * draws[0]
    else:
        eps_g = eps - math.sqrt(1 - a_s) * gamma * g
        x0_g = (z - math.sqrt(1 - a_s) * eps_g) / math.sqrt(a_s)
        if sampler == "ddim":
            ref = math.sqrt(a_to) * x0_g + math.sqrt(1 - a_to) * eps_g
        else:
            lam = [0.5 * math.log(a / (1 - a)) for a in (a_s, a_to)]
            h = lam[1] - lam[0]
            ratio = math.sqrt(1 - a_to) / math.sqrt(1 - a_s)
            ref = ratio * z - math.sqrt(a_to) * (math.exp(-h) - 1) * x0_g
    unguided = build_sd_sampling(sd, emb, sampler=sampler, steps=steps, cfg_scale=cfg)
    rec0, it = _Record(), iter(draws)
    unguided.sample(z, noise=lambda like: next(it), callback=rec0)
    assert (rec0.x[1] - ref).abs().max() > 1e-3 * ref.abs().max()  # the guidance moved it
    torch.testing.assert_close(rec.x[1], ref, atol=1e-10 * float(ref.abs().max()), rtol=0)


def test_decoder_and_guide_run_under_the_classifier_precision(sd_dir: Path) -> None:
    sd = load_sd_pipeline(sd_dir)  # float32: autocast lowers float32 operations
    clf = _classifier().float()
    z0 = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(9))
    y, obj = torch.tensor([0, 2]), fguide.objective("base")
    emb = sd.encode(PROMPTS)
    grads = {}
    for p in ("fp32", "bf16"):
        s = build_sd_sampling(sd, emb, classifier=clf, objective=obj, classifier_precision=p)
        grads[p] = s.guide(z0, z0, torch.full((2,), 500), y, 0.0).grad.double()
    rel = float((grads["bf16"] - grads["fp32"]).abs().max() / grads["fp32"].abs().max())
    assert 0 < rel < 0.1  # bf16 arithmetic (8 significant bits): different, close


# -- the reward head ------------------------------------------------------------------------------


def test_reward_heads_read_from_safetensors_and_state_dicts(clip_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    layers = _layers(16)
    save_file({k: v.float() for k, v in layers.items()}, str(tmp_path / "h.safetensors"))
    torch.save({k: v.float() for k, v in layers.items()}, tmp_path / "h.pth")
    e = torch.randn(4, 16, generator=torch.Generator().manual_seed(10)).double()
    want = e
    for name in ("layers.0", "layers.2", "layers.10"):
        want = (
            want @ layers[f"{name}.weight"].float().double().T
            + layers[f"{name}.bias"].float().double()
        )
    for f in ("h.safetensors", "h.pth"):
        stack = read_linear_stack(tmp_path / f, 16).double()
        torch.testing.assert_close(stack(e), want, rtol=1e-12, atol=1e-12)
    torch.save({"weight": torch.randn(1, 16), "bias": torch.randn(1)}, tmp_path / "linear.pt")
    assert read_linear_stack(tmp_path / "linear.pt", 16)(e.float()).shape == (4, 1)
    head = load_reward_head(clip_dir, tmp_path / "h.safetensors")
    assert head(torch.zeros(2, 3, 32, 32)).shape == (2, 1)


@pytest.mark.parametrize(
    "tensors,match",
    [
        ({"weight": torch.randn(1, 8)}, r"weight must be a \[out, 16\] matrix"),
        ({"weight": torch.randn(3, 16)}, "the last layer has 3 outputs"),
        ({"w.running_mean": torch.randn(16)}, "'w.running_mean' is not a linear layer"),
        ({"a.weight": torch.randn(1, 16), "a.bias": torch.randn(2)}, "bias of a must have 1"),
    ],
)
def test_bad_reward_heads_are_refused(tmp_path: Path, tensors: dict, match: str) -> None:  # type: ignore[type-arg]
    torch.save(tensors, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=match):
        read_linear_stack(tmp_path / "bad.pt", 16)


def test_reward_specs_and_pickled_heads(tmp_path: Path) -> None:
    assert parse_reward_spec("reward:/m/clip:/h/aesthetic.pth") == (
        Path("/m/clip"),
        Path("/h/aesthetic.pth"),
    )
    for bad in ("reward:/m/clip", "reward::h.pt", "clip:/m/clip"):
        with pytest.raises(ValueError, match="reward:CLIP_FOLDER:HEAD_FILE"):
            parse_reward_spec(bad)
    torch.save(nn.Linear(16, 1), tmp_path / "module.pt")  # a pickled module: never unpickled
    with pytest.raises(UnsafeCheckpointError):
        read_linear_stack(tmp_path / "module.pt", 16)


@pytest.mark.parametrize(
    "method,kw,reason",
    [
        ("logsoftmax", {}, "≡ 0"),
        ("entropy", {}, "entropy of softmax over one output"),
        ("base", {"entropy": True}, "entropy of softmax over one output"),
        ("rkl", {}, "distribution over classes"),
        ("js", {}, "distribution over classes"),
        ("hellinger", {}, "distribution over classes"),
        ("f", {"generator": lambda t: t * torch.log(t)}, "distribution over classes"),
    ],
)
def test_scalar_rewards_refuse_class_objectives_by_name(method: str, kw: dict, reason: str) -> None:  # type: ignore[type-arg]
    named = "entropy" if kw.get("entropy") else method
    with pytest.raises(
        ValueError, match=rf"'{named}' does not apply to a scalar reward guide: .*{reason}"
    ):
        reward_objective(fguide.objective(method, **kw))


def test_scalar_reward_objective_is_the_reward_itself() -> None:
    r = torch.tensor([[0.3], [-1.2], [2.0]], dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    obj = reward_objective(fguide.objective("base", tau1=2.0))
    torch.testing.assert_close(obj.score(r, y), r[:, 0])  # S = r (τ's do not apply)
    torch.testing.assert_close(obj.coefficients(r, y), torch.ones_like(r))
    tilted = reward_objective(fguide.objective("tilted", t_tilt=-0.5))
    w = 3 * torch.softmax(-0.5 * r[:, 0], 0)
    torch.testing.assert_close(tilted.coefficients(r, y), w[:, None])
