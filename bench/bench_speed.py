"""Speed of the sampling path, side by side in one run (issue 11).

Sections (``--only`` picks some), each timed in interleaved rounds (one call of every variant
per round, rotated order, after an untimed warm-up), reported as the best time and the
min / median over rounds of the within-round ratio (both variants saw the same machine load).
On CPU the ratios use the process CPU time (waiting for a core shared with other processes
does not count), on a GPU the synchronised wall time.

- ``unet``: fguide's ADM UNet forward (contiguous q, k, v into SDPA) against the same network
  and weights with the attention replaced by (a) the reference's einsum form
  (``QKVAttention[Legacy]``: q·k scaled by ch^-1/4 each, float32 softmax, einsum with v) and
  (b) fguide's previous path (SDPA on non-contiguous views). With ``--reference PATH`` (an
  EluCD or guided-diffusion checkout, skipped when absent) also the reference's own
  ``UNetModel`` loaded with the same state dict.
- ``guidance``: one batch of guided DDPM sampling through :func:`fguide.ddpm`: unguided, base
  (EluCD) and each regulariser (entropy, rkl, fkl, js, hellinger, tilted); ratios base /
  unguided and regulariser / base. With ``--reference`` an EluCD checkout, also the same batch
  sampled by EluCD's code (its ``p_sample_loop`` with the same weights, noise, labels and
  classifier; its ``design_cond_fn`` restated here), unguided and guided: fguide / EluCD for
  the guided step, and each one's guidance overhead.
- ``precision``: images/s and peak memory of the base-guided batch with the diffusion model
  under fp32, bf16, fp16 autocast (:func:`fguide.accel.with_precision`; the classifier at
  ``--classifier-precision``).
- ``memory``: peak memory of ``fguide.ddpm`` called with autograd on (as the README shows)
  against the same call under ``torch.no_grad()`` (target ≤ 1.1×).
- ``compile`` (``--compile``): ``torch.compile`` of the UNet, its compile time and speed-up.

Defaults: CPU: a reduced 64×64 UNet (64 channels), ResNet-50 (Softplus 3) on x̂0 at 64×64,
batch 2, 2 DDPM steps. GPU: the paper's setting, ``128x128_diffusion`` + ResNet-101 (random
weights), batch 64, 10 DDPM steps.

    OMP_NUM_THREADS=2 python bench/bench_speed.py [--only unet,guidance] [--out r.json]
        [--reference PATH_TO_ELUCD_CHECKOUT]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import inspect
import json
import math
import platform
import statistics
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _memory import heap_probe

import fguide
from fguide import defaults
from fguide.accel import compile_model, to_channels_last, with_precision
from fguide.denoisers import ADMModel
from fguide.models import adm
from fguide.models.presets import build_preset, create_model, model_defaults
from fguide.models.resnet import ImageClassifier, resnet
from fguide.runtime import resolve_device
from fguide.schedules import make_process

REDUCED_64 = dict(
    image_size=64,
    num_channels=64,
    num_res_blocks=1,
    attention_resolutions="32,16,8",
    num_head_channels=32,
    use_new_attention_order=True,
    class_cond=True,
    learn_sigma=True,
)
METHODS: dict[str, dict[str, Any]] = {
    "base": {},
    "entropy": {},
    "rkl": {},
    "fkl": {},
    "js": {},
    "hellinger": {},
    "tilted": {},
}
SECTIONS = ("unet", "guidance", "precision", "memory", "compile")


# -- attention variants ------------------------------------------------------------------------


def einsum_attention(qkv: torch.Tensor, num_heads: int, legacy: bool) -> torch.Tensor:
    """The reference's attention written with einsum (guided-diffusion ``QKVAttention`` /
    ``QKVAttentionLegacy``): q, k scaled by ch^-1/4 each, softmax in float32, then · v."""
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy:
        q, k, v = qkv.reshape(b * num_heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (z.reshape(b * num_heads, ch, length) for z in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)


def noncontiguous_sdpa(qkv: torch.Tensor, num_heads: int, legacy: bool) -> torch.Tensor:
    """fguide's attention before issue 11: SDPA on transposed (non-contiguous) views."""
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy:
        q, k, v = qkv.reshape(b, num_heads, 3 * ch, length).split(ch, dim=2)
    else:
        q, k, v = (z.reshape(b, num_heads, ch, length) for z in qkv.chunk(3, dim=1))
    out = F.scaled_dot_product_attention(
        q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), scale=1.0 / math.sqrt(ch)
    )
    return out.transpose(-1, -2).reshape(b, num_heads * ch, length)


