"""Generate ``dit_reference.pt`` in this folder from facebookresearch/DiT's own code.

Reference: facebookresearch/DiT at commit ed81ce2229091fd4ecc9a223645f95cf379d582b (``models.py``,
``diffusion/``). Weights are converted to a diffusers ``DiTTransformer2DModel`` with the key
mapping of huggingface/diffusers' ``scripts/convert_dit_to_diffusers.py`` (commit
92b20baa30e8c64a7ed7e94d08424575f5b04540), written out below as a table. Neither repository enters
fguide. DiT's ``models.py`` imports timm, which imports torchvision: run this in a separate
virtual environment (a CPU is enough), with DiT checked out elsewhere at that commit::

    python3 -m venv /tmp/venv-dit
    /tmp/venv-dit/bin/pip install torch torchvision timm diffusers numpy
    /tmp/venv-dit/bin/python tests/reference/generate_dit_reference.py --dit /tmp/DiT

It writes ``dit_reference.pt`` next to this script (``torch.load(weights_only=True)``):

* ``dit_kwargs`` / ``diffusers_kwargs``: a tiny DiT (depth 2, hidden 64, 4 heads, patch 2, an
  8×8×4 latent, learned sigma, 10 classes + the null class 10) and the
  ``DiTTransformer2DModel`` it converts to (diffusers' defaults otherwise, as the conversion
  script leaves them: ``norm_eps`` 1e-5).
* ``seed``, ``init_rule``: no weights are stored. Every DiT state-dict entry except the fixed
  sin-cos ``pos_embed`` takes the fixture-init rule (``../shared/fixtures/README.md``) of its DiT
  key, after ``model.double()``; ``conversion`` lists ``[diffusers key, DiT key, chunk]`` (chunk
  0/1/2 of ``attn.qkv`` along dim 0 for q/k/v, −1 for the whole tensor).
* ``features``: ``TimestepEmbedder.timestep_embedding(t, 256)`` at ``t``, in float32 as DiT runs
  it (``float32``) and lifted to float64 (``float64``).
* ``forward``: per case ``x``, per-sample ``t`` and ``y`` (the null class included), the DiT
  network's output in float64 (``expected64``: DiT's hard-coded float32 lifted to float64, see
  :func:`lifted`) and as-is in float32 (``expected32``), and ``forward_with_cfg`` at
  ``cfg_scale`` (first half, float64: ``cfg64``).
* ``sample``: ``create_diffusion(respacing).p_sample_loop(model.forward_with_cfg, ...)`` as DiT's
  ``sample.py`` calls it (doubled batch with the null class, ``clip_denoised=False``), from
  ``z`` with the per-step noise ``draws`` (first half; the null half gets the same draw, which
  does not reach the first half), in float64 (lifted) and float32 (as-is).
* ``measured``: how far diffusers' network, as converted, is from DiT (float64 network, float32
  time features as diffusers computes them): relative L2 distance and max |Δ| per forward case
  with (a) diffusers as-is, (b) ``downscale_freq_shift`` 0, (c) (b) plus the feed-forward
  LayerNorm's eps 1e-6 as DiT's; plus the sin-cos position table's max |Δ| (DiT's vs
  diffusers').
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import math
import sys
import types
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

DIT_COMMIT = "ed81ce2229091fd4ecc9a223645f95cf379d582b"
CONVERSION_COMMIT = "92b20baa30e8c64a7ed7e94d08424575f5b04540"
HERE = Path(__file__).resolve().parent
SEED = 0
NUM_CLASSES = 10
DIT_KWARGS: dict[str, Any] = {
    "input_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "hidden_size": 64,
    "depth": 2,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "class_dropout_prob": 0.1,
    "num_classes": NUM_CLASSES,
    "learn_sigma": True,
}
DIFFUSERS_KWARGS: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": NUM_CLASSES,
}
FEATURE_T = [0, 1, 250, 500, 999]
FORWARD_CASES: list[dict[str, Any]] = [
    {"name": "t500_t999", "t": [500, 999], "y": [3, 7], "input_seed": 1, "cfg_scale": 4.0},
    {
        "name": "t0_t250_null",
        "t": [0, 250],
        "y": [NUM_CLASSES, 5],
        "input_seed": 2,
        "cfg_scale": 1.5,
    },
]
SAMPLE_CASE: dict[str, Any] = {
    "name": "cfg1.5_respaced5",
    "respacing": "5",
    "cfg_scale": 1.5,
    "y": [2, 9],
    "input_seed": 3,
}

INIT_RULE = """def fixture_init(name, shape, seed=0):
    g = torch.Generator().manual_seed((zlib.crc32(name.encode("utf-8")) + seed) % (2**63))
    if len(shape) <= 1:
        base = 1.0 if name.endswith("weight") or name.endswith("gamma") else 0.0
        return base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)"""


def fixture_init(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The fixtures' deterministic weight rule (``../shared/fixtures/README.md``)."""
    g = torch.Generator().manual_seed((zlib.crc32(name.encode("utf-8")) + seed) % (2**63))
    if len(shape) <= 1:
        base = 1.0 if name.endswith("weight") or name.endswith("gamma") else 0.0
        return base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)


