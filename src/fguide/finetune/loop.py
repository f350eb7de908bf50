"""The training loop of ``fguide finetune``: the optimizer step, logging, interrupts.

:class:`Trainer` holds the mutable training state (what a checkpoint holds: model, optimizer,
grad scaler, step, the batches since the last log line) and does one AdamW step on
CE + λ·L_cal (:func:`fguide.finetune.steps.accumulate_gradients`). Step k's random draws come
from (seed, k) alone: (t, ε) from (seed, ``FINETUNE_NOISE``, k), torch's global generator
(dropout) from (seed, ``FINETUNE_STEP``, k). :func:`train_loop` runs steps until the target
or a SIGINT/SIGTERM (:class:`Interrupt`), saving checkpoints and writing ``log.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from fguide import rng as streams
from fguide.finetune.config import FinetuneConfig
from fguide.finetune.data import TrainLoader
from fguide.finetune.steps import BatchStats, accumulate_gradients
from fguide.io.files import atomic_write
from fguide.metrics.calibration import reliability_diagram

__all__ = ["Interrupt", "Trainer", "rng_fork", "set_train_mode", "train_loop", "trim_log"]


class Interrupt:
    """SIGINT/SIGTERM set a flag that the loop reads after each step (a second one raises)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():  # signal() needs it
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def set_train_mode(module: nn.Module, bn: str) -> None:
    module.train()
    if bn == "frozen":
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def trim_log(path: Path, step: int) -> None:
    """Keep the log lines of steps ≤ ``step`` (those after the checkpoint are redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
    atomic_write(path, lambda f: f.write("".join(s + "\n" for s in kept).encode()))


@contextlib.contextmanager
def rng_fork(device: torch.device) -> Iterator[None]:
    """Leave the caller's global torch RNG as it was (the loop reseeds it every step)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@dataclass
class Trainer:
    """The mutable training state (what a checkpoint holds) and one optimizer step."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: FinetuneConfig
    make_inputs: Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor | None]]
    device: torch.device
    step: int = 0
    # Batches since the last log line: kept in checkpoints so that a resumed run logs the
    # same windows as an uninterrupted one.
    window: list[BatchStats] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "window": [
                {
                    "loss": s.loss,
                    "ce": s.ce,
                    "calibration": s.calibration,
                    "logits": s.logits,
                    "labels": s.labels,
                }
                for s in self.window
            ],
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.window = [
            BatchStats(w["loss"], w["ce"], w["calibration"], w["logits"], w["labels"])
            for w in state["window"]
        ]

    def lr(self) -> float:
        c = self.config
        return c.lr * (1 - self.step / c.iterations) if c.anneal_lr else c.lr

    def train_step(self, x0: Tensor, y: Tensor, gen: torch.Generator) -> BatchStats:
        """One AdamW step on CE + λ·sECE of the batch (x0, y); every draw from (seed, step)."""
        c, lr = self.config, self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        gen.manual_seed(streams.mix(c.seed, streams.FINETUNE_NOISE, self.step))  # t and ε
        torch.manual_seed(streams.mix(c.seed, streams.FINETUNE_STEP, self.step))  # dropout &c.
        x_in, t = self.make_inputs(x0, y, gen)
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler if self.scaler.is_enabled() else None
        stats = accumulate_gradients(
            self.module,
            x_in,
            t,
            y,
            ece_weight=c.ece_weight,
            beta=c.beta,
            calibration_loss=c.calibration_loss,
            microbatch=c.microbatch,
            precision=c.precision,
            scaler=scaler,
        )
        if not math.isfinite(stats.loss):
            raise FloatingPointError(f"non-finite loss at step {self.step} ({stats.loss})")
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        self.window.append(stats)
        return stats

    def flush_window(self, lr: float) -> dict[str, float]:
        """Log line of the batches since the last one: mean CE / sECE, pooled ECE and accuracy."""
        w, self.window = self.window, []
        logits, labels = torch.cat([s.logits for s in w]), torch.cat([s.labels for s in w])
        return {
            "step": self.step,
            "lr": lr,
            "loss": float(np.mean([s.loss for s in w])),
            "ce": float(np.mean([s.ce for s in w])),
            self.config.calibration_loss: float(np.mean([s.calibration for s in w])),
            "ece": reliability_diagram(logits, labels, self.config.n_bins, kind="logits").ece,
            "accuracy": float((logits.argmax(1) == labels).double().mean()),
        }


def train_loop(
    trainer: Trainer,
    loader: TrainLoader,
    save: Callable[[], None],
    interrupt: Interrupt,
    log_path: Path,
    progress: bool,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> Literal["completed", "interrupted"]:
    from tqdm.auto import tqdm

    c = trainer.config
    set_train_mode(trainer.module, c.bn)
    gen = torch.Generator(device=trainer.device)
    t_window, n_window = time.perf_counter(), 0
    bar = tqdm(
        total=c.iterations,
        initial=trainer.step,
        disable=not progress,
        unit="step",
        desc="finetune",
        dynamic_ncols=True,
    )
    with bar, open(log_path, "a", encoding="utf-8") as log:
        while trainer.step < c.iterations:
            lr = trainer.lr()
            x0, y = loader.train_batch(trainer.step, prefetch_next=trainer.step + 1 < c.iterations)
            stats = trainer.train_step(x0.to(trainer.device), y.to(trainer.device), gen)
            n_window += 1
            step = trainer.step
            metrics = {"loss": stats.loss, "ce": stats.ce, c.calibration_loss: stats.calibration}
            if step % c.log_every == 0 or step == c.iterations:
                elapsed = time.perf_counter() - t_window
                metrics = trainer.flush_window(lr)
                metrics["steps_per_s"] = n_window / elapsed if elapsed > 0 else float("nan")
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                bar.set_postfix(
                    ce=f"{metrics['ce']:.3f}",
                    cal=f"{metrics[c.calibration_loss]:.3f}",
                    ece=f"{metrics['ece']:.3f}",
                    acc=f"{metrics['accuracy']:.3f}",
                    refresh=False,
                )
                t_window, n_window = time.perf_counter(), 0
            bar.update(1)
            if on_step is not None:
                on_step(step, metrics)
            if interrupt.signum is not None:
                save()
                return "interrupted"
            if step % c.checkpoint_every == 0 or step == c.iterations:
                save()
    return "completed"
