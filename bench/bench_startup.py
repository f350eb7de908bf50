"""Start-up cost of a guided ``fguide sample`` process against a bare loop, side by side.

Two processes, each started afresh per round, on the same tiny files (an ADM UNet, 8×8, 32
channels, class-conditional; a ResNet-18 weight file, random weights; batch 4, 10 DDPM steps,
base guidance on x̂0 with Softplus 3):

- ``sample``: ``python -m fguide.cli.main sample ...`` (through a wrapper that also reports
  which heavy optional modules the process imported: torch._dynamo, sympy, scipy, ...);
- ``bare``: a script that imports torch and nothing of fguide but the two network files
  (``models/adm.py`` and ``models/resnet.py``, loaded by path: they import only torch), loads
  the same state dicts and runs the same guided DDPM loop by hand, as EluCD's script does
  (one UNet forward, one classifier forward and backward per step), writing nothing.

With ``--other-src PATH`` (another checkout's ``src``, e.g. before a change) a third process,
``other``, runs the same ``sample`` command with that code.

Interleaved rounds (order rotated), after one untimed warm-up of each; per round the ratios
to ``bare`` of wall time, CPU time (user + system of the child: waiting for a core does not
count) and peak RSS (``ru_maxrss`` of the child). Prints min / median over rounds, and the
ratio of each process's best (least disturbed) value to the bare loop's best.

    OMP_NUM_THREADS=2 python bench/bench_startup.py [--rounds 5] [--other-src ../main/src]
        [--out startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
FLAGS = (
    "image_size=8 num_channels=32 num_res_blocks=1 channel_mult=1,2 attention_resolutions=4 "
    "num_head_channels=32 class_cond=True learn_sigma=True"
)
HEAVY = ("torch._dynamo", "sympy", "scipy", "torch._inductor", "matplotlib", "transformers")

# Runs fguide's CLI, then says which heavy modules the process imported (stdout, last line).
SAMPLE_WRAPPER = textwrap.dedent(
    """
    import json, sys
    from fguide.cli.main import main
    rc = main(sys.argv[1:])
    print(json.dumps({"rc": rc, "heavy": [m for m in HEAVY if m in sys.modules]}))
    """
).replace("HEAVY", repr(HEAVY))

# EluCD-style bare loop: torch, the two network files, a guided DDPM loop written out.
BARE = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch

    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    src, work, steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    adm = load("adm", f"{src}/fguide/models/adm.py")
    rn = load("resnet", f"{src}/fguide/models/resnet.py")
    kwargs = json.load(open(f"{work}/unet_kwargs.json"))
    unet = adm.UNetModel(**kwargs)
    unet.load_state_dict(torch.load(f"{work}/unet.pt", weights_only=True))
    unet.eval().requires_grad_(False)
    clf = rn.resnet("resnet18", 1000, softplus_beta=3.0)
    clf.load_state_dict(torch.load(f"{work}/resnet18.pt", weights_only=True))
    clf.eval().requires_grad_(False)

    # linear betas, T = 1000, evenly respaced to `steps` (ADM's space_timesteps for one section)
    T = 1000
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar_full = torch.cumprod(1 - betas, 0)
    keep = sorted({round(i * (T - 1) / (steps - 1)) for i in range(steps)})
    abar = abar_full[keep]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta = 1 - abar / abar_prev
    post_var = beta * (1 - abar_prev) / (1 - abar)
    log_var_lo = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    log_var_hi = torch.log(beta)
    c1 = beta * abar_prev.sqrt() / (1 - abar)
    c2 = (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar)
    size = kwargs["image_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    with torch.no_grad():
        for i in reversed(range(len(keep))):
            t = torch.full((batch,), keep[i])
            out = unet(x, t, y)
            eps, v = out[:, :3], out[:, 3:]
            frac = (v + 1) / 2
            log_var = frac * log_var_hi[i] + (1 - frac) * log_var_lo[i]
            x0 = ((x - (1 - abar[i]).sqrt() * eps) / abar[i].sqrt()).clamp(-1, 1)
            mean = c1[i] * x0 + c2[i] * x
            with torch.enable_grad():
                x_in = x0.detach().requires_grad_(True)
                logp = torch.log_softmax(clf(x_in), -1)
                score = logp[torch.arange(batch), y].sum()
                (grad,) = torch.autograd.grad(score, x_in)
            mean = mean + torch.exp(log_var) * grad
            noise = torch.randn(x.shape, generator=g) if i > 0 else 0.0
            x = (mean + torch.exp(0.5 * log_var) * noise).float()
    print(json.dumps({"rc": 0, "heavy": [m for m in HEAVY if m in sys.modules]}))
    """
).replace("HEAVY", repr(HEAVY))


