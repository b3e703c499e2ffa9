"""The few collectives distdl needs beyond DeepSpeed's, each safe to call without a process group
(one process: the identity). Every rank must call them, in the same order."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a device tensor: NCCL reduces only those); returns it."""
    if distributed():
        dist.all_reduce(values)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether any rank's flag is set; every rank gets the same answer."""
    return all_reduce_sum(torch.tensor(float(flag), device=device)).item() > 0


class DeferredAnyRank:
    """Whether any rank's flag is set, asked now and read later without stalling: asked after one
    step's work is queued and read after the next one's, the all-reduce runs while that step does.
    On a GPU (NCCL) it is queued behind the step on the device and read back through pinned memory
    by an event, so reading waits for it alone and the host stays a step ahead; on CPU workers
    (gloo) it runs in gloo's own thread, and reading waits for it to finish."""

    def __init__(self, flag: bool, device: torch.device) -> None:
        # torch.full launches a fill; torch.tensor(flag, device=cuda) would wait for the queued step.
        self._value = torch.full((), float(flag), device=device)
        self._work = dist.all_reduce(self._value, async_op=True) if distributed() else None
        self._event = None
        if device.type == "cuda":
            if self._work is not None:
                self._work.wait()  # NCCL: the current stream waits for the collective, not the host
                self._work = None
            on_device, self._value = self._value, torch.empty((), pin_memory=True)
            self._value.copy_(on_device, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> bool:
        if self._work is not None:
            self._work.wait()
        if self._event is not None:
            self._event.synchronize()
        return self._value.item() > 0


def gather_objects(value: Any) -> list[Any]:
    """A picklable value from every rank, in rank order."""
    if not distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Rank `source`'s value, on every rank."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, source)
    return box[0]
