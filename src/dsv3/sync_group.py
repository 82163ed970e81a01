"""The torch.distributed group between a trainer and a serving engine, for pushing weights.

Both sides call `open_group` with the same address, port, world size and group name: the trainer as
rank 0 (it hosts the rendezvous store), the server as rank `rank_offset`. The group is a standalone
process group (its own TCP store, gloo on CPU or NCCL on CUDA), so it never touches a default process
group either side may run (a tensor-parallel server's, an FSDP trainer's). SGLang's
`init_custom_process_group` does the same.

One update over the group (`dsv3.serve.weight_sync` receives, `dsv3.train.weight_sync` sends):
1. the trainer posts names, dtypes and shapes over HTTP; the server checks them against the model;
2. the server broadcasts one int (1: go, 0: refused) from its rank: the trainer never sends tensors
   a server will not take, and a refusal never leaves it blocked;
3. the trainer broadcasts each tensor from rank 0, in the order of the names;
4. the server stages, checks and applies them and answers the HTTP request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dsv3.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a weight may travel in (names as torch prints them, without `torch.`)."""
BACKENDS = ("gloo", "nccl")


@dataclass
class SyncGroup:
    pg: dist.ProcessGroup
    store: dist.Store
    rank: int
    world_size: int
    backend: str
    name: str
    device: torch.device

    def broadcast(self, t: torch.Tensor, root: int) -> None:
        self.pg.broadcast(t, root).wait()

    def broadcast_async(self, t: torch.Tensor, root: int):
        return self.pg.broadcast(t, root)


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise UserError(f"weight sync carries {', '.join(DTYPES)} tensors, not {name}")
    return name


def open_group(master_address: str, master_port: int, world_size: int, rank: int, backend: str = "gloo",
               group_name: str = "weight_update_group", timeout_s: float = 300.0) -> SyncGroup:
    """Join (rank 0: host) the group; raises `UserError` with one line when the rendezvous fails."""
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r:.40}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise UserError("backend nccl needs CUDA; use gloo on CPU")
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
        prefixed = dist.PrefixStore(group_name, store)
        if backend == "gloo":
            pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
            device = torch.device("cpu")
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
            device = torch.device("cuda", torch.cuda.current_device())
    except (RuntimeError, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot join weight-sync group {group_name!r} at {master_address}:{master_port} "
                        f"as rank {rank} of {world_size}: {first}") from None
    return SyncGroup(pg, store, rank, world_size, backend, group_name, device)
