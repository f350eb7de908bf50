"""Benchmark the DiT path: CFG sampling unguided vs latent classifier guidance through the VAE.

Side by side in one run (round-robin, ``--repeats`` rounds, rotated order, each case run twice
in a row and the second timed), on randomly initialised networks built from configs:

- ``cfg``: DiT with classifier-free guidance (s = 1.5), unguided, then the final decode;
- ``alg3``: EluCD Algorithm 3 (:class:`fguide.models.latent_guidance.CFGClassifierGuidance`),
  the whole batch in one decoder + classifier backward;
- ``alg3-mb``: the same with ``guidance_microbatch`` = batch/4 (bounded decoder-backward
  memory);
- ``mean``: EluCD's DDPM mean shift with the decoded classifier's gradient.

Presets: ``small`` (CPU default): a DiT of 4 blocks (64 wide, patch 2) on 16×16×4 latents, a
VAE with 3 levels (64×64 images), ResNet-18 (Softplus 3); batch 8, 3 steps, one thread.
``256`` (the GPU default): DiT-XL/2's and SD-VAE's configurations (256×256 images, 32×32×4
latents), ResNet-101 (Softplus 3); batch 16, 5 steps. Peak memory: the CPU heap in use
(glibc ``mallinfo2``, polled) or ``torch.cuda.max_memory_allocated``, above the level at the
start of the case. Ratios: time and peak memory of each case over ``cfg`` (medians over rounds
of within-round ratios), and ``alg3-mb`` over ``alg3``.

    python bench/bench_dit.py [--preset small|256] [--batch 8] [--steps 3] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _memory import heap_probe
from torch import Tensor

import fguide
from fguide.models import hf_diffusers as hd
from fguide.models import latent_guidance as lg
from fguide.models.resnet import resnet

CASES = ("cfg", "alg3", "alg3-mb", "mean")


class _Peak:
    """Peak memory above the start while the context runs (CUDA allocator or polled heap)."""

    def __init__(self, device: torch.device, probe: Callable[[], int] | None) -> None:
        self.device, self.probe = device, probe
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        assert self.probe is not None
        while not self._stop.is_set():
            self.peak = max(self.peak, self.probe())
            time.sleep(0.0005)

    def __enter__(self) -> _Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.probe is not None:
            self.base = self.peak = self.probe()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            assert self.probe is not None
            self.peak = max(self.peak, self.probe())

    @property
    def bytes(self) -> int:
        return self.peak - self.base


def _networks(preset: str) -> tuple[Any, Any, torch.nn.Module]:
    import diffusers

    torch.manual_seed(0)
    if preset == "small":
        dit = diffusers.DiTTransformer2DModel(
            num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
            num_layers=4, sample_size=16, patch_size=2, num_embeds_ada_norm=1000,
        )  # fmt: skip
        vae = diffusers.AutoencoderKL(
            latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=32, sample_size=64,
        )  # fmt: skip
        clf = resnet("resnet18", softplus_beta=3.0)
    else:  # DiT-XL/2 (facebook/DiT-XL-2-256) and the SD VAE (stabilityai/sd-vae-ft-ema)
        dit = diffusers.DiTTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
            num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
        )  # fmt: skip
        vae = diffusers.AutoencoderKL(
            latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=256,
        )  # fmt: skip
        clf = resnet("resnet101", softplus_beta=3.0)
    return dit, vae, clf


def _model(preset: str, device: torch.device) -> tuple[hd.PipelineModel, torch.nn.Module]:
    dit, vae, clf = _networks(preset)
    dit = dit.to(device).eval().requires_grad_(False)
    vae = vae.to(device).eval().requires_grad_(False)
    clf = clf.to(device).eval().requires_grad_(False)
    size = int(dit.config.sample_size)
    pm = hd.PipelineModel(
        kind="dit",
        net=dit,
        betas=fguide.betas_for("linear", 1000),
        state_shape=(4, size, size),
        image_size=size * 2 ** (len(vae.config.block_out_channels) - 1),
        variance_type="learned_range",
        clip_denoised=False,
        num_classes=1000,
        decoder=hd.LatentDecoder(vae),
        null_class=1000,
    )
    return pm, clf


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    preset = args.preset or ("256" if device.type == "cuda" else "small")
    batch = args.batch or (16 if preset == "256" else 8)
    steps = args.steps or (5 if preset == "256" else 3)
    pm, clf = _model(preset, device)
    obj = fguide.objective("base")
    common: dict[str, Any] = dict(respacing=str(steps), cfg_scale=1.5)
    guided: dict[str, Any] = dict(common, classifier=clf, objective=obj)
    setups = {
        "cfg": lg.build_pipeline_sampling(pm, **common),
        "alg3": lg.build_pipeline_sampling(pm, **guided, scale=0.1),
        "alg3-mb": lg.build_pipeline_sampling(
            pm, **guided, scale=0.1, microbatch=max(1, batch // 4)
        ),
        "mean": lg.build_pipeline_sampling(pm, **guided, scale=1.0, guidance="mean"),
    }
    noise = fguide.SampleNoise(0, range(batch))
    z = noise.initial(pm.state_shape, device=device)
    y = torch.arange(batch, device=device) % 1000
    probe = heap_probe()

    def once(case: str) -> tuple[float, int]:
        s = setups[case]
        with _Peak(device, probe) as peak:
            t0 = time.perf_counter()
            with torch.no_grad():
                x = fguide.ddpm(
                    s.model,
                    z,
                    s.process,
                    labels=y,
                    guide=s.guide,
                    noise=fguide.SampleNoise(0, range(batch)),
                    clip_denoised=False,
                )
                img: Tensor = s.to_image(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
        assert torch.isfinite(img).all()
        return dt, peak.bytes

    times: dict[str, list[float]] = {c: [] for c in CASES}
    mems: dict[str, list[int]] = {c: [] for c in CASES}
    for r in range(args.repeats):
        order = CASES[r % len(CASES) :] + CASES[: r % len(CASES)]
        for case in order:
            once(case)  # warm: the second run of a pair is timed
            dt, mem = once(case)
            times[case].append(dt)
            mems[case].append(mem)

    def ratio(a: str, b: str, data: dict[str, list[Any]]) -> float:
        return statistics.median(x / max(y, 1e-12) for x, y in zip(data[a], data[b], strict=True))

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor(),
        "preset": preset,
        "batch": batch,
        "steps": steps,
        "threads": args.threads,
        "image_size": pm.image_size,
        "seconds_best": {c: min(v) for c, v in times.items()},
        "peak_bytes_median": {c: int(np.median(v)) for c, v in mems.items()},
        "time_ratio_vs_cfg": {c: ratio(c, "cfg", times) for c in CASES if c != "cfg"},
        "memory_ratio_vs_cfg": {c: ratio(c, "cfg", mems) for c in CASES if c != "cfg"},
        "microbatch_vs_full": {
            "time": ratio("alg3-mb", "alg3", times),
            "memory": ratio("alg3-mb", "alg3", mems),
        },
        "torch": torch.__version__,
    }


def flops(args: argparse.Namespace) -> dict[str, Any]:
    """FLOPs of one sampling step per image (torch's FlopCounterMode, batch 1): the CFG network
    call (2 DiT forwards) and the guidance pass (decoder + classifier forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    preset = args.preset or "small"
    pm, clf = _model(preset, torch.device("cpu"))
    z = torch.randn(1, *pm.state_shape)
    t, y = torch.tensor([500]), torch.tensor([1])
    model = pm.eps_model(1.5)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(z, t, y)
    cfg = fc.get_total_flops()
    f = pm.guidance_classifier(clf)
    # (forward, then backward into the input; FlopCounterMode cannot watch autograd.grad)
    with FlopCounterMode(display=False) as fc:
        x = z.clone().requires_grad_(True)
        logits = f(x)
        logits.backward(fguide.objective("base").coefficients(logits.detach(), y))
    guide = fc.get_total_flops()
    assert pm.decoder is not None
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        pm.decoder(z)
    dec = fc.get_total_flops()
    return {
        "preset": preset,
        "image_size": pm.image_size,
        "gflops_cfg_step": cfg / 1e9,
        "gflops_guidance_pass": guide / 1e9,
        "gflops_decoder_forward": dec / 1e9,
        "guided_over_unguided_step": (cfg + guide) / cfg,
    }


def report(res: dict[str, Any]) -> str:
    lines = [
        f"DiT path, preset {res['preset']} ({res['image_size']}×{res['image_size']} images), "
        f"batch {res['batch']}, {res['steps']} DDPM steps, {res['device']} "
        f"({res['device_name']}, {res['threads']} threads)",
        f"{'case':10s} {'best s':>8s} {'peak MiB':>9s} {'time ×cfg':>10s} {'mem ×cfg':>9s}",
    ]
    for c in CASES:
        tr = res["time_ratio_vs_cfg"].get(c, 1.0)
        mr = res["memory_ratio_vs_cfg"].get(c, 1.0)
        lines.append(
            f"{c:10s} {res['seconds_best'][c]:8.3f} {res['peak_bytes_median'][c] / 2**20:9.1f} "
            f"{tr:10.2f} {mr:9.2f}"
        )
    mb = res["microbatch_vs_full"]
    lines.append(
        f"micro-batch (batch/4) vs full: time ×{mb['time']:.2f}, memory ×{mb['memory']:.2f}"
    )
    return "\n".join(lines)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--preset", choices=["small", "256"], default=None)
    p.add_argument("--batch", type=int, default=None, help="default 8 (small), 16 (256)")
    p.add_argument("--steps", type=int, default=None, help="default 3 (small), 5 (256)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    p.add_argument("--flops", action="store_true", help="count FLOPs of one step instead")
    args = p.parse_args()
    if args.flops:
        res = flops(args)
        print(json.dumps(res, indent=2))
    else:
        res = run(args)
        print(report(res))
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
