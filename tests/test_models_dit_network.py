"""The DiT family against facebookresearch/DiT's own code (tests/reference/dit_reference.pt).

The reference comes from ``tests/reference/generate_dit_reference.py`` (DiT ed81ce2, its network
and diffusion code run in float64 with DiT's hard-coded float32 lifted, and as-is in float32).
The tiny DiT's weights follow the fixture-init rule of its DiT keys and reach diffusers through
the stored conversion table (diffusers' conversion mapping); the pipeline folder built here is
loaded by fguide as any DiT pipeline folder.

Tolerances: |Δ| ≤ 4 ulp(max|expected|) per sequential layer of the computation
(:func:`_tol`): 17 layers for the tiny network (patch embedding, the time MLP's 2, 6 per block,
the final 2), 5 more per sampling step (CFG, x̂0, posterior mean, learned variance, update).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fixture_utils import fixture_init
from torch import Tensor

import fguide

diffusers = pytest.importorskip("diffusers")

from fguide.models import hf_diffusers as hd  # noqa: E402
from fguide.models.dit_network import DiTTimestepFeatures, set_dit_network  # noqa: E402

REF = Path(__file__).parent / "reference" / "dit_reference.pt"
DATA: dict[str, Any] = torch.load(REF, weights_only=True)
NET_DEPTH = 5 + 6 * DATA["dit_kwargs"]["depth"]
NULL = DATA["dit_kwargs"]["num_classes"]


def _tol(expected: Tensor, dtype: torch.dtype, depth: int) -> float:
    """4 ulps of max|expected| in ``dtype`` per sequential layer: the absolute rounding error a
    ``depth``-layer computation may accumulate at the compared values."""
    return 4.0 * depth * torch.finfo(dtype).eps * expected.abs().max().item()


def _close(actual: Tensor, expected: Tensor, depth: int) -> None:
    tol = _tol(expected, actual.dtype, depth)
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=0)


def _diffusers_state_dict() -> dict[str, Tensor]:
    """diffusers key → the DiT fixture-init weight it converts from (q/k/v: a third of qkv)."""
    ref = diffusers.DiTTransformer2DModel(**DATA["diffusers_kwargs"]).state_dict()
    out = {}
    for dkey, src, chunk in DATA["conversion"]:
        shape = tuple(ref[dkey].shape)
        if chunk < 0:
            out[dkey] = fixture_init(src, shape, DATA["seed"])
        else:
            full = fixture_init(src, (3 * shape[0], *shape[1:]), DATA["seed"])
            out[dkey] = torch.chunk(full, 3, dim=0)[chunk]
    return out


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DiT pipeline folder with the reference's converted weights (float64 safetensors)."""
    net = diffusers.DiTTransformer2DModel(**DATA["diffusers_kwargs"]).double()
    net.load_state_dict(_diffusers_state_dict(), strict=True)
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    )
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    path = tmp_path_factory.mktemp("dit_ref")
    diffusers.DiTPipeline(transformer=net, vae=vae, scheduler=sched).save_pretrained(
        path, safe_serialization=True
    )
    return path


def _load(dit_dir: Path, dtype: torch.dtype, network: str = "dit") -> hd.PipelineModel:
    return hd.load_pipeline_model(dit_dir, dtype=dtype, dit_network=network)


def _forward(pm: hd.PipelineModel, case: dict[str, Any], dtype: torch.dtype) -> Tensor:
    with torch.no_grad():
        out = pm.net(case["x"].to(dtype), timestep=case["t"], class_labels=case["y"]).sample
    assert out.dtype == dtype
    return out


def _rel_l2(a: Tensor, ref: Tensor) -> list[float]:
    d, e = (a.double() - ref).flatten(1), ref.flatten(1)
    return [float(r.norm() / s.norm()) for r, s in zip(d, e, strict=True)]


FORWARD = DATA["forward"]
FORWARD_IDS = [c["name"] for c in FORWARD]


