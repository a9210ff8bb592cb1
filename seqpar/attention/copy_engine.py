"""Transfers by the GPUs' copy engines instead of NCCL's kernels (one node): the ring's shifts and
LASP-2's all-gather of memory states.

NCCL's send/receive kernels hold SMs for as long as a transfer lasts: in the 2-rank ring at 32k,
cuDNN's attention kernels ran 2.3 ms (9%) longer beside them than alone (2026-11-27-gpu-17th/call1).
Between the GPUs of one node, a copy from memory that the peer has mapped (torch's symmetric memory)
is a cudaMemcpyAsync that the copy engines carry out, with no SM. An exchange: each rank stages what
it sends in its own symmetric buffer, the ranks meet at a barrier, each pulls its source's staged
bytes into its receive buffers, and a second barrier frees the buffers for the next exchange. All of
it runs on one side stream (one exchange after the other), ordered after the caller's stream as
NCCL's operations are; `wait()` makes the caller's stream wait for it. (torch's own
`_low_contention_all_gather` / `reduce_scatter` pull through symmetric memory the same way, but
only as collectives; the ring needs a shift to one neighbour, of several tensors, both ways.)

The staging buffer is collective (every rank allocates and maps it at once), so its size must be
agreed: `reserve` takes a rank's largest exchange for a key (a ring plan and a row size) and, the
first time a key is seen, takes the maximum over the group (one host read per key) and grows the
buffer on every rank together.

The ring: opt-in, SEQPAR_RING_TRANSPORT=copy (CUDA tensors, an NCCL process group within one node).
LASP-2's state all-gather (`all_gather`): SEQPAR_STATE_TRANSPORT=copy. There the bytes are few (a few
MiB a layer) and what counts is the host: an NCCL all-gather took ~150-250 us of host a call on the
H100/H200 machines (2026-11-28), and LASP-2 at 32k tokens per GPU is bound by its host.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict

import torch
import torch.distributed as dist

ENV = "SEQPAR_RING_TRANSPORT"
STATE_ENV = "SEQPAR_STATE_TRANSPORT"
CHOICES = ("nccl", "copy")
_ALIGN = 256  # bytes: every staged tensor starts on a boundary that any dtype's view accepts


def transport(env: str = ENV) -> str:
    """The transport `env` names (the ring's, or LASP-2's states'): `nccl` (default) or `copy` (the
    copy engines through symmetric memory)."""
    choice = os.environ.get(env, "").strip().lower() or "nccl"
    if choice not in CHOICES:
        raise ValueError(f"{env}={choice!r} is not one of: {', '.join(CHOICES)}")
    return choice


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def staged_bytes(sizes) -> int:
    """Bytes that tensors of these sizes (in bytes) take in a staging buffer, one after the other."""
    return sum(_aligned(n) for n in sizes)


def _sizes(tensors):
    return [t.numel() * t.element_size() for t in tensors]


class _Staging:
    """One group's symmetric staging buffer, its handle and its side stream."""

    def __init__(self, group):
        self.group = group
        self.buf, self.handle, self.stream = None, None, None
        # the sizes agreed per key, the latest 64 (every rank sees the same keys in the same order,
        # so every rank forgets the same ones: a key seen again is agreed again, by all)
        self.agreed: OrderedDict = OrderedDict()

    def reserve(self, key, nbytes: int, device) -> None:
        """Make the buffer hold `nbytes` on every rank: collective the first time `key` is seen (every
        rank reaches its first call with a new key together: keys are ring plans, built by every
        rank at the same layer, or the sizes of state exchanges, equal on every rank)."""
        if key not in self.agreed:
            need = torch.tensor([nbytes], dtype=torch.int64, device=device)
            dist.all_reduce(need, op=dist.ReduceOp.MAX, group=self.group)
            self.agreed[key] = int(need.item())
            while len(self.agreed) > 64:
                self.agreed.popitem(last=False)
            if self.buf is None or self.buf.numel() < self.agreed[key]:
                if self.stream is not None:
                    self.stream.synchronize()  # the old buffer's last exchange is done before it is freed
                self._grow(max(self.agreed[key], 0 if self.buf is None else self.buf.numel()), device)
                self.stream = self.stream or torch.cuda.Stream(device=device)

    def _grow(self, nbytes, device):
        from torch.distributed import _symmetric_memory as symm_mem
        group = self.group if self.group is not None else dist.group.WORLD
        with warnings.catch_warnings():  # needed by older torch, deprecated (a no-op) by newer
            warnings.simplefilter("ignore", FutureWarning)
            if not symm_mem.is_symm_mem_enabled_for_group(group.group_name):
                symm_mem.enable_symm_mem_for_group(group.group_name)
        self.buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.buf, group)

    def run(self, send, pulls, local=()) -> "Staged":
        """Stage `send`; once every rank has, pull each `(peer, tensors)` of `pulls` (group ranks)
        from that peer's staged tensors of the same shapes, and copy each `(src, dst)` of `local`.
        Ordered after the caller's stream, on the side stream; `wait()` orders the caller after."""
        recv = [t for _, ts in pulls for t in ts]
        need = max(staged_bytes(_sizes(send)), *(staged_bytes(_sizes(ts)) for _, ts in pulls), 0)
        have = 0 if self.buf is None else self.buf.numel()
        if need > have:
            raise RuntimeError(f"copy-engine transfer of {need} bytes, but the staging buffer holds {have}: "
                               "reserve() the exchanges of a call before making them")
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            offset = 0
            for t in send:
                n = t.numel() * t.element_size()
                self.buf[offset:offset + n].view(t.dtype).view(t.shape).copy_(t)
                offset += _aligned(n)
            for src, dst in local:
                dst.copy_(src)
            self.handle.barrier(channel=0)  # every rank's bytes are staged
            for peer, ts in pulls:
                offset = 0
                for t in ts:
                    n = t.numel() * t.element_size()
                    src = self.handle.get_buffer(peer, (offset + n,), torch.uint8)[offset:]
                    t.copy_(src.view(t.dtype).view(t.shape))  # contiguous, same dtype: cudaMemcpyAsync
                    offset += _aligned(n)
            self.handle.barrier(channel=0)  # every rank has pulled: the buffers may be written again
            done = torch.cuda.Event()
            done.record(self.stream)
        for t in (*send, *recv, *(t for pair in local for t in pair)):
            t.record_stream(self.stream)  # the caller's allocator must not reuse them before the copies ran
        return Staged(done, tuple(recv))


