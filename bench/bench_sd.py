"""Benchmark the Stable Diffusion path: unguided CFG sampling vs guidance through the decoded
image (a CLIP head on the VAE decoder's output), per sampler; and, with ``--flops``, the FLOPs
and the decoder-backward memory of one step at SD 1.5's 512×512 and SDXL's 1024×1024.

Timing (side by side in one run: round-robin, ``--repeats`` rounds, rotated order, each case
run twice in a row and the second timed; the process's CPU time on CPU, wall clock on a GPU),
per sampler (DDIM, DDPM, DPM-Solver++(2M)):

- ``unguided``: CFG (s = 7.5) on per-sample prompt embeddings, then the final decode;
- ``guided``: + CLIP guidance (one prompt, cosine) through C∘clip∘Dec, the whole batch in one
  backward;
- ``guided-mb``: the same with ``guidance_microbatch`` = batch/4.

Presets: ``tiny`` (CPU default): the tests' pipeline (tests/sd_folders.py sizes: 32×32 images,
4×8×8 latents, a UNet of 8/16 channels, 32-wide text states) and a tiny CLIP (32×32 input);
batch 4, 4 steps, one thread. ``sd15`` (the GPU default): SD 1.5's UNet and VAE configurations,
CLIP ViT-L/14's vision tower (random weights); 512×512, batch 8, 10 steps. Peak memory: the CPU
heap in use (glibc ``mallinfo2``, polled) or ``torch.cuda.max_memory_allocated``, above the
level at the start of the case (bench_dit's ``_Peak``). Ratios: medians over rounds of
within-round ratios.

``--flops`` builds the networks on the ``meta`` device (nothing is allocated or computed) and
counts with torch's ``FlopCounterMode``, per image: the CFG UNet call (batch 2), the guidance
pass (decoder forward, CLIP's resize to 224 and forward, both backwards into the latent), and
the bytes autograd saves for that backward (fp32; the memory ``--guidance-microbatch`` bounds),
next to the UNet's and the decoder's weights.

    python bench/bench_sd.py [--preset tiny|sd15] [--batch 4] [--steps 4] [--out r.json]
    python bench/bench_sd.py --flops [--out flops.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch
from _memory import heap_probe
from bench_dit import _Peak
from torch import Tensor

import fguide
from fguide.models import hf_diffusers as hd
from fguide.models.clip import CLIPHead, CLIPPreprocess
from fguide.models.latent_guidance import MicrobatchGuide
from fguide.models.sd_schedules import sd_schedule
from fguide.models.sd_text import PromptEmbeds
from fguide.models.stable_diffusion import SDEps, SDSampling

SAMPLERS = ("ddim", "ddpm", "dpmpp-2m")
KINDS = ("unguided", "guided", "guided-mb")
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}
# diffusers configurations of SD 1.5 (runwayml/stable-diffusion-v1-5) and SDXL base 1.0
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # fmt: skip
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip
SD_VAE: dict[str, Any] = dict(
    latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
CLIP_L14: dict[str, Any] = dict(
    image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
    num_hidden_layers=24, num_attention_heads=16, projection_dim=768,
)  # fmt: skip
TINY_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)  # fmt: skip
TINY_VAE: dict[str, Any] = dict(
    latent_channels=4, block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)  # fmt: skip
TINY_CLIP: dict[str, Any] = dict(
    image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    num_attention_heads=4, projection_dim=16,
)  # fmt: skip


def _clip_head(vision: dict[str, Any], device: torch.device) -> CLIPHead:
    """A CLIP head with CLIP's preprocessing at the tower's size, one random prompt embedding."""
    import transformers

    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4),
        vision_config={k: v for k, v in vision.items() if k != "projection_dim"},
        projection_dim=vision["projection_dim"],
    )  # fmt: skip
    torch.manual_seed(3)
    model = transformers.CLIPModel(cfg).to(device).eval()
    size = int(vision["image_size"])
    text = torch.nn.functional.normalize(torch.randn(1, vision["projection_dim"]), dim=-1)
    pre = CLIPPreprocess(size, size, size)
    return CLIPHead(model, text.to(device), ["a prompt"], pre, logit_scale=100.0)


def _setup(preset: str, batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    import diffusers

    torch.manual_seed(0)
    unet_cfg, vae_cfg, clip_cfg, width = (
        (TINY_UNET, TINY_VAE, TINY_CLIP, 32)
        if preset == "tiny"
        else (SD15_UNET, SD_VAE, CLIP_L14, 768)
    )
    unet = diffusers.UNet2DConditionModel(**unet_cfg).to(device).eval().requires_grad_(False)
    vae = diffusers.AutoencoderKL(**vae_cfg).to(device).eval().requires_grad_(False)
    head = _clip_head(clip_cfg, device)
    gen = torch.Generator().manual_seed(1)
    cond = PromptEmbeds(torch.randn(batch, 77, width, generator=gen).to(device))
    uncond = PromptEmbeds(torch.randn(1, 77, width, generator=gen).to(device))
    model = SDEps(unet, cond, uncond, 7.5)
    decoder = hd.LatentDecoder(vae)
    betas = hd.scheduler_betas(SD15_SCHEDULER)
    obj = fguide.objective("base", tau2=0.0)
    setups: dict[str, SDSampling] = {}
    for sampler in SAMPLERS:
        sched = sd_schedule(betas, SD15_SCHEDULER, sampler, steps)
        for kind in KINDS:
            mb = max(1, batch // 4) if kind == "guided-mb" else None
            clf = hd.DecodedClassifier(decoder, head)
            guide = None if kind == "unguided" else MicrobatchGuide(clf, obj, 1.0, mb)
            setups[f"{sampler}/{kind}"] = SDSampling(
                model, sched, guide, 0.0, 0.3, lambda z: decoder.decode(z)
            )
    c, h = int(unet_cfg["in_channels"]), int(unet_cfg["sample_size"])
    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    return {"setups": setups, "shape": (c, h, h), "image_size": h * factor}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    preset = args.preset or ("sd15" if device.type == "cuda" else "tiny")
    batch = args.batch or (8 if preset == "sd15" else 4)
    steps = args.steps or (10 if preset == "sd15" else 4)
    s = _setup(preset, batch, steps, device)
    setups: dict[str, SDSampling] = s["setups"]
    z = fguide.SampleNoise(0, range(batch)).initial(s["shape"], device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    probe = heap_probe()

    def once(case: str) -> tuple[float, int]:
        sampling = setups[case]
        # CPU: the process's CPU time (robust to other work on a shared machine); GPU: wall
        clock = time.perf_counter if device.type == "cuda" else time.process_time
        with _Peak(device, probe) as peak:
            t0 = clock()
            x = sampling.sample(z, labels=labels, noise=fguide.SampleNoise(0, range(batch)))
            img: Tensor = sampling.to_image(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = clock() - t0
        assert torch.isfinite(img).all()
        return dt, peak.bytes

    cases = list(setups)
    times: dict[str, list[float]] = {c: [] for c in cases}
    mems: dict[str, list[int]] = {c: [] for c in cases}
    for r in range(args.repeats):
        for case in cases[r % len(cases) :] + cases[: r % len(cases)]:
            once(case)  # warm: the second run of a pair is timed
            dt, mem = once(case)
            times[case].append(dt)
            mems[case].append(mem)

    def ratio(a: str, b: str, data: dict[str, list[Any]]) -> float:
        return statistics.median(x / max(y, 1e-12) for x, y in zip(data[a], data[b], strict=True))

    per_sampler = {
        smp: {
            "guided_time_x_unguided": ratio(f"{smp}/guided", f"{smp}/unguided", times),
            "guided_memory_x_unguided": ratio(f"{smp}/guided", f"{smp}/unguided", mems),
            "microbatch_time_x_full": ratio(f"{smp}/guided-mb", f"{smp}/guided", times),
            "microbatch_memory_x_full": ratio(f"{smp}/guided-mb", f"{smp}/guided", mems),
        }
        for smp in SAMPLERS
    }
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu(),
        "clock": "wall" if device.type == "cuda" else "process CPU time",
        "preset": preset,
        "batch": batch,
        "steps": steps,
        "threads": args.threads,
        "image_size": s["image_size"],
        "seconds_best": {c: min(v) for c, v in times.items()},
        "peak_bytes_median": {c: int(np.median(v)) for c, v in mems.items()},
        "per_sampler": per_sampler,
        "torch": torch.__version__,
    }


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _saved_bytes(*nets: torch.nn.Module) -> tuple[Any, list[int]]:
    """A saved-tensors hook that sums the bytes of the storages autograd keeps for the
    backward: activations only (the weights of ``nets`` are resident anyway), each storage
    once (a tensor saved by two operations, or a view, counts once)."""
    total, keep = [0], []
    seen = {p.untyped_storage()._cdata for net in nets for p in net.parameters()}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            keep.append(storage)  # alive until the end, so that no address is reused
            total[0] += storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), total


def flops_one(config: str) -> dict[str, Any]:
    """FLOPs and saved-for-backward bytes per image at SD 1.5 (512) or SDXL (1024), on meta."""
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    sdxl = config == "sdxl"
    unet_cfg = SDXL_UNET if sdxl else SD15_UNET
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_cfg).eval().requires_grad_(False)
        vae = diffusers.AutoencoderKL(**SD_VAE).eval().requires_grad_(False)
        head = _clip_head(CLIP_L14, torch.device("meta"))
    size = int(unet_cfg["sample_size"])
    z = torch.zeros(1, 4, size, size, device="meta")
    width = 2048 if sdxl else 768
    emb = PromptEmbeds(
        torch.zeros(1, 77, width, device="meta"),
        torch.zeros(1, 1280, device="meta") if sdxl else None,
        torch.zeros(1, 6, device="meta") if sdxl else None,
    )
    model = SDEps(unet, emb, emb, 7.5)
    t = torch.full((1,), 500, device="meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(z, t)
    unet_flops = fc.get_total_flops()
    decoder = hd.LatentDecoder(vae)
    f = hd.DecodedClassifier(decoder, head)
    hook, saved = _saved_bytes(vae, head)
    with FlopCounterMode(display=False) as fc:
        x = z.clone().requires_grad_(True)
        with hook:
            logits = f(x)
        logits.backward(torch.ones_like(logits))
    guide_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        x = z.clone().requires_grad_(True)
        img = decoder(x)
        img.backward(torch.ones_like(img))
    dec_flops = fc.get_total_flops()  # the decoder's forward and backward

    def weights(m: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    return {
        "config": config,
        "image_size": size * 8,
        "gflops_cfg_step": unet_flops / 1e9,
        "gflops_guidance_pass": guide_flops / 1e9,
        "gflops_decoder_forward_backward": dec_flops / 1e9,
        "guided_over_unguided_step": (unet_flops + guide_flops) / unet_flops,
        "decoder_share_of_guidance": dec_flops / guide_flops,
        "saved_for_backward_gib_per_image_fp32": saved[0] / 2**30,
        "unet_weights_gib_fp32": weights(unet) / 2**30,
        "decoder_weights_gib_fp32": weights(vae.decoder) / 2**30,
        "saved_over_unet_weights": saved[0] / weights(unet),
    }


def report(res: dict[str, Any]) -> str:
    lines = [
        f"SD path, preset {res['preset']} ({res['image_size']}×{res['image_size']} images), "
        f"batch {res['batch']}, {res['steps']} steps, CFG 7.5, CLIP guide, {res['device']} "
        f"({res['device_name']}, {res['threads']} threads)",
        f"{'case':22s} {'best s':>8s} {'peak MiB':>9s}   ({res['clock']})",
    ]
    for c, sec in res["seconds_best"].items():
        lines.append(f"{c:22s} {sec:8.3f} {res['peak_bytes_median'][c] / 2**20:9.1f}")
    lines.append(f"{'sampler':10s} {'time ×unguided':>15s} {'mem ×unguided':>14s} "
                 f"{'mb time ×full':>14s} {'mb mem ×full':>13s}")  # fmt: skip
    for smp, r in res["per_sampler"].items():
        lines.append(
            f"{smp:10s} {r['guided_time_x_unguided']:15.2f} {r['guided_memory_x_unguided']:14.2f} "
            f"{r['microbatch_time_x_full']:14.2f} {r['microbatch_memory_x_full']:13.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--preset", choices=["tiny", "sd15"], default=None)
    p.add_argument("--batch", type=int, default=None, help="default 4 (tiny), 8 (sd15)")
    p.add_argument("--steps", type=int, default=None, help="default 4 (tiny), 10 (sd15)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--flops", action="store_true", help="count FLOPs and saved bytes instead")
    args = p.parse_args()
    if args.flops:
        res: dict[str, Any] = {c: flops_one(c) for c in ("sd15", "sdxl")}
        print(json.dumps(res, indent=2))
    else:
        res = run(args)
        print(report(res))
    if args.out is not None:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