# -- the timestep features ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_timestep_features_are_dits(dtype: torch.dtype) -> None:
    """DiTTimestepFeatures = DiT's timestep_embedding (float64: lifted; float32: as DiT runs it).
    The arguments t·f_j reach 999, so one ulp of f_j moves a feature by up to 999 ulp(1)."""
    f = DATA["features"]
    got = DiTTimestepFeatures(f["dim"], dtype)(f["t"])
    assert got.dtype == dtype
    expected = f["float64"] if dtype == torch.float64 else f["float32"]
    tol = 4 * torch.finfo(dtype).eps * float(f["t"].max())
    torch.testing.assert_close(got.double(), expected.double(), atol=tol, rtol=0)


# -- the network -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", FORWARD, ids=FORWARD_IDS)
def test_dit_network_matches_dits_code(
    dit_dir: Path, case: dict[str, Any], dtype: torch.dtype
) -> None:
    """The default (``dit``) network = DiT's network on the same weights, t = 0, 250, 500, 999,
    the null class included: float64 against DiT lifted to float64, float32 against DiT as-is."""
    pm = _load(dit_dir, dtype)
    assert pm.dit_network == "dit" and pm.info()["dit_network"] == "dit"
    expected = case["expected64"] if dtype == torch.float64 else case["expected32"]
    _close(_forward(pm, case, dtype), expected, NET_DEPTH)


@pytest.mark.parametrize("case", FORWARD, ids=FORWARD_IDS)
def test_dit_cfg_matches_forward_with_cfg(dit_dir: Path, case: dict[str, Any]) -> None:
    """fguide's CFG on 3 channels (``cfg_channels=3``) = DiT's ``forward_with_cfg``."""
    pm = _load(dit_dir, torch.float64)
    with torch.no_grad():
        out = pm.eps_model(case["cfg_scale"], cfg_channels=3)(case["x"], case["t"], case["y"])
    # ε_u + s(ε_c − ε_u): the rounding of ε_c and ε_u enters (1 + 2s) times
    _close(out, case["cfg64"], math.ceil(NET_DEPTH * (1 + 2 * case["cfg_scale"])))


class _Replay:
    def __init__(self, draws: Tensor):
        self.draws, self.k = draws, 0

    def __call__(self, like: Tensor) -> Tensor:
        d = self.draws[self.k]
        self.k += 1
        return d.to(like)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_sampling_matches_dits_p_sample_loop(dit_dir: Path, dtype: torch.dtype) -> None:
    """fguide's DDPM (ADM respacing, learned range, CFG 1.5 on 3 channels, no x̂0 clipping) =
    DiT's ``p_sample_loop`` with ``forward_with_cfg``, from the same z and per-step noise."""
    s = DATA["sample"]
    pm = _load(dit_dir, dtype)
    proc = pm.process(s["respacing"])
    noise = _Replay(s["draws"])
    with torch.no_grad():
        x = fguide.ddpm(
            pm.eps_model(s["cfg_scale"], cfg_channels=3),
            s["z"].to(dtype),
            proc,
            labels=s["y"],
            noise=noise,
            clip_denoised=pm.clip_denoised,
        )
    assert noise.k == proc.num_steps and x.dtype == dtype
    expected = s["expected64"] if dtype == torch.float64 else s["expected32"]
    assert expected.std() > 1  # a trajectory, not a constant
    # per step: the network, CFG, x̂0, the posterior mean, the learned variance, the update
    _close(x, expected, proc.num_steps * (NET_DEPTH + 5))


# -- diffusers' own network, selectable ----------------------------------------------------------


