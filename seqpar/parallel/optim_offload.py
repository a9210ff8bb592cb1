"""AdamW whose two moments wait in pinned host memory between steps (`train.offload_optimizer=true`).

Why: AdamW's fp32 moments are half of the model state (8 of 16 bytes per parameter); llama_8b on
one GPU holds 60 GiB of them, which leaves too little for the activations of 128k tokens. Between
steps the moments are only stored, so they can wait in host memory; the update itself stays on the
GPU, where it is a bandwidth-bound element-wise pass.

How: the step walks this rank's parameters as flat slices of at most `bucket_numel` elements (a
large tensor, e.g. the embedding, spans several), and for each slice bucket copies the moments in
on one side stream, runs torch's own AdamW (`torch.optim.adam.adam`, the same foreach or single
kernel as `torch.optim.AdamW`) on the compute stream, and copies them back out on another side
stream. The next bucket's copy in overlaps this bucket's update and the previous one's copy out,
so the step costs about one host round trip of the moments over PCIe (both directions at once);
at most three buckets' moments are on the device. The update is element-wise, so slicing changes
no number: a step equals `torch.optim.AdamW`'s bit for bit (the tests check it).

Why not FSDP2's `CPUOffloadPolicy` or DeepSpeed's ZeRO-Offload: they move the parameters and
gradients to the host too and run the update on the CPU (16 bytes per parameter of host memory,
more than a 128 GiB host has for an 8B model, and a CPU update that takes seconds per billion
parameters); here only the moments move and the GPU does the arithmetic. DeepSpeed users keep
its own `offload_optimizer` through the pass-through `deepspeed` block.

Parameters may be FSDP2's DTensors: the moments are then DTensors with the same placements over
host-memory local shards (what torch.distributed.checkpoint saves and reshards), and the update
runs on the local shards. On a CPU run the "host" is the device: the same slicing and bookkeeping
run without streams, which is what the CPU tests check.
"""
from __future__ import annotations

import os

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam

MOMENTS = ("exp_avg", "exp_avg_sq")
DEFAULT_BUCKET_NUMEL = 1 << 27  # 512 MiB per fp32 moment slice: copies long enough to run at full PCIe speed
HOST_MEMORY_SHARE = 0.8  # of the host's RAM the moments of all local ranks may pin


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _host_zeros(p: torch.Tensor) -> torch.Tensor:
    local = _local(p)
    pin = local.is_cuda  # pinned pages only pay off (and only exist) next to a CUDA device
    host = torch.zeros(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin)
    if isinstance(p, DTensor):
        # not DTensor.from_local: it moves the local tensor to the mesh's device type, which put
        # the moments back on the GPU (llama_8b cp=2 measured 30 GiB more than predicted)
        return DTensor(host, p._spec, requires_grad=False)
    return host


def moment_bytes(params) -> int:
    """Host bytes the two moments of these (local) parameters take."""
    return sum(2 * _local(p).numel() * _local(p).element_size() for p in params)