# -- DiT's code, as-is and lifted to float64 ---------------------------------------------------


class _Torch64(types.ModuleType):
    """``torch`` with ``float32`` resolving to ``float64`` (DiT's ``arange(dtype=float32)``)."""

    def __getattr__(self, name: str) -> Any:
        return torch.float64 if name == "float32" else getattr(torch, name)


@contextlib.contextmanager
def lifted(models: Any) -> Iterator[None]:
    """DiT's hard-coded float32 lifted to float64: ``torch.float32`` in ``models.py`` and every
    ``Tensor.float()`` (the timestep features' ``t.float()``, the diffusion code's
    ``_extract_into_tensor(...).float()`` and no-noise mask) give float64."""
    saved_torch, saved_float = models.torch, torch.Tensor.float
    models.torch = _Torch64("torch")
    torch.Tensor.float = lambda self, *a, **k: self.double(*a, **k)  # type: ignore[method-assign]
    try:
        yield
    finally:
        models.torch = saved_torch
        torch.Tensor.float = saved_float  # type: ignore[method-assign]


@contextlib.contextmanager
def replayed_noise(draws: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """``torch.randn_like`` hands out ``draws`` in order (each doubled for the CFG batch)."""
    saved, left = torch.randn_like, list(draws)

    def fake(like: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        d = left.pop(0)
        return torch.cat([d, d]).to(like)

    torch.randn_like = fake  # type: ignore[assignment]
    try:
        yield left
    finally:
        torch.randn_like = saved  # type: ignore[assignment]


def build_dit(models: Any) -> torch.nn.Module:
    """The tiny DiT in float64 with fixture-init weights (the sin-cos ``pos_embed`` kept)."""
    net = models.DiT(**DIT_KWARGS).double().eval()
    sd = net.state_dict()
    new = {
        k: v if k == "pos_embed" else fixture_init(k, tuple(v.shape), SEED) for k, v in sd.items()
    }
    net.load_state_dict(new)
    return net


# -- conversion (the mapping of diffusers' convert_dit_to_diffusers.py) ------------------------


def conversion_table(depth: int) -> list[list[Any]]:
    """``[diffusers key, DiT key, chunk]`` for every converted entry."""
    rows: list[list[Any]] = []
    for wb in ("weight", "bias"):
        rows.append([f"pos_embed.proj.{wb}", f"x_embedder.proj.{wb}", -1])
    for i in range(depth):
        d, b = f"transformer_blocks.{i}", f"blocks.{i}"
        for wb in ("weight", "bias"):
            emb = f"{d}.norm1.emb.timestep_embedder"
            rows.append([f"{emb}.linear_1.{wb}", f"t_embedder.mlp.0.{wb}", -1])
            rows.append([f"{emb}.linear_2.{wb}", f"t_embedder.mlp.2.{wb}", -1])
            rows.append([f"{d}.norm1.linear.{wb}", f"{b}.adaLN_modulation.1.{wb}", -1])
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                rows.append([f"{d}.attn1.{name}.{wb}", f"{b}.attn.qkv.{wb}", j])
            rows.append([f"{d}.attn1.to_out.0.{wb}", f"{b}.attn.proj.{wb}", -1])
            rows.append([f"{d}.ff.net.0.proj.{wb}", f"{b}.mlp.fc1.{wb}", -1])
            rows.append([f"{d}.ff.net.2.{wb}", f"{b}.mlp.fc2.{wb}", -1])
        rows.append(
            [
                f"{d}.norm1.emb.class_embedder.embedding_table.weight",
                "y_embedder.embedding_table.weight",
                -1,
            ]
        )
    for wb in ("weight", "bias"):
        rows.append([f"proj_out_1.{wb}", f"final_layer.adaLN_modulation.1.{wb}", -1])
        rows.append([f"proj_out_2.{wb}", f"final_layer.linear.{wb}", -1])
    return rows


def convert(dit_sd: dict[str, torch.Tensor], table: list[list[Any]]) -> dict[str, torch.Tensor]:
    out = {}
    for dkey, src, chunk in table:
        v = dit_sd[src]
        out[dkey] = (v if chunk < 0 else torch.chunk(v, 3, dim=0)[chunk]).clone()
    used = {src for _, src, _ in table}
    left = set(dit_sd) - used - {"pos_embed"}
    assert not left, f"DiT keys not converted: {sorted(left)}"
    return out


def build_diffusers(dit: torch.nn.Module, table: list[list[Any]]) -> torch.nn.Module:
    import diffusers

    net = diffusers.DiTTransformer2DModel(**DIFFUSERS_KWARGS).double().eval()
    missing, unexpected = net.load_state_dict(convert(dit.state_dict(), table), strict=True)
    assert not missing and not unexpected
    return net


# -- the reference outputs ---------------------------------------------------------------------


def _cfg_call(
    model: Any, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, s: float
) -> torch.Tensor:
    """DiT's ``forward_with_cfg`` on [x, x] with [y, null], first half (as ``sample.py``)."""
    null = torch.full_like(y, NUM_CLASSES)
    out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), s)
    return out[: len(x)].clone()  # a slice would save the whole doubled storage


