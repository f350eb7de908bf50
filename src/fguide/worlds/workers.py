"""The digits world's independent jobs on worker processes, one torch thread each.

Training the four networks, the sampling runs, the fine-tunings and the calibration
comparison's fits are independent jobs. On a few CPU cores, one job per core in its own
process is faster than torch's threads inside one job (the networks and batches are small),
and keeps its speed when other work shares the machine (waiting threads then spin and slow
everything). Every job, here or in a worker, runs with one torch thread, so its result does
not depend on where it ran or on the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

__all__ = ["default_workers", "job_pool", "one_thread", "timed"]

T = TypeVar("T")

MAX_DEFAULT_WORKERS = 4
"""More processes than this cost more memory (~0.4 GB each) than the demo gains."""


def default_workers() -> int:
    """The CPU cores this process may use, at most :data:`MAX_DEFAULT_WORKERS`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_DEFAULT_WORKERS, cores or 1))


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block (the caller's count is restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Inline(Executor):
    """Runs each job at submission, in this process (one worker: no process to start)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # raised by future.result(), as a worker's would be
            future.set_exception(err)
        return future


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``fn(*args, **kwargs)`` and the CPU seconds it took in the process that ran it."""
    start = time.process_time()
    return fn(*args, **kwargs), time.process_time() - start


def _init_worker() -> None:
    torch.set_num_threads(1)


@contextmanager
def job_pool(workers: int) -> Iterator[Executor]:
    """An executor of ``workers`` processes (started by spawn: a fork of a process that has
    run torch's thread pool is not safe), or this process for ``workers`` = 1; this process
    runs on one torch thread inside the block either way."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    with one_thread():
        if workers == 1:
            yield _Inline()
            return
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
            yield pool
