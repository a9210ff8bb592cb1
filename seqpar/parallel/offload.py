"""Activation offload: what activation checkpoints keep (their inputs) waits for backward in host memory.

Forward: a checkpointed module runs, then its input is copied to pinned host memory on a side
stream, so the copy overlaps the compute of the modules after it; when the enclosing block returns
(`release`, a forward hook on each block) the input's device storage is given back. Backward: an
identity op on the module's output runs first in the module's backward; it waits for the input's
copy back (started earlier, see below), which is what the recomputation then reads, and starts
the copy back of the input offloaded just before this one, so that host-to-device transfer
overlaps this module's backward. At most two offloaded inputs are on the device at any time.

Why not `torch.autograd.graph.save_on_cpu`: a non-reentrant checkpoint keeps its inputs by
reference, not through saved-tensor hooks, so those hooks never see them; and routing the input
through a device-to-host autograd op instead puts every copy (and a host round trip of the input's
gradient) on the compute stream.

Precondition, true of the model's blocks and of `selective`'s norm/MLP parts: once the block has
returned, nothing but the checkpoint reads the input until backward (its storage is empty then).
On a CPU run the "host copy" is a second CPU tensor and the streams are absent: the same
bookkeeping runs, which is what the CPU tests check.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils.checkpoint import checkpoint


class _Entry:
    __slots__ = ("tensor", "host", "nbytes", "ready", "prev", "state", "__weakref__")

    def __init__(self, tensor: torch.Tensor, prev: "_Entry | None"):
        # `prev` is weak: the autograd graph keeps entries alive until backward, nothing else does
        self.tensor, self.host, self.ready = tensor, None, None
        self.prev = weakref.ref(prev) if prev is not None else None
        self.nbytes = tensor.untyped_storage().nbytes()
        self.state = "on_device"  # -> "offloading" -> "on_host" -> "restoring" -> "done"


class ActivationOffloader:
    def __init__(self):
        self._last = None  # weak reference to the latest entry
        self._unreleased: list[_Entry] = []
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def checkpoint(self, fn, x, *args, **kwargs):
        """`torch.utils.checkpoint.checkpoint(fn, x, *args, **kwargs)` whose kept input `x` waits in host memory."""
        out = checkpoint(fn, x, *args, **kwargs)
        if not (torch.is_grad_enabled() and self._offloadable(x) and type(out) is torch.Tensor):
            return out
        entry = _Entry(x, self._last() if self._last is not None else None)
        self._last = weakref.ref(entry)
        x._seqpar_offloaded = True  # a second checkpoint reading the same tensor must not offload it again
        self._to_host(entry)
        self._unreleased.append(entry)
        return _RestoreBeforeBackward.apply(out, self, entry)

    def release(self, *_) -> None:
        """Free the device storage of the inputs offloaded since the last call (forward-hook signature)."""
        for entry in self._unreleased:
            entry.tensor.untyped_storage().resize_(0)
        self._unreleased.clear()

    @staticmethod
    def _offloadable(x) -> bool:
        # a DTensor, a view into a larger buffer, or a tensor already offloaded keeps its storage
        return (type(x) is torch.Tensor and x.requires_grad and x.is_contiguous() and x.storage_offset() == 0
                and x.untyped_storage().nbytes() == x.numel() * x.element_size() and x.numel() > 0
                and not getattr(x, "_seqpar_offloaded", False))

    def _stream(self, device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _to_host(self, entry: _Entry) -> None:
        x, stream = entry.tensor, self._stream(entry.tensor.device)
        entry.state = "offloading"
        if stream is None:
            entry.host = x.detach().clone()
        else:
            entry.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                entry.host.copy_(x.detach(), non_blocking=True)
            x.record_stream(stream)  # the caching allocator must not hand the storage out before the copy ends
        entry.state = "on_host"

    def _start_restore(self, entry: _Entry) -> None:
        if entry.state != "on_host":
            return
        x, stream = entry.tensor, self._stream(entry.tensor.device)
        x.untyped_storage().resize_(entry.nbytes)  # allocated on the compute stream: it owns the memory
        entry.state = "restoring"
        # written through an alias of its own: an in-place op on `x` would bump the version counter
        # that autograd checks when the checkpoint hands `x` to the recomputation
        alias = x.new_empty(0).set_(x.untyped_storage(), 0, x.shape, x.stride())
        if stream is None:
            alias.copy_(entry.host)
        else:
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                alias.copy_(entry.host, non_blocking=True)
                entry.ready = torch.cuda.Event()
                entry.ready.record(stream)

    def restore(self, entry: _Entry) -> None:
        """Make `entry`'s input readable on the compute stream and start bringing back the one before it."""
        if entry in self._unreleased:  # backward of a block whose forward has not returned (no release yet)
            self._unreleased.remove(entry)
            entry.state = "done"
        self._start_restore(entry)
        if entry.ready is not None:
            torch.cuda.current_stream(entry.tensor.device).wait_event(entry.ready)
        # the checkpoint holds its own reference for the recomputation; this one (kept by the
        # autograd graph until the whole backward ends) would keep every restored input alive
        entry.state, entry.host, entry.ready, entry.tensor = "done", None, None, None
        prev = entry.prev() if entry.prev is not None else None
        if prev is not None:
            self._start_restore(prev)


class _RestoreBeforeBackward(torch.autograd.Function):
    """Identity whose backward, the first of the checkpointed module's, brings its input back."""

    @staticmethod
    def forward(ctx, out, offloader, entry):
        ctx.offloader, ctx.entry = offloader, entry
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.offloader.restore(ctx.entry)
        return grad, None, None