def forward_cases(models: Any, dit: torch.nn.Module) -> list[dict[str, Any]]:
    dit32 = models.DiT(**DIT_KWARGS).eval()
    dit32.load_state_dict({k: v.float() for k, v in dit.state_dict().items()})
    cases = []
    for spec in FORWARD_CASES:
        g = torch.Generator().manual_seed(spec["input_seed"])
        x = torch.randn(len(spec["t"]), 4, 8, 8, generator=g, dtype=torch.float64)
        t, y = torch.tensor(spec["t"]), torch.tensor(spec["y"])
        with torch.no_grad():
            with lifted(models):
                out64 = dit(x, t, y)
                cfg64 = _cfg_call(dit, x, t, y, spec["cfg_scale"])
            out32 = dit32(x.float(), t, y)
        assert out64.dtype == cfg64.dtype == torch.float64 and out32.dtype == torch.float32
        cases.append(
            {
                **spec,
                "t": t,
                "y": y,
                "x": x,
                "expected64": out64,
                "expected32": out32,
                "cfg64": cfg64,
            }
        )
    return cases


def sample_case(models: Any, diffusion: Any, dit: torch.nn.Module) -> dict[str, Any]:
    spec = SAMPLE_CASE
    steps = len(diffusion.space_timesteps(1000, spec["respacing"]))
    g = torch.Generator().manual_seed(spec["input_seed"])
    y = torch.tensor(spec["y"])
    z = torch.randn(len(y), 4, 8, 8, generator=g, dtype=torch.float64)
    draws = torch.randn(steps, len(y), 4, 8, 8, generator=g, dtype=torch.float64)
    kwargs = {"y": torch.cat([y, torch.full_like(y, NUM_CLASSES)]), "cfg_scale": spec["cfg_scale"]}
    dit32 = models.DiT(**DIT_KWARGS).eval()
    dit32.load_state_dict({k: v.float() for k, v in dit.state_dict().items()})
    out = {}
    for key, net, x0, dr in (
        ("expected64", dit, z, draws),
        ("expected32", dit32, z.float(), draws.float()),
    ):
        proc = diffusion.create_diffusion(spec["respacing"])
        ctx = lifted(models) if key == "expected64" else contextlib.nullcontext()
        with ctx, replayed_noise(list(dr)) as left:
            res = proc.p_sample_loop(
                net.forward_with_cfg, (2 * len(y), 4, 8, 8), torch.cat([x0, x0]),
                clip_denoised=False, model_kwargs=kwargs, device="cpu",
            )  # fmt: skip
        assert not left, "every draw is used once"
        out[key] = res[: len(y)].clone()
    assert out["expected64"].dtype == torch.float64 and out["expected32"].dtype == torch.float32
    return {**spec, "y": y, "z": z, "draws": draws, **out}


