"""``fguide sample --guidance-method`` end to end on a tiny ADM model (CPU): each training-free
method at scale 0 is the unguided run bit for bit; each equals the method called directly
through the Python API (the sampler, the method class, the same noise: no configuration, no
family); refusals are one line with exit 2; the identity and resume of a method run."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fguide import ddim, ddpm
from fguide import training_free as tf
from fguide.cli.main import main
from fguide.denoisers import ADMModel
from fguide.io.images import to_uint8_nhwc
from fguide.models.presets import create_model
from fguide.objectives import objective
from fguide.params import ParamError
from fguide.rng import SampleNoise
from fguide.sampling import (
    ConfigMismatchError,
    SampleConfig,
    resolve_config,
    run_sampling,
    sample_labels,
)
from fguide.schedules import make_process

FLAGS = (
    "image_size=8 num_channels=32 num_res_blocks=1 channel_mult=1,2 attention_resolutions=4 "
    "num_head_channels=32 class_cond=True learn_sigma=True"
)
MODULE = "test_sampling_guidance_method"
SPEC = f"{MODULE}:tiny_classifier"
SEED, N = 3, 3


def tiny_classifier() -> nn.Module:
    """x̂0 [B, 3, 8, 8] → 1000 logits; deterministic weights, no global RNG."""
    g = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.Softplus(), nn.Linear(32, 1000))
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return net


class _TimeAware(nn.Module):
    time_aware = True  # an import spec's noise-aware classifier of x_t

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_classifier()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x)


def time_aware_classifier() -> nn.Module:
    return _TimeAware()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = create_model(**dict(kv.split("=") for kv in FLAGS.split()))
    for p in net.parameters():  # ADM zero-initialises output layers: make every layer matter
        p.data.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(net.state_dict(), path)
    return path


def _args(out: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        "sample", "--out", str(out), "--model", str(ckpt), "--model-flags", FLAGS,
        "--classifier", SPEC, "--method", "logsoftmax", "--steps", "4", "--seed", str(SEED),
        "--num-samples", str(N), "--batch-size", str(N), "--device", "cpu", "--no-progress",
        *extra,
    ]  # fmt: skip


def _images(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as z:
        return z["arr_0"]


@pytest.fixture(scope="module")
def unguided(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> np.ndarray:
    out = tmp_path_factory.mktemp("unguided") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*_args(out, ckpt), "--method", "none"]) == 0
    finally:
        torch.set_num_threads(n)
    return _images(out)


# (CLI flags, sampler kwargs, the method built by hand) per method: non-default settings, so
# that a flag lost or swapped on the way to the method changes the samples.
CASES: dict[str, tuple[list[str], dict[str, Any], Any]] = {
    "dps": (["--scale", "0.7", "--tfg-clip"], {}, lambda c, o: tf.DPS(c, o, 0.7, True)),
    "freedom": (
        [
            "--sampler",
            "ddim",
            "--eta",
            "0.5",
            "--scale",
            "0.3",
            "--recurrence",
            "2",
            "--recurrence-window",
            "0:600",
            "--rho-schedule",
            "constant",
        ],
        {"sampler": "ddim", "eta": 0.5},
        lambda c, o: tf.FreeDoM(c, o, 0.3, recurrence=2, schedule="constant", window=(0, 600)),
    ),  # fmt: skip
    "mpgd": (
        ["--sampler", "ddim", "--scale", "0.4"],
        {"sampler": "ddim"},
        lambda c, o: tf.MPGD(c, o, 0.4),
    ),
    "ugd": (
        ["--scale", "0.2", "--backward-steps", "1", "--recurrence", "2"],
        {},
        lambda c, o: tf.UGD(c, o, 0.2, recurrence=2, backward_steps=1),
    ),
    "tfg": (
        [
            "--scale",
            "0.5",
            "--rho",
            "2",
            "--mu",
            "0.5",
            "--gamma",
            "0.01",
            "--mc-samples",
            "2",
            "--iterations",
            "2",
            "--gamma-schedule",
            "constant",
        ],
        {},
        lambda c, o: tf.TFG(
            c,
            o,
            rho=1.0,
            mu=0.25,
            gamma=0.01,
            mc_samples=2,
            iterations=2,
            gamma_schedule="constant",
        ),
    ),  # fmt: skip
}


def _direct(ckpt: Path, method: Any, sampler: str = "ddpm", eta: float = 0.0) -> np.ndarray:
    """The samples of the Python API: the UNet, the respaced process, the method, SampleNoise."""
    net = create_model(**dict(kv.split("=") for kv in FLAGS.split()))
    net.load_state_dict(torch.load(ckpt))
    model = ADMModel(net.eval().requires_grad_(False), True)
    process = make_process("linear", 1000, "4", "learned_range", False)
    clf = tiny_classifier().eval().requires_grad_(False)
    guide = method(clf, objective("logsoftmax", tau1=1.0, tau2=1.0))
    labels = sample_labels("uniform", SEED, range(N), 1000)
    y = torch.as_tensor(labels, dtype=torch.long)
    noise = SampleNoise(SEED, range(N))
    z = noise.initial((3, 8, 8), device=torch.device("cpu"))
    with torch.no_grad():
        if sampler == "ddim":
            x = ddim(model, z, process, labels=y, guide=guide, noise=noise, eta=eta)
        else:
            x = ddpm(model, z, process, labels=y, guide=guide, noise=noise)
    return to_uint8_nhwc(x)


@pytest.mark.parametrize("name", list(CASES))
def test_method_equals_the_python_api(
    name: str, tmp_path: Path, ckpt: Path, unguided: np.ndarray
) -> None:
    flags, kwargs, build = CASES[name]
    assert main([*_args(tmp_path / "g", ckpt, "--guidance-method", name, *flags)]) == 0
    guided = _images(tmp_path / "g")
    np.testing.assert_array_equal(guided, _direct(ckpt, build, **kwargs))
    assert not np.array_equal(guided, unguided)  # the method moved the samples


@pytest.mark.parametrize("name", list(CASES))
def test_scale_zero_is_the_unguided_run_bit_for_bit(
    name: str, tmp_path: Path, ckpt: Path, unguided: np.ndarray
) -> None:
    """Each method's defaults (K = 1, the sampler's clip; TFG's γ̄ > 0) at --scale 0."""
    assert main([*_args(tmp_path / "z", ckpt, "--guidance-method", name, "--scale", "0")]) == 0
    np.testing.assert_array_equal(_images(tmp_path / "z"), unguided)


