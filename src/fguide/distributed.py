"""torchrun helpers: one process per device, collectives that every rank reaches.

:class:`Dist` describes this process in a ``torchrun`` job (or a single process) and wraps the
few collectives a sharded job needs. Every failure is shared (:meth:`Dist.agree`), so that one
rank's error never leaves the others waiting in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from fguide.runtime import resolve_device

__all__ = ["Dist", "DistributedRunError"]

T = TypeVar("T")


class DistributedRunError(RuntimeError):
    """Another process of a ``torchrun`` job failed; names the rank and its error."""


@dataclass
class Dist:
    """This process in a ``torchrun`` job (rank, world size, local rank), or a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False

    @classmethod
    def from_env(cls, device: str) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        owned = False
        if not dist.is_initialized():
            use_cuda = resolve_device(device).type == "cuda"
            if use_cuda:
                torch.cuda.set_device(local % torch.cuda.device_count())
            dist.init_process_group("nccl" if use_cuda else "gloo")
            owned = True
        return cls(dist.get_rank(), dist.get_world_size(), local, owned)

    def device(self, device: str) -> torch.device:
        """This process's device for ``device`` (``auto``: its local GPU when there is one)."""
        dev = resolve_device(device)
        if dev.type == "cuda":
            if dev.index is None:
                dev = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(dev)
        return dev

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, err: BaseException | None) -> None:
        """Collective: raise on every rank if any rank failed (``err`` re-raised where it was)."""
        errors = self.all_gather(None if err is None else f"{type(err).__name__}: {err}")
        if err is not None:
            raise err
        for r, msg in enumerate(errors):
            if msg is not None:
                raise DistributedRunError(f"rank {r} failed: {msg}")

    def on_rank0(self, fn: Callable[[], T], failed: str = "rank 0 failed") -> T:
        """Collective: ``fn()`` on rank 0 only, its result broadcast to every rank. Its error is
        raised on rank 0 as itself and on the other ranks as a :class:`DistributedRunError`
        (``failed: <error>``)."""
        payload: tuple[str, Any] = ("ok", None)
        err: Exception | None = None
        if self.rank == 0:
            try:
                payload = ("ok", fn())
            except Exception as e:
                err = e
                payload = ("error", f"{type(e).__name__}: {e}")
        payload = self.broadcast(payload)
        if err is not None:
            raise err
        if payload[0] == "error":
            raise DistributedRunError(f"{failed}: {payload[1]}")
        return payload[1]

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