def check_host_memory(params, local_ranks: int) -> None:
    """ConfigError naming the fix when the moments of `local_ranks` ranks like this one would not fit
    in the host's RAM (pinned pages cannot be swapped: the machine would fail, not slow down)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = moment_bytes(params) * local_ranks
    if need > HOST_MEMORY_SHARE * ram:
        from seqpar.config import ConfigError

        raise ConfigError(f"train.offload_optimizer=true: AdamW's moments of {local_ranks} local rank(s) need "
                         f"{need / 2**30:.1f} GiB of pinned host memory, more than {HOST_MEMORY_SHARE:.0%} of this "
                         f"host's {ram / 2**30:.1f} GiB; shard them over more ranks (parallel.dp or parallel.cp) or "
                         "set train.offload_optimizer=false")


class HostOffloadedAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` (no amsgrad, no fused, no capturable) with its moments in host memory."""

    def __init__(self, params, *, bucket_numel: int = DEFAULT_BUCKET_NUMEL, **kwargs):
        for key in ("amsgrad", "fused", "capturable", "differentiable"):
            if kwargs.get(key):
                raise ValueError(f"HostOffloadedAdamW: {key}=True is not supported (the moments stream "
                                 "through the device slice by slice)")
        super().__init__(params, **kwargs)
        self.bucket_numel = bucket_numel
        self._streams = None
        self._scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for group in self.param_groups:  # allocated now: the first step's peak is every step's
            for p in group["params"]:
                self.state[p] = {"step": torch.tensor(0.0, dtype=self._scalar),
                                 **{k: _host_zeros(p) for k in MOMENTS}}

    def _buckets(self, group):
        """(parameters that take a step, slices) per bucket: slices are flat (param, grad, exp_avg,
        exp_avg_sq, parameter) pieces of the local shards, at most `bucket_numel` elements a bucket."""
        stepping, bucket, size = [], [], 0
        for p in group["params"]:
            if p.grad is None:
                continue
            stepping.append(p)
            tensors = [_local(p), _local(p.grad), *(_local(self.state[p][k]) for k in MOMENTS)]
            if all(t.is_contiguous() for t in tensors):
                flat = [t.view(-1) for t in tensors]
                pieces = [(*(t[a:a + self.bucket_numel] for t in flat), p)
                          for a in range(0, flat[0].numel(), self.bucket_numel)]
            else:
                pieces = [(*tensors, p)]  # not sliceable as a view: the whole tensor is one piece
            for piece in pieces:
                if bucket and size + piece[0].numel() > self.bucket_numel:
                    yield stepping, bucket
                    stepping, bucket, size = [], [], 0
                bucket.append(piece)
                size += piece[0].numel()
        if bucket or stepping:
            yield stepping, bucket

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("HostOffloadedAdamW.step takes no closure")
        for group in self.param_groups:
            steps = {}  # each parameter's step count before this step, for every slice of it
            buckets = list(self._buckets(group))
            for stepping, _ in buckets:
                for p in stepping:
                    steps[p] = float(self.state[p]["step"])
            if not buckets:
                continue
            device = buckets[0][1][0][0].device if buckets[0][1] else torch.device("cpu")
            if device.type == "cuda":
                self._stream_through(group, [b for _, b in buckets], steps, device)
            else:
                for _, bucket in buckets:
                    self._update(group, bucket, [piece[2] for piece in bucket], [piece[3] for piece in bucket], steps)
            for p in steps:
                self.state[p]["step"] += 1
        return None

    def _update(self, group, bucket, exp_avgs, exp_avg_sqs, steps) -> None:
        beta1, beta2 = group["betas"]
        # one fresh step tensor per slice at its parameter's count before the step: adam()
        # increments them, and a parameter cut into several slices still takes one step
        counts = [torch.tensor(steps[piece[4]]) for piece in bucket]
        adam([piece[0] for piece in bucket], [piece[1] for piece in bucket], exp_avgs, exp_avg_sqs, [], counts,
             foreach=group["foreach"], capturable=False, differentiable=False, fused=None,
             has_complex=False, decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
             lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])

    def _stream_through(self, group, buckets, steps, device) -> None:
        if self._streams is None:
            self._streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        h2d, d2h = self._streams
        compute = torch.cuda.current_stream(device)

        def fetch(bucket):
            with torch.cuda.stream(h2d):
                moments = [[s[i].to(device, non_blocking=True) for s in bucket] for i in (2, 3)]
                return moments, h2d.record_event()

        pending = fetch(buckets[0])
        for i, bucket in enumerate(buckets):
            (exp_avgs, exp_avg_sqs), ready = pending
            if i + 1 < len(buckets):
                pending = fetch(buckets[i + 1])
            compute.wait_event(ready)
            self._update(group, bucket, exp_avgs, exp_avg_sqs, steps)
            done = compute.record_event()
            with torch.cuda.stream(d2h):
                d2h.wait_event(done)
                for s, m, v in zip(bucket, exp_avgs, exp_avg_sqs):
                    s[2].copy_(m, non_blocking=True)
                    s[3].copy_(v, non_blocking=True)
            for t in (*exp_avgs, *exp_avg_sqs):  # made on h2d, freed once compute and d2h are done with them
                t.record_stream(compute)
                t.record_stream(d2h)
        # the host moments must be whole before anyone reads them (a checkpoint, the next step)
        d2h.synchronize()

    def load_state_dict(self, state_dict) -> None:
        """torch's load, except that the moments go into this optimizer's host tensors instead of
        being cast to the parameters' device (all at once on the GPU, which is what does not fit)."""
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        moments = {i: {k: s[k] for k in MOMENTS if k in s} for i, s in state_dict["state"].items()}
        stripped = {**state_dict, "state": {i: {k: v for k, v in s.items() if k not in MOMENTS}
                                            for i, s in state_dict["state"].items()}}
        held = {p: {k: self.state[p][k] for k in MOMENTS} for p in params}
        super().load_state_dict(stripped)
        for i, p in zip(ids, params):
            state = self.state[p]
            state.setdefault("step", torch.tensor(0.0, dtype=self._scalar))  # a parameter never stepped
            for k in MOMENTS:
                state[k] = held[p][k]
                loaded = moments.get(i, {}).get(k)
                if loaded is None:
                    _local(state[k]).zero_()
                elif loaded is not state[k]:  # torch.distributed.checkpoint loads into these very tensors
                    _local(state[k]).copy_(_local(loaded))
