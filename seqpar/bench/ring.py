"""`torchrun --nproc_per_node 2 -m seqpar.bench ring --out FILE.json`: ring attention's efficiency
against one GPU, with PyTorch's context_parallel measured in the same run as the anchor.

Causal attention fwd+bwd, bf16, one sequence of S tokens, H=32 heads of D=128 (the shape of
`../shared/anchors/anchors_torch_cp.py`, whose method this repeats). For each S and each local
kernel family (cuDNN, FlashAttention-2, seqpar's Triton kernel, cuDNN's graph API; `SEQPAR_ATTN_KERNEL`):

- single_ms: one GPU, the whole sequence, SDPA with the same kernel family (`kernels.flash_attn` on
  the Triton kernel for `triton` and on cuDNN's graphs for `graph`, which torch's context_parallel
  cannot run: no torch_cp row);
- ring_ms: seqpar's ring attention over the ranks (zigzag), slowest rank;
- efficiency = single_ms / (world * ring_ms), 1.0 ideal;
- exposed_comm_ms = ring_ms - the same schedule with every transfer replaced by a local no-op
  (what the overlap failed to hide);
- torch_cp: context_parallel with the same kernel (allgather and alltoall rotation), its efficiency;
- with `--rounds R`: each dense case's times taken once per round, the families in turn, and the
  medians over the rounds reported (each round's single_ms and ring_ms beside them): drift of the
  GPUs' clocks or of the pair then hits the one-GPU run and the ring alike;
- with `--methods ulysses usp:U allgather`: Ulysses, USP (Ulysses of degree U inside groups, ring
  across) and the all-gather (`attention.allgather`) on the same inputs, their times and efficiencies
  (`ulysses_ms`, `usp:2_efficiency`, `allgather_efficiency`, ...);
- `--comm-priority`: on CUDA the ring (and Ulysses, the all-gather) runs on a communicator of its
  own whose NCCL streams run at high priority, as training's cp group does
  (`parallel.dims.attention_comm_options`), so a transfer posted behind long kernels gets the next
  free SMs; `normal` takes the default group's streams.

Packed documents (lognormal lengths, the draw of `anchors_varlen.py`): one GPU runs varlen flash
on the whole row; the ring runs the same documents in three layouts: `zigzag` over the row's chunks
(the family's key, e.g. "flash"), `doc_zigzag`, every document cut in 2N pieces ("flash_doc_zigzag"),
and `doc_balanced`, documents whole on ranks chosen for equal work and only the rest cut
("flash_doc_balanced", with `cut_docs` and `travel_rows`, the rows per rank that go round the ring).
Printed per rank: the modelled causal work (query-key pairs) and the measured time, whose
max/mean is the imbalance that zigzag over chunks leaves when documents are not uniform and the
document layouts remove; with kernel calls per rank and, for those, the exposed communication.

Needs only torch, triton and numpy. Without CUDA it runs a small smoke form on gloo (reference
kernels, no anchor), which is how CI-side checks exercise this script.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform

import torch
import torch.distributed as dist

from seqpar import kernels
from seqpar.attention import ring as ring_module
from seqpar.attention.copy_engine import transport
from seqpar.attention.ring import doc_balanced_schedule, doc_ring_schedule, keep_kv, ring_attention, ring_schedule
from seqpar.parallel.dims import attention_comm_options, init_world
from seqpar.parallel.sharding import (DOC_LAYOUTS, doc_zigzag_plan, document_plan, local_ranges, shard_sequence,
                                     unshard_sequence)

SDPA_BACKEND = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION"}
FAMILIES = (*SDPA_BACKEND, "triton", "graph")


def _timer(device, iters, warmup):
    """Median ms of fn() over `iters` runs, ranks in step (a barrier before timing), as the anchor.
    The last run's result stays in `run.last`: the accuracy checks read it rather than run a
    step again, which at 1M tokens is a minute of one GPU."""
    def run(fn):
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run.last = fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                import time
                t = time.perf_counter()
                run.last = fn()
                times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]
    return run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def _max_abs_diff(a, b, rows=65536):
    """max |a - b| over [B, S, ...] tensors, `rows` of S at a time: in fp32 at once, a 1M-token
    output (32 heads of 128) would take two 16 GiB temporaries beside the benchmark's own."""
    return max((a[:, i:i + rows].float() - b[:, i:i + rows].float()).abs().max().item()
               for i in range(0, a.shape[1], rows))


