"""Stable Diffusion pipelines as fguide models (:mod:`fguide.models.stable_diffusion`): unguided
sampling against ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` with the same
scheduler, initial latents, prompts and noise; the prompt encoding against the pipelines'
``encode_prompt``; per-sample prompts; and the folder and prompt errors. Tiny random pipelines
built by tests/sd_folders.py."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sd_folders import LATENT, build_sd_folder, build_sdxl_folder, one_thread  # noqa: E402

from fguide.models.sd_text import PromptTruncationWarning  # noqa: E402
from fguide.models.stable_diffusion import (  # noqa: E402
    SDModel,
    build_sd_sampling,
    load_sd_pipeline,
    sd_pipeline_files,
    sd_pipeline_kind,
)

PROMPTS = ["a red photo", "hot dog at sea"]
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmpp-2m": "DPMSolverMultistepScheduler",
}
PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd")
    return {"sd": build_sd_folder(root / "sd"), "sdxl": build_sdxl_folder(root / "sdxl")}


@pytest.fixture(scope="module")
def models(folders: dict[str, Path]) -> dict[tuple[str, torch.dtype], SDModel]:
    return {
        (k, dt): load_sd_pipeline(p, dtype=dt)
        for k, p in folders.items()
        for dt in (torch.float32, torch.float64)
    }


@pytest.fixture(scope="module")
def pipes(folders: dict[str, Path]) -> dict[str, Any]:
    out = {}
    for kind, path in folders.items():
        pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(path, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        out[kind] = pipe
        _BASE[id(pipe)] = pipe.scheduler.config  # the folder's scheduler, before any swap
    return out


_BASE: dict[int, Any] = {}


class _Replay:
    def __init__(self, draws: list[Tensor]):
        self.draws, self.k = draws, 0

    def __call__(self, like: Tensor) -> Tensor:
        self.k += 1
        return self.draws[self.k - 1].to(like)


def _patch_noise(monkeypatch: pytest.MonkeyPatch, draws: list[Tensor]) -> None:
    """The schedulers' per-step draws (DDIM with η > 0, DDPM) replayed from ``draws``."""
    it = iter(draws)

    def fake(shape, generator=None, device=None, dtype=None, layout=None):  # type: ignore[no-untyped-def]
        return next(it).to(dtype)

    for mod in ("scheduling_ddim", "scheduling_ddpm"):
        monkeypatch.setattr(f"diffusers.schedulers.{mod}.randn_tensor", fake)


def _pipeline_latents(pipe: Any, sampler: str, dtype: torch.dtype, **kw: Any) -> Tensor:
    """The pipeline's final latents with ``sampler``'s scheduler built from the folder's config
    (float64: the scheduler's ᾱ in float64 too, as fguide keeps it)."""
    import numpy as np

    base = _BASE.setdefault(id(pipe), pipe.scheduler.config)
    sched = getattr(diffusers, SCHEDULERS[sampler]).from_config(base)
    if dtype == torch.float64 and sampler != "dpmpp-2m":
        from fguide.models.hf_diffusers import scheduler_betas

        abar = torch.from_numpy(np.cumprod(1 - scheduler_betas(dict(base))))
        sched.alphas_cumprod = abar
        if sampler == "ddim" and not sched.config.set_alpha_to_one:
            sched.final_alpha_cumprod = abar[0]
    pipe.scheduler = sched
    pipe.to(dtype)
    return pipe(output_type="latent", **kw).images


CASES = [
    ("sd", "ddim", 0.5, "blurry"),
    ("sd", "ddpm", 0.0, None),
    ("sd", "dpmpp-2m", 0.0, "blurry"),
    ("sdxl", "ddim", 0.0, None),  # SDXL: no negative prompt → zero embeddings
    ("sdxl", "ddpm", 0.0, "blurry"),
    ("sdxl", "dpmpp-2m", 0.0, None),
]