_STAGING: dict[str, _Staging] = {}


def _staging(group) -> _Staging:
    """The group's staging buffer; its ranks must share one node (they map each other's memory)."""
    world_group = group if group is not None else dist.group.WORLD
    local = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
    if dist.get_world_size(group) > local:
        raise ValueError(f"the copy engines map the peers' memory: the group's {dist.get_world_size(group)} ranks "
                         f"must share one node, which runs {local}; use NCCL across nodes")
    return _STAGING.setdefault(world_group.group_name, _Staging(group))


class CopyEngineComm:
    """RingComm's exchange over the copy engines: send to the next rank of the ring, receive from
    the previous one (both global ranks of `group`)."""

    def __init__(self, group, next_rank: int, prev_rank: int):
        world_group = group if group is not None else dist.group.WORLD
        try:
            self.staging = _staging(group)
        except ValueError as e:
            raise ValueError(f"{ENV}=copy: {e} (unset {ENV})") from None
        self.peer = dist.get_group_rank(world_group, prev_rank) if group is not None else prev_rank

    def reserve(self, key, nbytes: int, device) -> None:
        self.staging.reserve(key, nbytes, device)

    def exchange(self, send, recv) -> "Staged":
        return self.staging.run(send, [(self.peer, recv)])


def all_gather(out, x, group) -> "Staged":
    """`out[r] = x` of group rank r for every r, by the copy engines (the ranks of one node; `x`
    contiguous and of the same size on every rank). The first call of a size agrees on it (a host
    read); `wait()` orders the caller's stream after the copies and returns `(out,)`."""
    staging = _staging(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    nbytes = x.numel() * x.element_size()
    staging.reserve(("all_gather", nbytes), nbytes, x.device)
    staged = staging.run([x], [(p, [out[p]]) for p in range(world) if p != rank], local=[(x, out[rank])])
    staged.buf = (out,)
    return staged


class Staged:
    """A posted copy-engine exchange: `wait()` makes the current stream wait for it and returns the
    receive buffers."""

    def __init__(self, done, buf):
        self.done, self.buf = done, buf

    def wait(self):
        torch.cuda.current_stream().wait_event(self.done)
        return self.buf