def _max_over_ranks(x, device):
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _all_ranks(x, device):
    t = torch.tensor([x], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.item() for o in out]


class _NoComm:
    """RingComm without transfers: each step reuses the local buffer, so the schedule and the
    kernels are the same and only the communication is gone. Where a ring of 2 receives more rows
    than it sends (`RingPlan.recv_len`), a zero buffer of that size, made once, stands in."""

    _zeros: dict = {}

    def __init__(self, group):
        pass

    def reserve(self, plan, k, v):
        pass

    def shift(self, x, rows=None):
        if rows is None or rows == x[0].shape[1]:
            return _Ready(x)
        if rows < x[0].shape[1]:
            return _Ready(tuple(t[:, :rows] for t in x))
        shapes = tuple((t.shape[0], rows) + t.shape[2:] for t in x)
        key = (shapes, x[0].dtype, x[0].device)
        if key not in _NoComm._zeros:
            _NoComm._zeros[key] = tuple(x[0].new_zeros(shape) for shape in shapes)
        return _Ready(_NoComm._zeros[key])

    def exchange(self, send, recv):
        return _Ready(recv)


class _Ready:
    def __init__(self, x):
        self.x = x

    def wait(self):
        return self.x


@contextlib.contextmanager
def _without_comm():
    real = ring_module.RingComm
    ring_module.RingComm = _NoComm
    try:
        yield
    finally:
        ring_module.RingComm = real


def _single(q, k, v, do, kernel, device):
    """fwd+bwd on one device over the whole sequence: SDPA pinned to `kernel` on CUDA (the Triton
    family: `kernels.flash_attn`, which SEQPAR_ATTN_KERNEL=triton sends there)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if device.type == "cuda" and kernel in SDPA_BACKEND:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(getattr(SDPBackend, SDPA_BACKEND[kernel])):
            o = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), is_causal=True)
        o = o.transpose(1, 2)
    else:
        o = kernels.flash_attn(*leaves, causal=True)
    o.backward(do)
    return o


RING_GROUP = None  # the ring's (Ulysses', the all-gather's) communicator: None (the default group) or, high, its own


def _ring_step(q, k, v, do, cu=None, layout="zigzag"):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o = ring_attention(*leaves, group=RING_GROUP, cu_seqlens=cu, layout=layout)
    o.backward(do)
    return o


def _other_method(name: str, world: int):
    """fwd+bwd of Ulysses (`ulysses`), USP (`usp:U`: Ulysses of degree U inside groups, ring
    across them, the process groups built as training builds them) or the all-gather (`allgather`,
    `attention.allgather`) over the whole world, zigzag; Ulysses and the all-gather on the ring's
    communicator (`--comm-priority`), as training runs them on the cp group."""
    from seqpar.attention.allgather import allgather_attention
    from seqpar.attention.ulysses import ulysses_attention, usp_attention
    from seqpar.parallel.dims import ParallelDims

    if name == "ulysses":
        fn = functools.partial(ulysses_attention, group=RING_GROUP)
    elif name == "allgather":
        fn = functools.partial(allgather_attention, group=RING_GROUP)
    elif name.startswith("usp:") and name[4:].isdigit():
        dims = ParallelDims(dp=1, cp=world, tp=1, pp=1, world_size=world, ulysses=int(name[4:]))
        dims.build_mesh("cuda" if torch.cuda.is_available() else "cpu")
        fn = functools.partial(usp_attention, group=dims.group("cp"))
    else:
        raise SystemExit(f"--methods: unknown method {name!r}; known: ring, ulysses, usp:U, allgather")

    def step(q, k, v, do):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o = fn(*leaves, layout="zigzag")
        o.backward(do)
        return o
    return step


def _torch_cp(q, k, v, do, kernel, timer, device, rotate):
    """The anchor: PyTorch's context_parallel (ring over SDPA, head-tail load balance)."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mesh = _world_mesh()
    set_rotate_method(rotate)
    bufs = [t.transpose(1, 2).contiguous() for t in (q, k, v, do)]  # [B, H, S, D], as the anchor
    with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2]):
        def step():
            ql, kl, vl = (t.detach().requires_grad_() for t in bufs[:3])
            with sdpa_kernel(getattr(SDPBackend, SDPA_BACKEND[kernel])):
                o = torch.nn.functional.scaled_dot_product_attention(ql, kl, vl, is_causal=True)
            o.backward(bufs[3])
        return _max_over_ranks(timer(step), device)


