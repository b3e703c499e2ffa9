"""Real torch.distributed process groups (gloo) in spawned processes, without Ray."""

from __future__ import annotations

import socket
from typing import Any, Callable


def spawn_gloo(function: Callable[..., None], world: int, *args: Any) -> dict:
    """Run function(rank, world, port, *args, out) in `world` processes; return what they put in `out`."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(function, args=(world, port, *args, out), nprocs=world, join=True)
    return dict(out)