@pytest.mark.parametrize("kind,sampler,eta,negative", CASES)
def test_unguided_sampling_is_the_pipelines_in_float32(
    kind: str,
    sampler: str,
    eta: float,
    negative: str | None,
    models: dict,  # type: ignore[type-arg]
    pipes: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3 steps (DPM-Solver: first, second, then first order), CFG 7.5, two prompts."""
    sd = models[(kind, torch.float32)]
    steps, b = 3, 2
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(b, 4, LATENT, LATENT, generator=gen)
    draws = [torch.randn(b, 4, LATENT, LATENT, generator=gen) for _ in range(steps)]
    _patch_noise(monkeypatch, draws)
    ref = _pipeline_latents(
        pipes[kind],
        sampler,
        torch.float32,
        prompt=PROMPTS,
        negative_prompt=None if negative is None else [negative] * b,
        num_inference_steps=steps,
        guidance_scale=7.5,
        eta=eta,
        latents=z.clone(),
    )
    emb = sd.encode(PROMPTS)
    neg = None if negative is None else sd.negative(negative, emb)
    s = build_sd_sampling(
        sd, sd.conditioning(emb, range(b)), sampler=sampler, steps=steps, negative=neg, eta=eta
    )
    ours = s.sample(z.clone(), noise=_Replay(draws))
    assert ref.std() > 0.1
    # float32: 3 steps of a UNet (~40 layers) and ~10 scheduler operations each; ≤ 1e-5 · max|x|
    # is ~80 ulps of the largest value, far below any difference of formula (those are ≥ 1e-2)
    torch.testing.assert_close(ours, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize(
    "kind,sampler,eta", [("sd", "ddim", 0.7), ("sd", "ddpm", 0.0), ("sdxl", "ddim", 0.0)]
)
def test_unguided_sampling_is_the_pipelines_in_float64(
    kind: str,
    sampler: str,
    eta: float,
    models: dict,  # type: ignore[type-arg]
    pipes: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Network, text encoders and the scheduler's ᾱ in float64 (DPM-Solver's scheduler steps in
    float32 whatever the input: tests/test_samplers_dpm.py checks it in float64)."""
    sd = models[(kind, torch.float64)]
    steps, b = 3, 2
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(b, 4, LATENT, LATENT, generator=gen, dtype=torch.float64)
    draws = [
        torch.randn(b, 4, LATENT, LATENT, generator=gen, dtype=torch.float64) for _ in range(3)
    ]
    draws[-1] = torch.zeros_like(draws[-1])  # DDPMScheduler's last step adds √1e-20 · draw
    _patch_noise(monkeypatch, draws)
    try:
        ref = _pipeline_latents(
            pipes[kind],
            sampler,
            torch.float64,
            prompt=PROMPTS,
            num_inference_steps=steps,
            guidance_scale=5.0,
            eta=eta,
            latents=z.clone(),
        )
    finally:
        pipes[kind].to(torch.float32)
    emb = sd.encode(PROMPTS)
    s = build_sd_sampling(sd, emb, sampler=sampler, steps=steps, cfg_scale=5.0, eta=eta)
    ours = s.sample(z.clone(), noise=_Replay(draws))
    torch.testing.assert_close(ours, ref, atol=1e-12 * float(ref.abs().max()), rtol=0)


def test_v_prediction_is_the_pipelines(tmp_path: Path) -> None:
    """An SD 2.x-style v-prediction UNet (ε = √ᾱ v + √(1 − ᾱ) z after CFG), DDIM and
    DPM-Solver."""
    path = build_sd_folder(tmp_path / "v", prediction_type="v_prediction")
    sd = load_sd_pipeline(path)
    assert sd.prediction_type == "v_prediction"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(3))
    emb = sd.encode(PROMPTS)
    for sampler in ("ddim", "dpmpp-2m"):
        ref = _pipeline_latents(
            pipe, sampler, torch.float32, prompt=PROMPTS, num_inference_steps=3, latents=z.clone()
        )
        ours = build_sd_sampling(sd, emb, sampler=sampler, steps=3).sample(z.clone())
        torch.testing.assert_close(ours, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
        eps_read = build_sd_sampling(sd, emb, sampler=sampler, steps=3)
        eps_read.model._abar = None  # read as ε: visibly different
        assert (eps_read.sample(z.clone()) - ref).abs().max() > 1e-2 * ref.abs().max()


def test_sample_i_takes_prompt_i_mod_n(models: dict) -> None:  # type: ignore[type-arg]
    """Samples 0..4 of two prompts; samples 3 and 4 run alone equal their rows of the batch."""
    sd = models[("sd", torch.float64)]
    emb = sd.encode(PROMPTS)
    rows = sd.conditioning(emb, range(5))
    torch.testing.assert_close(rows.hidden[2], emb.hidden[0], rtol=0, atol=0)
    torch.testing.assert_close(rows.hidden[3], emb.hidden[1], rtol=0, atol=0)
    z = torch.randn(5, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(4)).double()
    full = build_sd_sampling(sd, rows, sampler="ddim", steps=2).sample(z)
    part = build_sd_sampling(sd, sd.conditioning(emb, [3, 4]), sampler="ddim", steps=2)
    torch.testing.assert_close(part.sample(z[3:]), full[3:], atol=1e-12, rtol=1e-12)
    assert (full[3] - full[4]).abs().max() > 1e-3  # the two prompts differ


def test_prompt_encoding_is_the_pipelines(models: dict, pipes: dict[str, Any]) -> None:  # type: ignore[type-arg]
    """Hidden states, negative prompts, SDXL's pooled embeddings, zero negatives and time ids
    as the pipelines' encode_prompt (float32, a 2-layer encoder: 1e-6 relative)."""

    def close(a: Tensor, b: Tensor) -> None:
        torch.testing.assert_close(a, b, atol=1e-6 * float(b.abs().max()), rtol=0)

    sd, pipe = models[("sd", torch.float32)], pipes["sd"]
    emb = sd.encode(PROMPTS)
    pos, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=["blurry"] * 2)
    close(emb.hidden, pos)
    close(sd.negative("blurry", emb).hidden[0], neg[0])
    _, neg_empty = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    close(sd.negative(None, emb).hidden[0], neg_empty[0])  # SD: "" encoded, not zeros
    assert emb.pooled is None

    xl, pipe = models[("sdxl", torch.float32)], pipes["sdxl"]
    emb = xl.encode(PROMPTS)
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    close(emb.hidden, pos)
    assert emb.pooled is not None and emb.time_ids is not None
    close(emb.pooled, pooled)
    zero = xl.negative(None, emb)
    assert zero.pooled is not None and neg.abs().max() == 0 and zero.hidden.abs().max() == 0
    assert neg_pooled.abs().max() == 0 and zero.pooled.abs().max() == 0
    _, neg, _, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt="blurry")
    given = xl.negative("blurry", emb)
    assert given.pooled is not None
    close(given.hidden[0], neg[0])
    close(given.pooled[0], neg_pooled[0])
    ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, 16)
    torch.testing.assert_close(emb.time_ids, ids.expand(2, 6), rtol=0, atol=0)