REFUSED = [
    (
        ["--guidance-method", "dps", "--sampler", "heun"],
        "--guidance-method 'dps' is not defined on the heun sampler",
    ),
    (
        ["--guidance-method", "mpgd", "--method", "none"],
        "--guidance-method 'mpgd' needs an objective to follow: --method 'none'",
    ),
    (
        ["--guidance-method", "dps", "--recurrence", "2"],
        "--recurrence applies to --guidance-method freedom, ugd or tfg, not 'dps'",
    ),
    (
        ["--recurrence", "2"],
        "--recurrence applies to --guidance-method freedom, ugd or tfg, not 'elucd'",
    ),
    (
        ["--guidance-method", "freedom", "--backward-steps", "1"],
        "--backward-steps applies to --guidance-method ugd, not 'freedom'",
    ),
    (
        ["--guidance-method", "mpgd", "--mu", "1"],
        "--mu applies to --guidance-method tfg, not 'mpgd'",
    ),
    (
        ["--guidance-method", "tfg", "--tfg-clip"],
        "--tfg-clip applies to --guidance-method dps, freedom, mpgd or ugd, not 'tfg'",
    ),
    (
        ["--guidance-method", "dps", "--sine-factor", "0.1"],
        "--sine-factor applies to --guidance-method elucd",
    ),
    (
        ["--guidance-method", "dps", "--variance-tracking", "first_sample"],
        "--variance-tracking applies to --guidance-method elucd",
    ),
    (
        ["--guidance-method", "ugd", "--recurrence-window", "600:500"],
        "--recurrence-window must be LO:HI",
    ),
    (
        ["--guidance-method", "tfg", "--method", "tilted", "--mc-samples", "2"],
        "use --mc-samples 1 or --gamma 0 with a tilted objective",
    ),
    (
        ["--guidance-method", "dps", "--classifier", "adm"],
        "--guidance-method 'dps' needs a classifier of x0",
    ),
    (
        ["--guidance-method", "dps", "--classifier", f"{MODULE}:time_aware_classifier"],
        "--guidance-method 'dps' needs a classifier of x0",
    ),
]