@pytest.mark.parametrize("case", FORWARD, ids=FORWARD_IDS)
def test_diffusers_network_is_diffusers_own_and_differs_from_dit(
    dit_dir: Path, case: dict[str, Any]
) -> None:
    """``dit_network="diffusers"`` is exactly diffusers' DiTTransformer2DModel, and differs from
    DiT by what the reference measured with diffusers (relative L2 distance per sample):
    t = 0 differs only by the LayerNorm eps; every t > 0 by the timestep frequencies."""
    pm = _load(dit_dir, torch.float64, "diffusers")
    assert pm.dit_network == "diffusers"
    own = diffusers.DiTTransformer2DModel.from_pretrained(
        dit_dir, subfolder="transformer", local_files_only=True, torch_dtype=torch.float64
    ).eval()
    out = _forward(pm, case, torch.float64)
    with torch.no_grad():
        plain = own(case["x"], timestep=case["t"], class_labels=case["y"]).sample
    assert torch.equal(out, plain)
    measured = DATA["measured"]["diffusers_as_is"][FORWARD_IDS.index(case["name"])]
    known = [r for r, _ in measured["rel_l2_max_abs"]]
    got = _rel_l2(out, case["expected64"])
    np.testing.assert_allclose(got, known, rtol=1e-4)
    dit = _forward(_load(dit_dir, torch.float64), case, torch.float64)
    for r_diffusers, r_dit, t in zip(
        got, _rel_l2(dit, case["expected64"]), case["t"].tolist(), strict=True
    ):
        assert r_diffusers > 1e6 * r_dit, (t, r_diffusers, r_dit)


def test_timestep_features_follow_the_network_dtype(dit_dir: Path) -> None:
    """The features are float64 in a float64 network and float32 otherwise (as DiT computes
    them), following ``net.to(dtype)`` after loading."""
    pm = _load(dit_dir, torch.float32)
    proj = pm.net.transformer_blocks[1].norm1.emb.time_proj
    t = DATA["features"]["t"]
    assert proj(t).dtype == torch.float32
    for dtype, features in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32)):
        pm.net.to(dtype)
        got = proj(t)
        assert got.dtype == features
        assert torch.equal(got, DiTTimestepFeatures(256, features)(t))


def test_set_dit_network_refuses_bad_values_and_layouts(dit_dir: Path) -> None:
    pm = _load(dit_dir, torch.float32)
    with pytest.raises(ValueError, match="already set to DiT"):
        set_dit_network(pm.net, "dit")
    with pytest.raises(ValueError, match="dit_network must be dit or diffusers; got 'DiT'"):
        hd.load_pipeline_model(dit_dir, dit_network="DiT")
    with pytest.raises(ValueError, match="not a DiTTransformer2DModel"):
        set_dit_network(torch.nn.Linear(2, 2), "dit")


# -- configuration, identity and manifest --------------------------------------------------------


def test_dit_network_resolves_per_pipeline_kind(dit_dir: Path, tmp_path: Path) -> None:
    from fguide.sampling import SampleConfig, resolve_config

    def resolved(model: Path, **kw: Any) -> Any:
        return resolve_config(SampleConfig(out=tmp_path, model=model, method="none", **kw))

    assert resolved(dit_dir).dit_network == "dit"
    assert resolved(dit_dir, dit_network="diffusers").dit_network == "diffusers"
    with pytest.raises(ValueError, match="dit_network must be dit or diffusers"):
        resolved(dit_dir, dit_network="timm")
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"]}))
    assert resolved(unet).dit_network is None
    with pytest.raises(ValueError, match="dit_network applies to DiT pipelines"):
        resolved(unet, dit_network="dit")
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="dit_network applies to diffusers pipeline folders"):
        resolved(ckpt, dit_network="dit")


def test_dit_network_is_in_the_run_identity_and_manifest(
    dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fguide.cli.main import main
    from fguide.io.runs import read_run

    out = tmp_path / "run"
    argv = [
        "sample", "--model", str(dit_dir), "--cfg-scale", "1.5", "--method", "none",
        "--steps", "2", "--num-samples", "1", "--out", str(out), "--device", "cpu",
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    manifest = read_run(out).manifest
    assert manifest["identity"]["dit_network"] == "dit"
    assert manifest["identity"]["resolved"]["model"]["dit_network"] == "dit"
    assert main([*argv, "--dit-network", "dit"]) == 0  # the default, spelled out: the same run
    assert main([*argv, "--dit-network", "diffusers"]) == 2  # another network: refused
    assert "dit_network: 'dit' -> 'diffusers'" in capsys.readouterr().err
