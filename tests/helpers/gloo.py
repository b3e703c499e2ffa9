"""Real torch.distributed process groups (gloo) in spawned processes, without Ray."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Any, Callable, Iterator


def spawn_gloo(function: Callable[..., None], world: int, *args: Any) -> dict:
    """Run function(rank, world, port, *args, out) in `world` processes; return what they put in `out`."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(function, args=(world, port, *args, out), nprocs=world, join=True)
    return dict(out)


@contextmanager
def torchrun_group(rank: int, world: int, port: int) -> Iterator[None]:
    """A gloo process group for the block, with the environment torchrun sets (which DeepSpeed reads),
    one intra-op thread per process."""
    import os

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
