"""Point-to-point transfers of the ring by the GPUs' copy engines instead of NCCL's kernels (one node).

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

Opt-in: SEQPAR_RING_TRANSPORT=copy (CUDA tensors, an NCCL process group within one node).
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict

import torch
import torch.distributed as dist

ENV = "SEQPAR_RING_TRANSPORT"
CHOICES = ("nccl", "copy")
_ALIGN = 256  # bytes: every staged tensor starts on a boundary that any dtype's view accepts


def transport() -> str:
    """The ring's transport: `nccl` (default) or `copy` (the copy engines through symmetric memory)."""
    choice = os.environ.get(ENV, "").strip().lower() or "nccl"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not one of: {', '.join(CHOICES)}")
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

    def __init__(self):
        self.buf, self.handle, self.stream = None, None, None
        # the sizes agreed per key, the latest 64 (every rank sees the same keys in the same order,
        # so every rank forgets the same ones: a key seen again is agreed again, by all)
        self.agreed: OrderedDict = OrderedDict()

    def grow(self, nbytes, group, device):
        from torch.distributed import _symmetric_memory as symm_mem
        group = group if group is not None else dist.group.WORLD
        with warnings.catch_warnings():  # needed by older torch, deprecated (a no-op) by newer
            warnings.simplefilter("ignore", FutureWarning)
            if not symm_mem.is_symm_mem_enabled_for_group(group.group_name):
                symm_mem.enable_symm_mem_for_group(group.group_name)
        self.buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.buf, group)


_STAGING: dict[str, _Staging] = {}


class CopyEngineComm:
    """RingComm's exchange over the copy engines: send to the next rank of the ring, receive from
    the previous one (both global ranks of `group`)."""

    def __init__(self, group, next_rank: int, prev_rank: int):
        world_group = group if group is not None else dist.group.WORLD
        local = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
        if dist.get_world_size(group) > local:
            raise ValueError(f"{ENV}=copy maps the peers' memory: the ring's {dist.get_world_size(group)} ranks must "
                             f"share one node, which runs {local}; unset it (NCCL) across nodes")
        self.group = group
        self.peer = dist.get_group_rank(world_group, prev_rank) if group is not None else prev_rank
        self.staging = _STAGING.setdefault(world_group.group_name, _Staging())

    def reserve(self, key, nbytes: int, device) -> None:
        """Make the staging buffer hold `nbytes` on every rank: collective the first time `key` is
        seen (every rank reaches its first call with a new key together: keys are ring plans,
        built by every rank at the same layer)."""
        st = self.staging
        if key not in st.agreed:
            need = torch.tensor([nbytes], dtype=torch.int64, device=device)
            dist.all_reduce(need, op=dist.ReduceOp.MAX, group=self.group)
            st.agreed[key] = int(need.item())
            while len(st.agreed) > 64:
                st.agreed.popitem(last=False)
            if st.buf is None or st.buf.numel() < st.agreed[key]:
                if st.stream is not None:
                    st.stream.synchronize()  # the old buffer's last exchange is done before it is freed
                st.grow(max(st.agreed[key], 0 if st.buf is None else st.buf.numel()), self.group, device)
                st.stream = st.stream or torch.cuda.Stream(device=device)

    def exchange(self, send, recv) -> "Staged":
        st = self.staging
        need, have = max(staged_bytes(_sizes(send)), staged_bytes(_sizes(recv))), 0 if st.buf is None else st.buf.numel()
        if need > have:
            raise RuntimeError(f"copy-engine transfer of {need} bytes, but the staging buffer holds {have}: "
                               "reserve() the exchanges of a call before making them")
        caller = torch.cuda.current_stream()
        st.stream.wait_stream(caller)
        with torch.cuda.stream(st.stream):
            offset = 0
            for t in send:
                n = t.numel() * t.element_size()
                st.buf[offset:offset + n].view(t.dtype).view(t.shape).copy_(t)
                offset += _aligned(n)
            st.handle.barrier(channel=0)  # every rank's bytes are staged
            offset = 0
            for t in recv:
                n = t.numel() * t.element_size()
                src = st.handle.get_buffer(self.peer, (offset + n,), torch.uint8)[offset:]
                t.copy_(src.view(t.dtype).view(t.shape))  # contiguous, same dtype: cudaMemcpyAsync
                offset += _aligned(n)
            st.handle.barrier(channel=0)  # every rank has pulled: the buffers may be written again
            done = torch.cuda.Event()
            done.record(st.stream)
        for t in (*send, *recv):
            t.record_stream(st.stream)  # the caller's allocator must not reuse them before the copies ran
        return Staged(done, tuple(recv))


class Staged:
    """A posted copy-engine exchange: `wait()` makes the current stream wait for it and returns the
    receive buffers."""

    def __init__(self, done, buf):
        self.done, self.buf = done, buf

    def wait(self):
        torch.cuda.current_stream().wait_event(self.done)
        return self.buf
