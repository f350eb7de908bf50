"""Tiny random Stable Diffusion folders for the tests, built from configs (no network):
an SD 1.x-style pipeline (``StableDiffusionPipeline.save_pretrained``), an SDXL one
(``StableDiffusionXLPipeline.save_pretrained``) and a CLIP model folder.

Sizes: 32×32 images, 4-channel 8×8 latents (a VAE of 3 levels), text encoders 32 wide with
2 layers and a byte-level BPE tokenizer over a small vocabulary (CLIP's layout, as
tests/test_clip.py builds it) with the 77-token context of SD.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

IMAGE = 32
LATENT = 8
WIDTH = 32  # text encoder width
PROJECTION = 16  # SDXL text_encoder_2 projection (the pooled embedding)
TIME_EMBED = 8  # SDXL addition_time_embed_dim
MERGES = ["h o", "p ho", "a t</w>", "r e", "e d</w>", "o g</w>", "s e", "n o"]
# SD 1.5's scheduler config (PNDM) and SDXL's (Euler): the keys the samplers read.
SD_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}
SDXL_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "use_karras_sigmas": False,
}


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>", max_length: int = 77) -> Any:
    """A CLIPTokenizer over the 512 byte-level characters (plain and end-of-word), a few merges,
    and CLIP's start/end tokens; saved to ``folder`` and returned."""
    import transformers
    from tokenizers import pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab[c + suffix] = len(vocab)
    for m in MERGES:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    tok = transformers.CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=max_length,
        pad_token=pad_token,
    )
    tok.save_pretrained(folder)
    return tok


def _text_config(n_vocab: int, **extra: Any) -> Any:
    import transformers

    return transformers.CLIPTextConfig(
        vocab_size=n_vocab,
        hidden_size=WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=n_vocab - 2,
        eos_token_id=n_vocab - 1,
        pad_token_id=n_vocab - 1,
        **extra,
    )


def _vae() -> Any:
    import diffusers

    torch.manual_seed(1)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=IMAGE,
        scaling_factor=0.18215,
    )


def _unet(sdxl: bool) -> Any:
    import diffusers

    torch.manual_seed(2)
    extra: dict[str, Any] = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED,
            projection_class_embeddings_input_dim=6 * TIME_EMBED + PROJECTION,
            use_linear_projection=True,
        )
    return diffusers.UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * WIDTH if sdxl else WIDTH,
        norm_num_groups=4,
        attention_head_dim=4,
        **extra,
    )


def build_sd_folder(
    path: Path, scheduler: dict[str, Any] | None = None, prediction_type: str = "epsilon"
) -> Path:
    """A tiny StableDiffusionPipeline folder (SD 1.5's scheduler config unless given)."""
    import diffusers
    import transformers

    tok = write_tokenizer(path.parent / f"{path.name}-tokenizer")
    torch.manual_seed(0)
    te = transformers.CLIPTextModel(_text_config(len(tok)))
    sched_cfg = dict(scheduler or SD_SCHEDULER, prediction_type=prediction_type)
    sched = diffusers.PNDMScheduler.from_config(sched_cfg)
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=te,
        tokenizer=tok,
        unet=_unet(False),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    # the file as SD 1.5's is: only the keys it sets (no timestep_spacing, so each scheduler
    # class takes its own default)
    keep = {k: v for k, v in sched_cfg.items() if k != "prediction_type" or v != "epsilon"}
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(keep, indent=2))
    return path


def build_sdxl_folder(path: Path, force_zeros_for_empty_prompt: bool = True) -> Path:
    """A tiny StableDiffusionXLPipeline folder (SDXL's Euler scheduler config)."""
    import diffusers
    import transformers

    tok = write_tokenizer(path.parent / f"{path.name}-tokenizer")
    tok2 = write_tokenizer(path.parent / f"{path.name}-tokenizer-2", pad_token="!")
    torch.manual_seed(0)
    te = transformers.CLIPTextModel(_text_config(len(tok)))
    torch.manual_seed(3)
    te2 = transformers.CLIPTextModelWithProjection(
        _text_config(len(tok2), projection_dim=PROJECTION)
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=_unet(True),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_clip_folder(path: Path, image_size: int = 16, projection: int = 16) -> Path:
    """A tiny random transformers CLIPModel folder (safetensors, tokenizer, preprocessor)."""
    import transformers

    tok = write_tokenizer(path)
    n = len(tok)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=n - 2,
            eos_token_id=n - 1,
            pad_token_id=n - 1,
        ),
        vision_config=dict(
            image_size=image_size,
            patch_size=4,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=projection,
    )
    torch.manual_seed(4)
    transformers.CLIPModel(config).save_pretrained(path)
    pre = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
        "do_resize": True,
        "do_center_crop": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    return path


def one_thread() -> Iterator[None]:
    """Run a test module's tiny networks on one thread, then restore the count: at these sizes
    (8×8 latents, 32-wide encoders) every parallel region costs more than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