@contextlib.contextmanager
def attention(fn: Callable[[torch.Tensor, int, bool], torch.Tensor] | None) -> Iterator[None]:
    """Run fguide's UNet with ``fn`` as its attention (None: fguide's own)."""
    original = adm.qkv_attention
    if fn is not None:
        adm.qkv_attention = fn  # type: ignore[assignment]
    try:
        yield
    finally:
        adm.qkv_attention = original


# -- timing and memory -------------------------------------------------------------------------


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated while ``fn()`` runs above the level at its start (CUDA allocator
    statistics; on CPU the glibc heap, polled every 0.5 ms); None when unmeasurable."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    probe = heap_probe()
    if probe is None:
        return None
    base = peak = probe()
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, probe())
            time.sleep(0.0005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    return max(peak, probe()) - base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    variants: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(best wall seconds, per-round cost seconds) of each variant, interleaved in rounds."""
    names = list(variants)
    for n in names:  # warm-up: allocations, kernel selection, lazy initialisation
        variants[n]()
    walls: dict[str, list[float]] = {n: [] for n in names}
    costs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            variants[n]()
            _sync(device)
            wall = time.perf_counter() - w0
            walls[n].append(wall)
            costs[n].append(wall if device.type == "cuda" else time.process_time() - c0)
    return {n: min(walls[n]) for n in names}, costs


def ratio(costs: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    """min and median over rounds of cost(a) / cost(b) within a round."""
    r = [x / y for x, y in zip(costs[a], costs[b], strict=True)]
    return {"min": min(r), "median": statistics.median(r)}


def overhead(costs: dict[str, list[float]], guided: str, unguided: str) -> float:
    """Median over rounds of cost(guided) − cost(unguided) within a round (seconds)."""
    return statistics.median(a - b for a, b in zip(costs[guided], costs[unguided], strict=True))


# -- models ------------------------------------------------------------------------------------


def build(args: argparse.Namespace, device: torch.device) -> tuple[Any, torch.nn.Module, int]:
    torch.manual_seed(0)
    net: torch.nn.Module = (
        create_model(**REDUCED_64) if args.unet == "reduced64" else build_preset(args.unet)
    )
    size = int(net.image_size)  # type: ignore[arg-type]
    with torch.no_grad():  # ADM zero-initialises its output layers: give them weights
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.02)
    net = net.to(device).eval().requires_grad_(False)
    clf = ImageClassifier(resnet(args.classifier, softplus_beta=3.0))
    clf = clf.to(device).eval().requires_grad_(False)
    return net, clf, size


def _guided_batch(
    net: torch.nn.Module,
    clf: Callable[..., torch.Tensor],
    size: int,
    args: argparse.Namespace,
    device: torch.device,
    method: str | None,
    model_precision: str = "fp32",
    channels_last: bool = False,
) -> Callable[[], torch.Tensor]:
    proc = make_process("linear", 1000, str(args.steps), "learned_range")
    labels = torch.arange(args.batch, device=device) % 1000
    noise = fguide.SampleNoise(0, range(args.batch))
    z = noise.initial((3, size, size), device=device)
    model = with_precision(ADMModel(net), model_precision)  # type: ignore[arg-type]
    if channels_last:
        model = to_channels_last(model)
    guide = None
    if method is not None:
        kw = dict(METHODS[method])
        if method == "tilted":
            kw["group_size"] = args.batch
        guide = fguide.ClassifierGuide(clf, fguide.objective(method, **kw), scale=1.0)

    def run() -> torch.Tensor:
        return fguide.ddpm(
            model,
            z,
            proc,
            labels=labels,
            guide=guide,
            noise=fguide.SampleNoise(0, range(args.batch)),
        )

    return run


# -- sections ----------------------------------------------------------------------------------


def section_unet(  # type: ignore[no-untyped-def]
    net: torch.nn.Module, size: int, reference: Any, args: argparse.Namespace, device: torch.device
):
    x = torch.randn(args.batch, 3, size, size, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def forward(fn: Callable[..., torch.Tensor] | None) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.no_grad(), attention(fn):
                return net(x, t, y)

        return call

    variants: dict[str, Callable[[], object]] = {
        "fguide": forward(None),
        "einsum": forward(einsum_attention),
        "noncontiguous_sdpa": forward(noncontiguous_sdpa),
    }
    with torch.no_grad():
        ref_out = forward(einsum_attention)()
        diff = float((forward(None)() - ref_out).abs().max())
    ref_net = _reference_unet(net, reference, args, device)
    if ref_net is not None:

        def call_reference() -> torch.Tensor:
            with torch.no_grad():
                return ref_net(x, t, y)

        variants["reference"] = call_reference
        with torch.no_grad():
            diff_ref = float((call_reference() - ref_out).abs().max())
    best, costs = interleaved(variants, device, args.repeats)
    out: dict[str, Any] = {
        "batch": args.batch,
        "seconds": best,
        "fguide_vs_einsum": ratio(costs, "fguide", "einsum"),
        "fguide_vs_noncontiguous_sdpa": ratio(costs, "fguide", "noncontiguous_sdpa"),
        "max_abs_diff_vs_einsum": diff,
    }
    if ref_net is not None:
        out["reference_checkout"] = reference.checkout
        out["fguide_vs_reference"] = ratio(costs, "fguide", "reference")
        out["max_abs_diff_reference_vs_einsum"] = diff_ref
    else:
        out["reference"] = "skipped (no --reference checkout)"
    return out


def load_reference(path: str | None) -> Any | None:
    """The ``guided_diffusion`` package of a reference checkout, imported under a private name
    (so two checkouts never clash in ``sys.modules``): an EluCD checkout (``PATH/DDPM``, its
    guided step with ``gamma_factor`` and ``cond_fn([x, x̂0], ...)``) or a guided-diffusion
    checkout (the UNet only). None, with a note on stderr, when absent."""
    if not path:
        return None
    root = Path(path)
    for pkg in (root / "DDPM" / "guided_diffusion", root / "guided_diffusion"):
        if (pkg / "script_util.py").is_file():
            break
    else:
        print(
            f"reference: no guided-diffusion or EluCD checkout at {root}: skipped",
            file=sys.stderr,
        )
        return None
    alias = "_bench_reference_guided_diffusion"
    spec = importlib.util.spec_from_file_location(
        alias, pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return types.SimpleNamespace(
        script_util=importlib.import_module(f"{alias}.script_util"),
        gaussian_diffusion=importlib.import_module(f"{alias}.gaussian_diffusion"),
        checkout=str(root),
    )


def is_elucd(reference: Any) -> bool:
    """Whether ``reference`` has EluCD's off-the-shelf guided ``p_sample``."""
    sig = inspect.signature(reference.gaussian_diffusion.GaussianDiffusion.p_sample)
    return "gamma_factor" in sig.parameters


def _reference_unet(
    net: torch.nn.Module, reference: Any, args: argparse.Namespace, device: torch.device
) -> torch.nn.Module | None:
    """The reference's ``UNetModel`` with fguide's weights."""
    if reference is None:
        return None
    ref_create_model = reference.script_util.create_model
    flags = (
        {**model_defaults(), **REDUCED_64}
        if args.unet == "reduced64"
        else dict(build_preset_flags(args.unet))
    )
    kw = {k: v for k, v in flags.items() if k in ref_create_model.__code__.co_varnames}
    kw["use_fp16"] = False  # fguide's network is float32 here too (fp16 torso: convert_to_fp16)
    ref = ref_create_model(**kw)
    ref.load_state_dict(net.state_dict())
    return ref.to(device).eval().requires_grad_(False)


def _reference_guided_batch(
    ref_net: torch.nn.Module,
    clf: ImageClassifier,
    size: int,
    reference: Any,
    args: argparse.Namespace,
    device: torch.device,
    guided: bool,
) -> Callable[[], torch.Tensor]:
    """The batch of ``_guided_batch`` sampled by EluCD's own code: ``p_sample_loop`` of its
    respaced diffusion with its ``design_cond_fn`` (scripts/classifier_sample.py) restated here:
    the gradient of log(exp(τ1 l_y) / Σ_k exp(τ2 l_k)) at the (clipped) x̂0, times the scale."""
    diffusion = reference.script_util.create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="linear", timestep_respacing=str(args.steps)
    )
    labels = torch.arange(args.batch, device=device) % 1000
    z = fguide.SampleNoise(0, range(args.batch)).initial((3, size, size), device=device)
    tau1 = defaults.TAU1
    tau2 = defaults.tau2("base", "ddpm", tau1)
    resnet = clf.net  # fguide's input mode "elucd": the network sees x̂0 unchanged

    def cond_fn(inputs: list[torch.Tensor], t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x0 = inputs[1].detach().requires_grad_(True)
            logits = resnet(x0)
            numerator = torch.exp(logits * tau1)[range(len(logits)), y.view(-1)].unsqueeze(1)
            denominator = torch.exp(logits * tau2).sum(1, keepdim=True)
            selected = torch.log(numerator / denominator)
            return torch.autograd.grad(selected.sum(), x0)[0] * 1.0

    def run() -> torch.Tensor:
        out: torch.Tensor = diffusion.p_sample_loop(
            ref_net,
            (args.batch, 3, size, size),
            gamma_factor=defaults.SINE_FACTOR if guided else 0.0,
            noise=z,
            clip_denoised=True,
            model_kwargs={"y": labels},
            cond_fn=cond_fn if guided else None,
            device=device,
        )
        return out

    return run


def build_preset_flags(name: str) -> dict[str, Any]:
    from fguide.models.presets import PRESETS

    return dict(PRESETS[name].flags)


def section_guidance(net, clf, size, reference, args, device):  # type: ignore[no-untyped-def]
    variants: dict[str, Callable[[], object]] = {
        "unguided": _guided_batch(net, clf, size, args, device, None)
    }
    for m in METHODS:
        variants[m] = _guided_batch(net, clf, size, args, device, m)
    # EluCD's respaced diffusion cannot be built with a single step (its posterior variance
    # indexes step 1), so the comparison needs two or more.
    elucd = reference is not None and is_elucd(reference) and args.steps >= 2
    if elucd:
        ref_net = _reference_unet(net, reference, args, device)
        for name, guided in (("elucd_unguided", False), ("elucd_base", True)):
            variants[name] = _reference_guided_batch(
                ref_net, clf, size, reference, args, device, guided
            )
    best, costs = interleaved(variants, device, args.repeats)
    out: dict[str, Any] = {
        "batch": args.batch,
        "steps": args.steps,
        "images_per_s": {n: args.batch / s for n, s in best.items()},
        "base_vs_unguided": ratio(costs, "base", "unguided"),
        "regulariser_vs_base": {m: ratio(costs, m, "base") for m in METHODS if m != "base"},
    }
    if elucd:
        out["reference_checkout"] = reference.checkout
        out["elucd_base_vs_elucd_unguided"] = ratio(costs, "elucd_base", "elucd_unguided")
        out["base_vs_elucd_base"] = ratio(costs, "base", "elucd_base")
        out["unguided_vs_elucd_unguided"] = ratio(costs, "unguided", "elucd_unguided")
        # The relative overheads have different denominators (fguide's unguided step is the
        # cheaper one), so compare the guidance's own cost too: guided − unguided per batch.
        fg = overhead(costs, "base", "unguided")
        el = overhead(costs, "elucd_base", "elucd_unguided")
        out["guidance_seconds_per_batch"] = {"fguide": fg, "elucd": el}
        out["guidance_seconds_fguide_vs_elucd"] = fg / el if el > 0 else None
    else:
        out["reference"] = "skipped (needs --reference an EluCD checkout and --steps >= 2)"
    return out


def section_precision(net, clf, size, args, device):  # type: ignore[no-untyped-def]
    classifier = with_precision(clf, args.classifier_precision)
    variants = {
        p: _guided_batch(net, classifier, size, args, device, "base", p) for p in args.precisions
    }
    if args.channels_last:  # NHWC copies of both networks (the originals stay NCHW)
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        clf_cl = to_channels_last(with_precision(copy.deepcopy(clf), args.classifier_precision))
        for p in args.precisions:
            fn = _guided_batch(net_cl, clf_cl, size, args, device, "base", p, channels_last=True)
            variants[f"{p}+channels_last"] = fn
    best, costs = interleaved(variants, device, args.repeats)
    return {
        "classifier_precision": args.classifier_precision,
        "images_per_s": {p: args.batch / s for p, s in best.items()},
        "peak_memory_bytes": {p: peak_memory(fn, device) for p, fn in variants.items()},
        "vs_fp32": {p: ratio(costs, p, "fp32") for p in variants if "fp32" in variants},
    }


class _GraphKeeping(torch.nn.Module):
    """The network called with autograd forced on: the samplers' behaviour before issue 11
    (each step's graph kept alive through the state)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.num_classes = getattr(net, "num_classes", None)

    def forward(self, *args: Any) -> torch.Tensor:
        with torch.enable_grad():
            out: torch.Tensor = self.net(*args)
            return out


def section_memory(net, clf, size, args, device):  # type: ignore[no-untyped-def]
    # Trainable parameters, as a user who did not freeze the model has them.
    net.requires_grad_(True)
    try:
        run = _guided_batch(net, clf, size, args, device, "base")
        old = _guided_batch(_GraphKeeping(net), clf, size, args, device, "base")
        run()  # warm-up

        def no_grad() -> None:
            with torch.no_grad():
                run()

        with_grad = peak_memory(run, device)
        under = peak_memory(no_grad, device)
        kept = peak_memory(old, device)
    finally:
        net.requires_grad_(False)
    return {
        "peak_bytes_grad_enabled": with_grad,
        "peak_bytes_no_grad": under,
        "peak_bytes_graph_kept": kept,
        "ratio": (with_grad / under) if with_grad and under else None,
        "ratio_graph_kept": (kept / under) if kept and under else None,
        "target": 1.1,
    }


def section_compile(net, clf, size, args, device):  # type: ignore[no-untyped-def]
    x = torch.randn(args.batch, 3, size, size, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    compiled = compile_model(net, example=(x, t, y))

    def eager() -> None:
        with torch.no_grad():
            net(x, t, y)

    def comp() -> None:
        with torch.no_grad():
            compiled(x, t, y)

    best, costs = interleaved({"eager": eager, "compiled": comp}, device, args.repeats)
    return {
        "compile_seconds": compiled.compile_seconds,
        "seconds": best,
        "compiled_vs_eager": ratio(costs, "compiled", "eager"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    gpu = torch.cuda.is_available()
    ap.add_argument(
        "--unet",
        default="128x128_diffusion" if gpu else "reduced64",
        help="reduced64 or an ADM preset name (64x64_diffusion, 128x128_diffusion, ...)",
    )
    ap.add_argument("--classifier", default="resnet101" if gpu else "resnet50")
    ap.add_argument("--batch", type=int, default=64 if gpu else 2)
    ap.add_argument("--steps", type=int, default=10 if gpu else 2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="unet,guidance,precision,memory")
    ap.add_argument("--precisions", default="fp32,bf16,fp16" if gpu else "fp32,bf16")
    ap.add_argument("--classifier-precision", default="fp32")
    ap.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=gpu,
        help="precision section: also NHWC copies of the networks (default on a GPU)",
    )
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the UNet")
    ap.add_argument(
        "--reference",
        default=None,
        help="an EluCD checkout (UNet forward and guided DDPM sampling compared) or a "
        "guided-diffusion checkout (UNet forward only); skipped when absent",
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    args.precisions = args.precisions.split(",")
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sections = [s for s in args.only.split(",") if s]
    if args.compile and "compile" not in sections:
        sections.append("compile")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"--only: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    net, clf, size = build(args, device)
    reference = load_reference(args.reference)
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "unet": args.unet,
        "classifier": args.classifier,
        "ratio_clock": "synchronised wall time" if device.type == "cuda" else "process CPU time",
    }
    fns = {
        "unet": lambda: section_unet(net, size, reference, args, device),
        "guidance": lambda: section_guidance(net, clf, size, reference, args, device),
        "precision": lambda: section_precision(net, clf, size, args, device),
        "memory": lambda: section_memory(net, clf, size, args, device),
        "compile": lambda: section_compile(net, clf, size, args, device),
    }
    for s in sections:
        t0 = time.perf_counter()
        res[s] = fns[s]()
        res[s]["section_seconds"] = time.perf_counter() - t0
        print(report_section(s, res[s]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


def _r(d: dict[str, float]) -> str:
    return f"{d['min']:.3f} / {d['median']:.3f}"


def report_section(name: str, r: dict[str, Any]) -> str:
    lines = [f"== {name}"]
    if name == "unet":
        lines.append(
            f"forward seconds (best): {', '.join(f'{k} {v:.4f}' for k, v in r['seconds'].items())}"
        )
        lines.append(f"fguide / einsum attention (min / median): {_r(r['fguide_vs_einsum'])}")
        lines.append(f"fguide / non-contiguous SDPA: {_r(r['fguide_vs_noncontiguous_sdpa'])}")
        lines.append(f"max |fguide - einsum| = {r['max_abs_diff_vs_einsum']:.2e}")
        if "fguide_vs_reference" in r:
            lines.append(
                f"fguide / guided-diffusion: {_r(r['fguide_vs_reference'])} "
                f"(max |reference - einsum| = {r['max_abs_diff_reference_vs_einsum']:.2e})"
            )
    elif name == "guidance":
        lines.append("images/s: " + ", ".join(f"{k} {v:.3f}" for k, v in r["images_per_s"].items()))
        lines.append(f"base / unguided: {_r(r['base_vs_unguided'])}")
        for m, v in r["regulariser_vs_base"].items():
            lines.append(f"{m} / base: {_r(v)}")
        if "base_vs_elucd_base" in r:
            lines.append(f"EluCD guided / EluCD unguided: {_r(r['elucd_base_vs_elucd_unguided'])}")
            lines.append(f"fguide unguided / EluCD unguided: {_r(r['unguided_vs_elucd_unguided'])}")
            lines.append(f"fguide base / EluCD base (guided step): {_r(r['base_vs_elucd_base'])}")
            g = r["guidance_seconds_per_batch"]
            rel = r["guidance_seconds_fguide_vs_elucd"]
            lines.append(
                f"guidance's own cost per batch (guided - unguided, median): fguide "
                f"{g['fguide']:.4f} s, EluCD {g['elucd']:.4f} s"
                + (f", ratio {rel:.3f}" if rel is not None else "")
            )
    elif name == "precision":
        for p, v in r["images_per_s"].items():
            mem = r["peak_memory_bytes"][p]
            mem_s = f"{mem / 2**20:.1f} MiB" if mem is not None else "n/a"
            lines.append(f"{p}: {v:.3f} images/s, peak {mem_s}, vs fp32 {_r(r['vs_fp32'][p])}")
    elif name == "memory":
        g, n = r["peak_bytes_grad_enabled"], r["peak_bytes_no_grad"]
        if g is not None and n is not None:
            lines.append(
                f"ddpm with grad enabled: {g / 2**20:.1f} MiB; under no_grad: {n / 2**20:.1f} MiB; "
                f"ratio {r['ratio']:.3f} (target <= 1.1)"
            )
        if r["ratio_graph_kept"] is not None:
            lines.append(
                f"pre-issue-11 behaviour (graph kept): {r['peak_bytes_graph_kept'] / 2**20:.1f} "
                f"MiB, ratio {r['ratio_graph_kept']:.2f}"
            )
    elif name == "compile":
        lines.append(
            f"compile seconds {r['compile_seconds']:.1f}; "
            f"compiled / eager {_r(r['compiled_vs_eager'])}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