def _setup(work: Path) -> None:
    sys.path.insert(0, str(SRC))
    from fguide.models.presets import create_model, model_constructor_kwargs
    from fguide.models.resnet import resnet

    flags = dict(kv.split("=") for kv in FLAGS.split())
    torch.manual_seed(0)
    torch.save(create_model(**flags).state_dict(), work / "unet.pt")
    (work / "unet_kwargs.json").write_text(json.dumps(model_constructor_kwargs(**flags)))
    torch.save(resnet("resnet18", 1000).state_dict(), work / "resnet18.pt")
    (work / "sample_wrapper.py").write_text(SAMPLE_WRAPPER)
    (work / "bare.py").write_text(BARE)


def _commands(work: Path, steps: int, batch: int, other: Path | None) -> dict[str, list[str]]:
    sample = [
        sys.executable, str(work / "sample_wrapper.py"), "sample",
        "--out", str(work / "run"), "--model", str(work / "unet.pt"), "--model-flags", FLAGS,
        "--classifier", "resnet18", "--classifier-weights", str(work / "resnet18.pt"),
        "--steps", str(steps), "--num-samples", str(batch), "--batch-size", str(batch),
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    bare = [sys.executable, str(work / "bare.py"), str(SRC), str(work), str(steps), str(batch)]
    cmds = {"sample": sample, "bare": bare}
    if other is not None:  # the same command, run with the other checkout's code
        cmds["other"] = ["env", f"PYTHONPATH={other}", *sample]
    return cmds


def _run(cmd: list[str], work: Path) -> dict[str, Any]:
    """Wall time, CPU time and peak RSS of one child process, and its report."""
    shutil.rmtree(work / "run", ignore_errors=True)  # every sample process starts a new run
    env = dict(os.environ, PYTHONPATH=str(SRC))
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read() if proc.stdout else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed with exit code {proc.returncode}")
    report = json.loads(out.strip().splitlines()[-1])
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_mib": usage.ru_maxrss / 1024,  # kilobytes on Linux
        "heavy": report["heavy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--other-src", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fguide-startup-"))
    try:
        _setup(work)
        cmds = _commands(work, args.steps, args.batch, args.other_src)
        for name in cmds:  # warm-up: file caches, bytecode
            _run(cmds[name], work)
        rounds: list[dict[str, dict[str, Any]]] = []
        names = list(cmds)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            rounds.append({name: _run(cmds[name], work) for name in order})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {}
    # Per-round ratios (both saw the same load) and the ratio of the best values (the least
    # disturbed run of each: on a shared machine the load can change within a round).
    print(f"{'ratio to bare':<22}{'min':>8}{'median':>8}{'of bests':>10}{'best':>10}{'bare':>8}")
    for name in (n for n in names if n != "bare"):
        for key in ("wall_s", "cpu_s", "max_rss_mib"):
            ratios = [rd[name][key] / rd["bare"][key] for rd in rounds]
            best = min(rd[name][key] for rd in rounds)
            best_bare = min(rd["bare"][key] for rd in rounds)
            summary[f"{name}/{key}"] = {
                "min": min(ratios),
                "median": statistics.median(ratios),
                "of_bests": best / best_bare,
            }
            print(
                f"{name + ' ' + key:<22}{min(ratios):>8.3f}{statistics.median(ratios):>8.3f}"
                f"{best / best_bare:>10.3f}{best:>10.2f}{best_bare:>8.2f}"
            )
    for name in names:
        print(f"{name}: heavy modules imported: {rounds[-1][name]['heavy'] or 'none'}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "machine": platform.processor() or platform.machine(),
                    "torch": torch.__version__,
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "rounds": rounds,
                    "summary": summary,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