def _dev(a: torch.Tensor, ref: torch.Tensor) -> list[list[float]]:
    """[relative L2 distance, max |Δ|] per sample."""
    d = (a - ref).flatten(1)
    return [
        [float(r.norm() / e.norm()), float(r.abs().max())]
        for r, e in zip(d, ref.flatten(1), strict=True)
    ]


def measured(
    models: Any, dit: torch.nn.Module, net: torch.nn.Module, cases: list[dict[str, Any]]
) -> dict[str, Any]:
    """diffusers' converted network against DiT (lifted float64), as-is and with the fixes."""
    res: dict[str, Any] = {}
    ref_pos = dit.pos_embed.detach()
    res["pos_embed_max_abs"] = float((net.pos_embed.pos_embed - ref_pos).abs().max())
    variants = ("diffusers_as_is", "freq_shift_0", "freq_shift_0_and_eps_1e-6")
    for i, variant in enumerate(variants):
        for block in net.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0 if i >= 1 else 1
            block.norm3.eps = 1e-6 if i >= 2 else 1e-5
        rows = []
        for c in cases:
            with torch.no_grad():
                out = net(c["x"], timestep=c["t"], class_labels=c["y"]).sample
            rows.append(
                {
                    "name": c["name"],
                    "t": c["t"].tolist(),
                    "rel_l2_max_abs": _dev(out, c["expected64"]),
                }
            )
        res[variant] = rows
    for block in net.transformer_blocks:  # back to diffusers' own
        block.norm1.emb.time_proj.downscale_freq_shift = 1
        block.norm3.eps = 1e-5
    return res


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dit", type=Path, required=True, help=f"facebookresearch/DiT at {DIT_COMMIT[:7]}"
    )
    ap.add_argument("--out", type=Path, default=HERE / "dit_reference.pt")
    args = ap.parse_args()
    sys.path.insert(0, str(args.dit.resolve()))
    models = importlib.import_module("models")
    diffusion = importlib.import_module("diffusion")
    import diffusers
    import timm

    torch.set_num_threads(1)
    dit = build_dit(models)
    table = conversion_table(DIT_KWARGS["depth"])
    net = build_diffusers(dit, table)
    t = torch.tensor(FEATURE_T)
    emb = models.TimestepEmbedder.timestep_embedding
    with lifted(models):
        f64 = emb(t, 256)
    f32 = emb(t, 256)
    assert f64.dtype == torch.float64 and f32.dtype == torch.float32
    cases = forward_cases(models, dit)
    sources = [
        "models.py",
        *sorted(str(p.relative_to(args.dit)) for p in (args.dit / "diffusion").glob("*.py")),
    ]
    data = {
        "format": 1,
        "description": inspect.getdoc(sys.modules[__name__]),
        "dit_commit": DIT_COMMIT,
        "conversion_commit": CONVERSION_COMMIT,
        "sources_sha256": {s: _sha256(args.dit / s) for s in sources},
        "versions": {
            "torch": str(torch.__version__),
            "diffusers": diffusers.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
        },  # fmt: skip
        "seed": SEED,
        "init_rule": INIT_RULE,
        "dit_kwargs": DIT_KWARGS,
        "diffusers_kwargs": DIFFUSERS_KWARGS,
        "conversion": table,
        "features": {"t": t, "dim": 256, "float64": f64, "float32": f32},
        "forward": cases,
        "sample": sample_case(models, diffusion, dit),
        "measured": measured(models, dit, net, cases),
    }
    torch.save(data, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    m = data["measured"]
    print(f"pos_embed max |Δ| {m['pos_embed_max_abs']:.3g}")
    for variant in ("diffusers_as_is", "freq_shift_0", "freq_shift_0_and_eps_1e-6"):
        for row in m[variant]:
            cells = ", ".join(
                f"t={tt}: rel {r:.3g} max {mx:.3g}"
                for tt, (r, mx) in zip(row["t"], row["rel_l2_max_abs"], strict=True)
            )
            print(f"{variant:28s} {cells}")


if __name__ == "__main__":
    main()
