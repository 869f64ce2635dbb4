"""Weight sync from learner rank 0 to every rollout engine, as a bucketed broadcast.

Learner rank 0 and the N engines join one process group of their own (NCCL on GPU, gloo on CPU),
built from an explicit TCP store so it never touches the default groups that DeepSpeed and vLLM
create in the same processes. The sender packs parameters into flat buckets of about `bucket_mb`
(one dtype per bucket, a parameter never split) and broadcasts them one by one; each engine turns a
received bucket into views and feeds them to vLLM's weight loader while the next one is in flight,
so an update costs one pass over the weights, not one RPC per tensor.

The CPU default sends weights through the Ray object store instead (rollout/pool.py); colocated
learner/engine pairs on one GPU would share CUDA IPC handles of the same buckets (the documented
extension point: `plan_buckets` is the unit both transports use).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    """Element offset inside the bucket."""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Bucket:
    dtype: torch.dtype
    numel: int
    entries: tuple[Entry, ...]


def plan_buckets(specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]], bucket_mb: float) -> list[Bucket]:
    """Groups (name, shape, dtype) in order into buckets of at most `bucket_mb` (a larger tensor
    gets a bucket of its own). Sender and receivers compute the same plan from the same specs."""
    limit = max(1, int(bucket_mb * (1 << 20)))
    buckets: list[Bucket] = []
    current: list[Entry] = []
    dtype, numel = None, 0

    def close():
        if current:
            buckets.append(Bucket(dtype, numel, tuple(current)))

    for name, shape, dt in specs:
        entry_numel = 1
        for d in shape:
            entry_numel *= d
        if current and (dt != dtype or (numel + entry_numel) * dt.itemsize > limit):
            close()
            current, numel = [], 0
        dtype = dt
        current.append(Entry(name, tuple(shape), dt, numel))
        numel += entry_numel
    close()
    return buckets


def join_group(master_addr: str, master_port: int, rank: int, world_size: int, backend: str,
               timeout_s: float = 600.0) -> dist.ProcessGroup:
    """A process group of its own (rank 0 = the sender) over a TCP store hosted by rank 0."""
    store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=timeout_s))
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    raise ValueError(f"weight sync backend must be 'nccl' or 'gloo', got {backend!r}")


def _broadcast(group: dist.ProcessGroup, tensor: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def send(group: dist.ProcessGroup, tensors: dict[str, torch.Tensor], plan: list[Bucket], device: str) -> int:
    """Broadcasts `tensors` bucket by bucket (rank 0). Returns the bytes sent."""
    sent = 0
    for bucket in plan:
        flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)
        for e in bucket.entries:
            flat[e.offset:e.offset + e.numel].copy_(tensors[e.name].reshape(-1))
        _broadcast(group, flat)
        sent += flat.numel() * flat.element_size()
    return sent


def receive(group: dist.ProcessGroup, plan: list[Bucket], device: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) as each bucket arrives; the tensors are views of the bucket buffer."""
    for bucket in plan:
        flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)
        _broadcast(group, flat)
        for e in bucket.entries:
            yield e.name, flat[e.offset:e.offset + e.numel].view(e.shape)