def test_long_prompts_are_truncated_with_a_warning(models: dict, pipes: dict[str, Any]) -> None:  # type: ignore[type-arg]
    sd = models[("sd", torch.float32)]
    long = "a " * 80 + "hot dog"  # 82 tokens with the start and end tokens: 77 kept
    with pytest.warns(PromptTruncationWarning, match=r"prompt 1 is longer .*77 tokens.*hot dog"):
        emb = sd.encode(["a red photo", long])
    pos, _ = pipes["sd"].encode_prompt([long], "cpu", 1, False)
    torch.testing.assert_close(emb.hidden[1], pos[0], atol=1e-6 * float(pos.abs().max()), rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncationWarning)
        sd.encode(["a " * 75])  # 77 tokens exactly: nothing lost, no warning


def test_other_pipelines_and_bad_folders_are_refused(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    assert sd_pipeline_kind(folders["sd"]) == "sd"
    assert sd_pipeline_kind(folders["sdxl"]) == "sdxl"
    dit = tmp_path / "dit"
    dit.mkdir()
    (dit / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    assert sd_pipeline_kind(dit) is None
    layout = r"expected a folder in the layout StableDiffusionPipeline\.save_pretrained"
    with pytest.raises(ValueError, match=r"is a 'DiTPipeline' folder; " + layout):
        load_sd_pipeline(dit)
    with pytest.raises(ValueError, match="has no model_index.json; " + layout):
        load_sd_pipeline(tmp_path)
    xl = tmp_path / "xl"
    shutil.copytree(folders["sdxl"], xl)
    index = json.loads((xl / "model_index.json").read_text())
    del index["text_encoder_2"]
    (xl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="has no 'text_encoder_2'"):
        load_sd_pipeline(xl)


@pytest.mark.parametrize(
    "sub,name", [("unet", "diffusion_pytorch_model"), ("text_encoder", "model")]
)
def test_pickled_weights_are_refused(
    folders: dict[str, Path], tmp_path: Path, sub: str, name: str
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(folders["sd"], bad)
    (bad / sub / f"{name}.safetensors").unlink()
    (bad / sub / f"{name}.bin").write_bytes(b"never unpickled")
    with pytest.raises(
        FileNotFoundError, match=f"{sub}: no .safetensors weights .fguide never loads pickled"
    ):
        load_sd_pipeline(bad)


def test_empty_prompts_and_bad_cfg_are_refused(models: dict) -> None:  # type: ignore[type-arg]
    sd = models[("sd", torch.float32)]
    with pytest.raises(ValueError, match="--prompt: no prompts given"):
        sd.encode([])
    emb = sd.encode(PROMPTS)
    with pytest.raises(ValueError, match="--cfg-scale must be finite"):
        sd.eps_model(emb, sd.negative(None, emb), float("nan"))
    with pytest.raises(ValueError, match="2 rows for a batch of 3"):
        sd.eps_model(emb)(torch.zeros(3, 4, LATENT, LATENT), torch.tensor([1, 1, 1]), None)


def test_pipeline_files_are_what_is_loaded(folders: dict[str, Path]) -> None:
    files = {str(f.relative_to(folders["sdxl"])) for f in sd_pipeline_files(folders["sdxl"])}
    for must in (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "tokenizer/tokenizer_config.json",
        "tokenizer_2/tokenizer.json",
    ):
        assert must in files
    assert not any(f.endswith(".bin") for f in files)
