"""Kill-and-resume check: ``fguide sample`` and ``fguide finetune`` killed (SIGKILL) at random
moments, then rerun, give byte-identical results to an uninterrupted run.

    python bench/bench_resume.py [--kills 12] [--seed 0] [--out resume.json]

For each job: one uninterrupted reference run; then ``--kills`` trials, each a fresh folder in
which the same command is started, killed after a random delay drawn uniformly from [0, T]
(T the reference's wall time), started and killed again with probability one half, and finally
run to completion. The final ``samples.npz`` (sample) and ``model.pt`` plus ``report.json``'s
before/after figures (finetune) are compared with the reference. Tiny random models on CPU:
seconds per trial. Prints a table (kills, trials, differences) and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

FLAGS = (
    "image_size=8 num_channels=32 num_res_blocks=1 channel_mult=1,2 attention_resolutions=4 "
    "num_head_channels=32 class_cond=True learn_sigma=True"
)

MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def guide():
        g = torch.Generator().manual_seed(1)
        net = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.Softplus(), nn.Linear(32, 1000))
        for p in net.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        return net

    def clean4():
        g = torch.Generator().manual_seed(2)
        net = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.Softplus(), nn.Linear(16, 4))
        for p in net.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        return net
    """
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(work), env.get("PYTHONPATH", "")])
    return env


def _setup(work: Path) -> dict[str, Path]:
    from fguide.models.presets import create_model

    (work / "resume_mods.py").write_text(MODULE)
    torch.manual_seed(0)
    net = create_model(**dict(kv.split("=") for kv in FLAGS.split()))
    for p in net.parameters():  # ADM zero-initialises output layers: make every layer matter
        p.data.add_(0.05 * torch.randn_like(p))
    ckpt = work / "tiny.pt"
    torch.save(net.state_dict(), ckpt)
    rng = np.random.default_rng(0)
    data = work / "data.npz"
    np.savez(data, rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), np.arange(40) % 4)
    return {"ckpt": ckpt, "data": data}


def _sample_cmd(out: Path, files: dict[str, Path]) -> list[str]:
    return [
        sys.executable, "-m", "fguide.cli.main", "sample", "--out", str(out),
        "--model", str(files["ckpt"]), "--model-flags", FLAGS, "--classifier",
        "resume_mods:guide", "--method", "js", "--steps", "5", "--seed", "3",
        "--num-samples", "12", "--batch-size", "2", "--shard-size", "2", "--device", "cpu",
        "--no-progress",
    ]  # fmt: skip


def _finetune_cmd(out: Path, files: dict[str, Path]) -> list[str]:
    return [
        sys.executable, "-m", "fguide.cli.main", "finetune", "--classifier",
        "resume_mods:clean4", "--data", str(files["data"]), "--out", str(out),
        "--iterations", "12", "--batch-size", "4", "--holdout", "8", "--checkpoint-every", "1",
        "--log-every", "1", "--no-progress", "--workers", "0", "--device", "cpu",
    ]  # fmt: skip


def _result(job: str, out: Path) -> dict[str, Any]:
    if job == "sample":
        return {"samples.npz": _sha(out / "samples.npz")}
    report = json.loads((out / "report.json").read_text())
    return {
        "model.pt": _sha(out / "model.pt"),
        "before": report["before"]["ece"],
        "after": report["after"]["ece"],
        # every logged number but the wall-clock rate
        "log.jsonl": [
            {k: v for k, v in json.loads(line).items() if k != "steps_per_s"}
            for line in (out / "log.jsonl").read_text().splitlines()
        ],
    }


def _run(cmd: list[str], env: dict[str, str], kill_after: float | None) -> bool:
    """Run ``cmd``; SIGKILL it after ``kill_after`` seconds. True if it was killed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
    if proc.returncode != 0:
        assert proc.stderr is not None
        raise RuntimeError(f"{cmd[4]} failed: {proc.stderr.read().decode()[-2000:]}")
    return False


def check(job: str, work: Path, files: dict[str, Path], kills: int, rng: random.Random) -> dict:
    make = _sample_cmd if job == "sample" else _finetune_cmd
    env = _env(work)
    t0 = time.perf_counter()
    _run(make(work / f"{job}-ref", files), env, None)
    wall = time.perf_counter() - t0
    reference = _result(job, work / f"{job}-ref")
    killed = differences = 0
    for trial in range(kills):
        out = work / f"{job}-{trial}"
        killed += _run(make(out, files), env, rng.uniform(0.0, wall))
        if rng.random() < 0.5:
            killed += _run(make(out, files), env, rng.uniform(0.0, wall))
        _run(make(out, files), env, None)
        got = _result(job, out)
        if got != reference:
            differences += 1
            print(f"{job} trial {trial}: differs from the reference", file=sys.stderr)
    return {"job": job, "trials": kills, "kills": killed, "differences": differences, "wall": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kills", type=int, default=12, help="trials per job")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--jobs", default="sample,finetune")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args()
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = _setup(work)
        for job in args.jobs.split(","):
            rows.append(check(job, work, files, args.kills, rng))
    print(f"{'job':<10}{'trials':>8}{'kills':>8}{'differences':>13}{'ref wall s':>12}")
    for r in rows:
        print(
            f"{r['job']:<10}{r['trials']:>8}{r['kills']:>8}{r['differences']:>13}{r['wall']:>12.1f}"
        )
    if args.out:
        from fguide.io.files import atomic_write_json, provenance

        atomic_write_json(args.out, {"results": rows, "provenance": provenance()})
    return 1 if any(r["differences"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
