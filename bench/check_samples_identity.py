"""Samples are byte-identical before and after a change that must not alter them.

Runs ``fguide sample`` (through :func:`fguide.sampling.run_sampling`) on the tiny model of
every family with a fixed configuration each, and prints, per case, the SHA-256 of
``samples.npz``, of ``trajectory.json`` and the run identity's SHA-256 (what a resumed run is
compared against). The cases cover every model family and guide kind:

- ``adm-resnet-ddpm``: a tiny ADM UNet (8x8, class-conditional) + a ResNet-18 weight file, JS;
- ``adm-classifier-ddim``: ADM's noise-aware classifier (``adm`` + flags), entropy, DDIM;
- ``adm-import-heun-tilted``: an import-spec classifier, Heun (VP as EDM), tilted groups;
- ``adm-unguided-recorded``: unguided, the classifier's calibration recorded on x̂0;
- ``nvlabs-heun-churn``: the NVlabs EDM pickle of tests/reference, stochastic Heun;
- ``dit-algorithm3``: a tiny DiT pipeline folder (CFG 1.5 + classifier, Algorithm 3);
- ``unet-pipeline-mean``: a tiny UNet2DModel pipeline folder, the DDPM mean shift;
- ``adm-clip-target``: a tiny transformers CLIP folder as the guide (two prompts, a target);
- ``sd-clip-dpmpp``: a tiny Stable Diffusion folder (tests/sd_folders.py), two prompts, CFG 7.5,
  DPM-Solver++(2M), the CLIP guide on the generation prompts;
- ``sdxl-reward-ddim``: a tiny SDXL folder, a negative prompt, DDIM η 0.5, a reward head.

A case the baseline file does not have is reported as new, not as changed.

Every input is built in ``--work`` from fixed seeds, so paths (part of a run's identity) and
contents are the same on every call. Usage::

    python bench/check_samples_identity.py --out before.json          # on the old commit
    python bench/check_samples_identity.py --compare before.json      # after: exit 1 on change

Hashes depend on the CPU's floating-point kernels: compare lists made on one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
EDM_PICKLE = HERE.parent / "tests" / "reference" / "edm_tiny_snapshot.pkl"
ADM_FLAGS = (
    "image_size=8 num_channels=32 num_res_blocks=1 channel_mult=1,2 attention_resolutions=4 "
    "num_head_channels=32 class_cond=True learn_sigma=True"
)
UNCOND16 = (
    "image_size=16 num_channels=32 num_res_blocks=1 channel_mult=1,2 "
    "attention_resolutions=8 num_head_channels=32 learn_sigma=True"
)
ADM_CLASSIFIER = (
    "image_size=8 classifier_width=32 classifier_depth=1 "
    "classifier_attention_resolutions=4 channel_mult=1,2"
)

# Import-spec classifiers, written to the work folder (their source is part of the identity).
GUIDES = '''"""Classifiers of bench/check_samples_identity.py (fixed seeds, no global RNG)."""
import torch
from torch import nn


def _seeded(net: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return net


def tiny1000() -> nn.Module:
    return _seeded(nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.Softplus(),
                                 nn.Linear(32, 1000)), 1)


def tiny4() -> nn.Module:
    return _seeded(nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.Softplus(),
                                 nn.Linear(16, 4)), 2)


def decoded1000() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 1000))
'''


def _flags(text: str) -> dict[str, str]:
    return dict(kv.split("=") for kv in text.split())


def _adm_checkpoint(path: Path, flags: str) -> Path:
    from fguide.models.presets import create_model

    if not path.exists():
        torch.manual_seed(0)
        net = create_model(**_flags(flags))
        for p in net.parameters():  # ADM zero-initialises output layers: make every one matter
            p.data.add_(0.05 * torch.randn_like(p))
        torch.save(net.state_dict(), path)
    return path


def _resnet_file(path: Path) -> Path:
    from fguide.models.resnet import resnet

    if not path.exists():
        torch.manual_seed(0)
        torch.save(resnet("resnet18").state_dict(), path)
    return path


def _adm_classifier_file(path: Path) -> Path:
    from fguide.models.presets import create_classifier

    if not path.exists():
        torch.manual_seed(0)
        torch.save(create_classifier(**_flags(ADM_CLASSIFIER)).state_dict(), path)
    return path


def _dit_folder(path: Path) -> Path:
    import diffusers

    if not (path / "model_index.json").exists():
        torch.manual_seed(0)
        dit = diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
        )  # fmt: skip
        torch.manual_seed(1)
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=8, sample_size=16,
        )  # fmt: skip
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
        pipe = diffusers.DiTPipeline(transformer=dit, vae=vae, scheduler=sched)
        pipe.save_pretrained(path, safe_serialization=True)
    return path


def _unet_folder(path: Path) -> Path:
    import diffusers

    if not (path / "model_index.json").exists():
        torch.manual_seed(5)
        unet = diffusers.UNet2DModel(
            sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
        )  # fmt: skip
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
        diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    return path


def _clip_folder(folder: Path) -> Path:
    """A tiny random CLIP (byte-level BPE tokenizer, CLIP's layout), as in
    tests/test_models_clip.py."""
    import transformers
    from tokenizers import pre_tokenizers

    if (folder / "preprocessor_config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in alphabet:
            vocab[c + suffix] = len(vocab)
    merges = ["h o", "p ho", "a t</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    n = len(vocab)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=n, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=40, bos_token_id=n - 2,
            eos_token_id=n - 1, pad_token_id=n - 1,
        ),
        vision_config=dict(
            image_size=16, patch_size=4, hidden_size=32, intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=4,
        ),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 16},
        "crop_size": {"height": 16, "width": 16}, "do_resize": True, "do_center_crop": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": mean, "image_std": std, "resample": 3,
    }  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def _sd_folder(path: Path, sdxl: bool = False) -> Path:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from sd_folders import build_sd_folder, build_sdxl_folder

    if not (path / "model_index.json").exists():
        (build_sdxl_folder if sdxl else build_sd_folder)(path)
    return path


def _reward_head(path: Path) -> Path:
    if not path.exists():
        torch.manual_seed(6)
        torch.save({"weight": torch.randn(1, 16), "bias": torch.zeros(1)}, path)
    return path


def cases(work: Path) -> dict[str, dict[str, Any]]:
    """The fixed configurations (``SampleConfig`` keyword arguments without ``out``)."""
    guides = work / "identity_guides.py"
    guides.write_text(GUIDES)
    adm = _adm_checkpoint(work / "adm8.pt", ADM_FLAGS)
    common = dict(seed=3, device="cpu", progress=False, num_samples=5, batch_size=2, shard_size=4)
    return {
        "adm-resnet-ddpm": dict(
            model=adm,
            model_flags=ADM_FLAGS,
            classifier="resnet18",
            classifier_weights=_resnet_file(work / "r18.pth"),
            method="js",
            steps="4",
            **common,
        ),
        "adm-classifier-ddim": dict(
            model=adm,
            model_flags=ADM_FLAGS,
            classifier="adm",
            classifier_flags=ADM_CLASSIFIER,
            classifier_weights=_adm_classifier_file(work / "adm_classifier.pt"),
            method="entropy",
            sampler="ddim",
            steps="ddim4",
            labels="balanced",
            **common,
        ),
        "adm-import-heun-tilted": dict(
            model=adm,
            model_flags=ADM_FLAGS,
            classifier=f"{guides}:tiny1000",
            method="tilted",
            tilt_group=2,
            sampler="heun",
            steps="3",
            s_churn=5.0,
            **common,
        ),
        "adm-unguided-recorded": dict(
            model=adm,
            model_flags=ADM_FLAGS,
            classifier=f"{guides}:tiny1000",
            method="none",
            steps="3",
            labels="7",
            **common,
        ),
        "nvlabs-heun-churn": dict(
            model=EDM_PICKLE,
            classifier=f"{guides}:tiny4",
            steps="4",
            s_churn=40.0,
            s_tmin=0.05,
            s_tmax=50.0,
            **common,
        ),
        "dit-algorithm3": dict(
            model=_dit_folder(work / "dit"),
            cfg_scale=1.5,
            classifier=f"{guides}:decoded1000",
            scale=0.5,
            steps="3",
            **common,
        ),
        "unet-pipeline-mean": dict(
            model=_unet_folder(work / "unet"),
            classifier=f"{guides}:tiny1000",
            guidance_form="mean",
            method="hellinger",
            steps="4",
            **common,
        ),
        "adm-clip-target": dict(
            model=_adm_checkpoint(work / "uncond16.pt", UNCOND16),
            model_flags=UNCOND16,
            classifier=f"clip:{_clip_folder(work / 'tiny-clip')}",
            prompts=("a photo of a cat", "a photo of a dog"),
            target="a photo of a dog",
            tau2=0.0,
            scale=30.0,
            steps="3",
            **common,
        ),
        "sd-clip-dpmpp": dict(
            model=_sd_folder(work / "sd"),
            prompts=("a red fox", "hot dog at sea"),
            classifier=f"clip:{_clip_folder(work / 'tiny-clip')}",
            scale=50.0,
            steps="3",
            **common,
        ),
        "sdxl-reward-ddim": dict(
            model=_sd_folder(work / "sdxl", sdxl=True),
            prompts=("a red fox",),
            negative_prompt="blurry",
            classifier=f"reward:{_clip_folder(work / 'tiny-clip')}:{_reward_head(work / 'r.pt')}",
            sampler="ddim",
            eta=0.5,
            scale=5.0,
            steps="3",
            **common,
        ),
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cases(work: Path, only: list[str] | None = None) -> dict[str, dict[str, str]]:
    from fguide.sampling import SampleConfig, run_sampling

    torch.set_num_threads(1)  # one thread: the reductions' order is fixed
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(work))
    out: dict[str, dict[str, str]] = {}
    for name, kwargs in cases(work).items():
        if only and name not in only:
            continue
        run = work / "runs" / name
        shutil.rmtree(run, ignore_errors=True)
        result = run_sampling(SampleConfig(out=run, **kwargs))
        assert result.complete and result.samples is not None, name
        manifest = json.loads(result.manifest.read_text())
        out[name] = {
            "samples.npz": _sha(result.samples),
            "trajectory.json": _sha(run / "trajectory.json"),
            "identity": manifest["identity_sha256"],
        }
        print(name, json.dumps(out[name]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/fguide-samples-identity"))
    p.add_argument("--out", type=Path, help="write the hashes here (JSON)")
    p.add_argument("--compare", type=Path, help="exit 1 unless the hashes equal this file's")
    p.add_argument("--only", nargs="*", help="run these cases only")
    args = p.parse_args(argv)
    hashes = run_cases(args.work.resolve(), args.only)
    if args.out is not None:
        args.out.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    if args.compare is not None:
        before = json.loads(args.compare.read_text())
        new = [name for name in hashes if name not in before]
        changed = [
            f"{name}: {key}" for name, h in hashes.items() if name in before for key in h
            if before[name].get(key) != h[key]
        ]  # fmt: skip
        if new:
            print("new (not in the baseline): " + ", ".join(new))
        print("identical" if not changed else "CHANGED: " + "; ".join(changed))
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