@pytest.mark.parametrize(
    ("extra", "message"),
    REFUSED,
    ids=["_".join(e).replace("-", "").replace(":", "") for e, _ in REFUSED],
)
def test_refusals_are_one_line_naming_the_flag(
    extra: list[str], message: str, tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_args(tmp_path / "run", ckpt, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "samples.npz").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--guidance-form", "algorithm3"], "--guidance-form applies to --guidance-method elucd"),
        (
            ["--guidance-microbatch", "2"],
            "--guidance-microbatch applies to --guidance-method elucd",
        ),
    ],
)
def test_pipeline_forms_are_exclusive_with_a_method(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "dit"  # refused while resolving: nothing in the folder is loaded
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "x"]}))
    args = [
        "sample", "--out", str(tmp_path / "run"), "--model", str(folder), "--classifier", SPEC,
        "--guidance-method", "dps", "--device", "cpu", *extra,
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_methods_own_checks_run_before_anything_loads(tmp_path: Path) -> None:
    cfg = SampleConfig(
        out=tmp_path / "run", model=tmp_path / "missing.pt", classifier=SPEC, method="tilted",
        guidance_method="tfg", mc_samples=2,
    )  # fmt: skip
    with pytest.raises(ParamError, match="mc_samples 1 or gamma 0 with a tilted objective"):
        resolve_config(cfg)


def _config(out: Path, ckpt: Path, **kw: Any) -> SampleConfig:
    base: dict[str, Any] = dict(
        out=out, model=ckpt, model_flags=FLAGS, classifier=SPEC, method="logsoftmax", steps="4",
        seed=SEED, device="cpu", progress=False, num_samples=N, batch_size=2, shard_size=1,
        guidance_method="freedom", recurrence=2, scale=0.3,
    )  # fmt: skip
    base.update(kw)
    return SampleConfig(**base)


def test_identity_resume_and_changed_method_refused(tmp_path: Path, ckpt: Path) -> None:
    whole = tmp_path / "whole"
    assert run_sampling(_config(whole, ckpt)).complete
    ident = json.loads((whole / "manifest.json").read_text())["identity"]
    assert (ident["guidance_method"], ident["recurrence"], ident["rho_schedule"]) == (
        "freedom",
        2,
        "increase",
    )
    traj = json.loads((whole / "trajectory.json").read_text())
    assert traj["run"]["guidance_method"] == "freedom" and traj["curves"]["step"] == [0, 1, 2, 3]

    part = tmp_path / "part"
    assert not run_sampling(_config(part, ckpt, max_shards=1)).complete
    for change in ({"recurrence": 3}, {"guidance_method": "ugd"}, {"scale": 0.4}):
        with pytest.raises(ConfigMismatchError):
            run_sampling(_config(part, ckpt, **change))
    assert run_sampling(_config(part, ckpt, batch_size=3)).complete  # resumed
    assert (part / "samples.npz").read_bytes() == (whole / "samples.npz").read_bytes()


def test_elucd_identity_has_no_family_keys(tmp_path: Path, ckpt: Path) -> None:
    """Runs made before the family existed stay resumable: their identity is unchanged."""
    cfg = _config(tmp_path / "e", ckpt, guidance_method="elucd", recurrence=None, num_samples=1)
    assert run_sampling(dataclasses.replace(cfg, shard_size=1)).complete
    ident = json.loads((tmp_path / "e" / "manifest.json").read_text())["identity"]
    for key in ("guidance_method", "recurrence", "tfg_clip", "rho", "recurrence_window"):
        assert key not in ident
    assert (
        "guidance_method" not in json.loads((tmp_path / "e" / "trajectory.json").read_text())["run"]
    )


# -- a latent pipeline: DiT with CFG, the classifier through the VAE decoder -----------------


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    diffusers = pytest.importorskip("diffusers")
    from test_models_hf_diffusers import _dit, _vae

    path = tmp_path_factory.mktemp("dit")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    diffusers.DiTPipeline(transformer=_dit(), vae=_vae(), scheduler=sched).save_pretrained(
        path, safe_serialization=True
    )
    return path


def test_dit_pipeline_method_through_the_decoder(dit_dir: Path, tmp_path: Path) -> None:
    """DPS on DiT (CFG 1.5) through ``fguide sample`` equals DPS on the pipeline's CFG ε-model
    with the decoded classifier, called through the Python API with the same noise."""
    from test_models_hf_diffusers import cli_classifier

    from fguide.models.hf_diffusers import load_pipeline_model
    from fguide.models.latent_guidance import build_pipeline_sampling

    n, seed = 2, 5
    args = [
        "sample", "--model", str(dit_dir), "--cfg-scale", "1.5", "--classifier",
        "test_models_hf_diffusers:cli_classifier", "--method", "logsoftmax", "--steps", "2",
        "--seed", str(seed), "--num-samples", str(n), "--device", "cpu", "--no-progress",
        "--guidance-method", "dps", "--scale", "4", "--out", str(tmp_path / "g"),
    ]  # fmt: skip
    assert main(args) == 0
    pm = load_pipeline_model(dit_dir)
    s = build_pipeline_sampling(pm, respacing="2", cfg_scale=1.5)
    clf = pm.guidance_classifier(cli_classifier().eval().requires_grad_(False))
    method = tf.DPS(clf, objective("logsoftmax", tau1=1.0, tau2=1.0), scale=4.0)
    y = torch.as_tensor(sample_labels("uniform", seed, range(n), 1000), dtype=torch.long)
    noise = SampleNoise(seed, range(n))
    z = noise.initial(s.state_shape, device=torch.device("cpu"))
    with torch.no_grad():
        x = ddpm(s.model, z, s.process, labels=y, guide=method, noise=noise, clip_denoised=False)
        direct = to_uint8_nhwc(s.to_image(x))
    np.testing.assert_array_equal(_images(tmp_path / "g"), direct)
    traj = json.loads((tmp_path / "g" / "trajectory.json").read_text())
    assert all(g > 0 for g in traj["curves"]["grad_norm"])  # the gradient came through Dec


def test_a_named_configuration_takes_a_method_without_elucd_settings() -> None:
    """``--config elucd-r101-128 --guidance-method dps``: EluCD's sine boost and scale are the
    configuration's, not the method's; the method's defaults apply (an explicit --scale wins)."""
    from fguide.sampling.configs import apply_paper_config

    out, model = Path("run"), Path("m.pt")
    for given, scale in (({}, 1.0), ({"scale": 0.3}, 0.3)):
        settings = apply_paper_config("elucd-r101-128", {"guidance_method": "dps", **given})
        assert "sine_factor" not in settings
        c = resolve_config(SampleConfig(out=out, model=model, **settings))
        assert (c.guidance_method, c.scale, c.sine_factor) == ("dps", scale, None)