@functools.lru_cache(maxsize=None)
def _world_mesh():
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cuda", (dist.get_world_size(),))


def bench_dense(args, device, timer, world):
    rows = []
    for S in args.seq_lens:
        g = torch.Generator(device=device).manual_seed(S)
        q, k, v, do = (torch.randn(1, S, args.heads, args.head_dim, device=device, dtype=args.dtype, generator=g)
                       for _ in range(4))
        local = [shard_sequence(t, layout="zigzag") for t in (q, k, v, do)]
        others = {name: _other_method(name, world) for name in args.methods if name != "ring"}
        rounds = {kernel: [] for kernel in args.kernels}
        for _ in range(args.rounds):  # every family's cases once per round, in turn
            for kernel in args.kernels:
                rounds[kernel].append(_dense_row(args, device, timer, world, kernel, (q, k, v, do), local, others))
        for kernel in args.kernels:
            _report(_median_row(rounds[kernel]), rows)
        del q, k, v, do, local
    return rows


def _dense_row(args, device, timer, world, kernel, full, local, others):
    q, k, v, do = full
    os.environ["SEQPAR_ATTN_KERNEL"] = kernel
    row = dict(S=q.shape[1], kernel=kernel, world=world, H=args.heads, D=args.head_dim)
    try:
        row["single_ms"] = _max_over_ranks(timer(lambda: _single(q, k, v, do, kernel, device)), device)
        ref = timer.last.detach()
        row["ring_ms"] = _max_over_ranks(timer(lambda: _ring_step(*local)), device)
        out = unshard_sequence(timer.last.detach(), layout="zigzag")
        row["max_abs_diff_vs_single"] = _max_abs_diff(out, ref)
        del out
        with _without_comm():
            row["compute_only_ms"] = _max_over_ranks(timer(lambda: _ring_step(*local)), device)
        row["exposed_comm_ms"] = round(row["ring_ms"] - row["compute_only_ms"], 3)
        row["efficiency"] = round(row["single_ms"] / (world * row["ring_ms"]), 3)
        for name, step in others.items():  # Ulysses and USP beside the ring, same inputs
            row[f"{name}_ms"] = _max_over_ranks(timer(lambda: step(*local)), device)
            row[f"{name}_efficiency"] = round(row["single_ms"] / (world * row[f"{name}_ms"]), 3)
            got = unshard_sequence(timer.last.detach(), layout="zigzag")
            row[f"{name}_max_abs_diff_vs_single"] = _max_abs_diff(got, ref)
        del ref
        timer.last = None
    except Exception as e:  # a kernel family that fails here must not hide the others
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if device.type == "cuda" and "error" not in row and kernel in SDPA_BACKEND:
        for rotate in args.torch_cp_rotate:
            try:
                t = _torch_cp(q, k, v, do, kernel, timer, device, rotate)
                row[f"torch_cp_{rotate}_ms"] = round(t, 3)
                row[f"torch_cp_{rotate}_efficiency"] = round(row["single_ms"] / (world * t), 3)
            except Exception as e:
                row[f"torch_cp_{rotate}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def _median_row(rounds):
    """A case's row from its rows of several rounds: every time the median over the rounds (the
    lower middle of an even count), the efficiencies and the exposed time from those, the largest
    difference from one GPU of any round, and each round's one-GPU and ring times. One round, or a
    round that failed: that row as it is."""
    if len(rounds) == 1 or any("error" in r for r in rounds):
        return next((r for r in rounds if "error" in r), rounds[0])
    row = dict(rounds[0])
    for key, value in rounds[0].items():
        values = [r.get(key) for r in rounds]
        if key.endswith("_ms") and all(isinstance(x, float) for x in values):
            row[key] = sorted(values)[(len(values) - 1) // 2]
        elif "max_abs_diff" in key and all(isinstance(x, float) for x in values):
            row[key] = max(values)
    world = row["world"]
    row["exposed_comm_ms"] = round(row["ring_ms"] - row["compute_only_ms"], 3)
    for key in list(row):
        if key.endswith("efficiency"):
            ms = "ring_ms" if key == "efficiency" else key.removesuffix("efficiency") + "ms"
            row[key] = round(row["single_ms"] / (world * row[ms]), 3)
    row.update(rounds_single_ms=[r["single_ms"] for r in rounds], rounds_ring_ms=[r["ring_ms"] for r in rounds])
    return row


def lognormal_lengths(total, seed=0):
    """The long-tailed document lengths of ../shared/anchors/anchors_varlen.py, cut to `total`."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(int(torch.empty(1).log_normal_(mean=7.5, std=1.2, generator=g).clamp(16, total).item()))
    lens[-1] -= sum(lens) - total
    return lens


def bench_packed(args, device, timer, world):
    rows = []
    rank = dist.get_rank()
    for S in args.packed_lens:
        lens = lognormal_lengths(S)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
        g = torch.Generator(device=device).manual_seed(S)
        q, k, v, do = (torch.randn(1, S, args.heads, args.head_dim, device=device, dtype=args.dtype, generator=g)
                       for _ in range(4))
        held = [local_ranges(S, world, r, "zigzag") for r in range(world)]
        balanced = document_plan("doc_balanced", cu, world)
        layouts = {"zigzag": ring_schedule(held, rank, cu.tolist(), True),
                   "doc_zigzag": doc_ring_schedule(doc_zigzag_plan(cu, world), rank, True),
                   "doc_balanced": doc_balanced_schedule(balanced, rank, True)}
        row = dict(S=S, world=world, n_docs=len(lens), max_doc=max(lens), H=args.heads, D=args.head_dim,
                   single_kernel="kernels.flash_attn with cu_seqlens (varlen flash on CUDA) for every family")
        for kernel in args.kernels:
            os.environ["SEQPAR_ATTN_KERNEL"] = kernel
            try:
                def single():
                    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                    kernels.flash_attn(*leaves, causal=True, cu_seqlens=cu).backward(do)
                t_single = _max_over_ranks(timer(single), device)
            except Exception as e:
                row[kernel] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                continue
            for layout, steps in layouts.items():
                key = kernel if layout == "zigzag" else f"{kernel}_{layout}"  # "flash": the sim reads it
                try:
                    row[key] = _packed_layout(q, k, v, do, cu, layout, steps, t_single, timer, device, world)
                except Exception as e:
                    row[key] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            if "allgather" in args.methods:  # the all-gather over the zigzag chunks
                try:
                    row[f"{kernel}_allgather"] = _packed_allgather(q, k, v, do, cu, t_single, timer, device, world)
                except Exception as e:
                    row[f"{kernel}_allgather"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        _report(row, rows)
        del q, k, v, do
    return rows


def _packed_layout(q, k, v, do, cu, layout, steps, t_single, timer, device, world):
    local = [shard_sequence(t, layout=layout, cu_seqlens=cu) for t in (q, k, v, do)]
    t_rank = timer(lambda: _ring_step(*local, cu=cu, layout=layout))
    times = _all_ranks(t_rank, device)
    works = _all_ranks(sum(b.work() for step in steps for b in step), device)
    calls = _all_ranks(sum(len(step) for step in steps), device)
    out = dict(single_ms=t_single, ring_ms=max(times), efficiency=round(t_single / (world * max(times)), 3),
               rank_ms=[round(t, 3) for t in times], rank_work=[int(w) for w in works],
               work_imbalance=round(max(works) / (sum(works) / world), 3),
               time_imbalance=round(max(times) / (sum(times) / world), 3),
               calls_per_rank=[int(c) for c in calls], local_rows=local[0].shape[1])
    if layout == "doc_balanced":
        plan = document_plan(layout, cu, world)
        out.update(cut_docs=len(plan.placement.split), travel_rows=plan.split_len)
    if layout in DOC_LAYOUTS:
        with _without_comm():
            out["compute_only_ms"] = _max_over_ranks(timer(lambda: _ring_step(*local, cu=cu, layout=layout)), device)
        out["exposed_comm_ms"] = round(out["ring_ms"] - out["compute_only_ms"], 3)
        o = unshard_sequence(_ring_step(*local, cu=cu, layout=layout).detach(), layout=layout, cu_seqlens=cu)
        ref = kernels.flash_attn(q, k, v, causal=True, cu_seqlens=cu)
        out["max_abs_diff_vs_single"] = _max_abs_diff(o, ref)
    return out


def _packed_allgather(q, k, v, do, cu, t_single, timer, device, world):
    from seqpar.attention.allgather import allgather_attention
    local = [shard_sequence(t, layout="zigzag") for t in (q, k, v, do)]

    def step():
        leaves = [t.detach().requires_grad_() for t in local[:3]]
        o = allgather_attention(*leaves, cu_seqlens=cu, layout="zigzag")
        o.backward(local[3])
        return o
    times = _all_ranks(timer(step), device)
    o = unshard_sequence(timer.last.detach(), layout="zigzag")
    return dict(single_ms=t_single, allgather_ms=max(times), efficiency=round(t_single / (world * max(times)), 3),
                rank_ms=[round(t, 3) for t in times],
                max_abs_diff_vs_single=_max_abs_diff(o, kernels.flash_attn(q, k, v, causal=True, cu_seqlens=cu)))


def _report(row, rows):
    rows.append(row)
    if dist.get_rank() == 0:
        print(json.dumps(row), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqpar.bench ring", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seq-lens", type=int, nargs="*", default=None, help="dense total S (default 32768 131072)")
    p.add_argument("--packed-lens", type=int, nargs="*", default=None, help="packed total S (default 65536 131072)")
    p.add_argument("--kernels", nargs="*", default=["cudnn", "flash"], choices=sorted(FAMILIES))
    p.add_argument("--torch-cp-rotate", nargs="*", default=["allgather", "alltoall"])
    p.add_argument("--methods", nargs="*", default=["ring"],
                   help="dense cases: also ulysses and usp:U (U = the Ulysses degree inside the world)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="dense cases: every family's times once per round, in turn; medians over the rounds")
    p.add_argument("--comm-priority", choices=("normal", "high"), default=None,
                   help="the ring's NCCL streams: a communicator of its own whose streams run at high priority, "
                        "as training's cp group (high, the default on CUDA), or the default group's (normal)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: must be >= 1")

    global RING_GROUP
    cuda = torch.cuda.is_available()
    if args.comm_priority == "high" and not cuda:
        raise SystemExit("--comm-priority high: needs CUDA and NCCL (gloo has no stream priority); drop the flag")
    device = init_world(cuda)
    args.comm_priority = args.comm_priority or ("high" if cuda else "normal")
    if args.comm_priority == "high":
        RING_GROUP = dist.new_group(list(range(dist.get_world_size())), pg_options=attention_comm_options())
    if cuda:
        args.heads, args.head_dim, args.dtype = 32, 128, torch.bfloat16
    else:  # smoke form: small shapes through the reference kernels on gloo
        args.heads, args.head_dim, args.dtype = 4, 32, torch.float32
        args.kernels, args.iters, args.warmup = args.kernels[:1], 2, 1
    args.seq_lens = args.seq_lens if args.seq_lens is not None else ([32768, 131072] if cuda else [512])
    args.packed_lens = args.packed_lens if args.packed_lens is not None else ([65536, 131072] if cuda else [1024])
    world = dist.get_world_size()
    timer = _timer(device, args.iters, args.warmup)
    try:
        result = dict(
            benchmark="ring", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu", world=world,
            torch=torch.__version__, triton=_triton_version(), python=platform.python_version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None, dtype=str(args.dtype),
            anchor="torch.distributed.tensor.experimental.context_parallel, same run, same kernel family",
            transport=transport(),  # the ring's transfers: NCCL's kernels or the copy engines (SEQPAR_RING_TRANSPORT)
            keep_kv=keep_kv(),  # a ring of 2 keeping the peer's K/V for the backward (SEQPAR_RING_KEEP_KV)
            comm_priority=args.comm_priority,
            rounds=args.rounds, dense=bench_dense(args, device, timer, world),
            packed=bench_packed(args, device, timer, world))
        if dist.get_rank() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None
