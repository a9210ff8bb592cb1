"""`python -m seqpar.bench lasp --out FILE.json`: linear-attention sequence parallelism, fwd+bwd.

Run under torchrun over the GPUs of one host (2 for the issue's figures):
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    torchrun --nproc_per_node=2 -m seqpar.bench lasp --out lasp.json
bf16, H=32, D=128, one document of 64k, 256k and 1M tokens in total. Per total length: one GPU on
the whole sequence (every rank at once, no communication), then each method over the group:
LASP-2 (all-gather scan, contiguous and zigzag), LASP-2 with the pipelined scan, LASP-2's overlapped
schedule (the exchange hidden behind extra passes over each chunk), LASP-1
(sequential ring), and the token alternative (all-gather K and V, the way softmax layers share
keys; up to --kv-max-tokens, as it needs the whole sequence's K and V on every GPU). Efficiency = one-GPU time for the whole sequence / (world x the
method's time), as in ANCHORS.md; where one GPU cannot hold the whole sequence, from half of it
(`efficiency_from_half`: T1(S/world) / T). Bytes per layer: what one fwd+bwd hands to
torch.distributed on a rank (`seqpar.parallel.traffic`). With `--rounds R` every measure (one GPU,
its half, each method) is timed once per round, in turn, and each takes its median over the rounds:
drift of the GPUs' clocks or of a neighbour then hits all of them alike (2 H100, 2026-11-27: the one-GPU
64k run timed first, alone, read 5.51 ms against 4.7-4.8 in other runs, efficiency 1.045). Needs torch
(+ triton for the kernel).
Off CUDA it runs a small gloo smoke form (`--tokens 2048 --heads 4 --dim 16`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch
import torch.distributed as dist

from seqpar import kernels
from seqpar.attention.lasp import lasp2_attention, lasp_attention
from seqpar.attention.lasp1 import lasp1_attention
from seqpar.parallel.dims import init_world
from seqpar.parallel.sharding import depend_on, group_size_rank, shard_sequence, unshard_sequence
from seqpar.parallel.traffic import count_traffic


def _kv_allgather(q, k, v, *, log_decay, layout):
    """Exact linear attention from gathered tokens: each rank folds every earlier token itself."""
    world, rank = group_size_rank(None)
    if layout != "contiguous":
        raise ValueError("kv_allgather is written for the contiguous layout")
    k_all, v_all = (unshard_sequence(t, layout="contiguous") for t in (k, v))  # grows with S
    S_local = q.shape[1]
    if rank == 0:  # needs no earlier token, but must join the gathers' mirrored backward
        return depend_on(kernels.lightning_attn(q, k, v, log_decay)[0], k_all, v_all)
    prefix = slice(0, rank * S_local)
    _, state = kernels.lightning_attn(torch.zeros_like(k_all[:, prefix]), k_all[:, prefix], v_all[:, prefix],
                                      log_decay, output_final_state=True)
    return kernels.lightning_attn(q, k, v, log_decay, initial_state=state)[0]


METHODS = {  # name: (layout, fn(q, k, v, log_decay, layout))
    "lasp2": ("contiguous", lambda q, k, v, lam, lay: lasp2_attention(q, k, v, log_decay=lam, layout=lay)),
    "lasp2_zigzag": ("zigzag", lambda q, k, v, lam, lay: lasp2_attention(q, k, v, log_decay=lam, layout=lay)),
    "lasp2_pipelined": ("contiguous", lambda q, k, v, lam, lay: lasp2_attention(q, k, v, log_decay=lam, layout=lay,
                                                                                scan="pipelined")),
    "lasp2_overlapped": ("contiguous", lambda q, k, v, lam, lay: lasp_attention(
        q, k, v, lam, group=None, cu_seqlens=None, scale=None, layout=lay, scan="allgather", overlap=True)),
    "lasp1": ("contiguous", lambda q, k, v, lam, lay: lasp1_attention(q, k, v, log_decay=lam, layout=lay)),
    "kv_allgather": ("contiguous", lambda q, k, v, lam, lay: _kv_allgather(q, k, v, log_decay=lam, layout=lay)),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


WINDOWS = 3


def _time_ms(step, device, iters, warmup, distributed, windows=WINDOWS):
    """Mean ms of `iters` back-to-back steps (the host may run ahead, as in training), the median
    of `windows` such windows: one host hiccup in a window of a few ms-long steps moved a 2 H100
    figure by 1.3x (2026-11-26 seventh session, docs/benchmarks)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(windows):
        _sync(device)
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3 / iters)
    return sorted(times)[len(times) // 2]


def _inputs(shape, dv, device, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k = (torch.randn(*shape, generator=gen, device=device, dtype=dtype) for _ in range(2))
    v, do = (torch.randn(*shape[:-1], dv, generator=gen, device=device, dtype=dtype) for _ in range(2))
    return q, k, v, do


def _fwd_bwd(fn, q, k, v, do):
    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(do)
    return step


def _single(tokens, args, device, lam):
    """One GPU on the whole sequence; None where it does not fit."""
    try:
        q, k, v, do = (t.requires_grad_() if i < 3 else t for i, t in
                       enumerate(_inputs((1, tokens, args.heads, args.dim), args.dim, device, args.dtype, seed=1)))
        step = _fwd_bwd(lambda a, b, c: kernels.lightning_attn(a, b, c, lam)[0], q, k, v, do)
        return _time_ms(step, device, args.iters, args.warmup, distributed=False, windows=args.windows)
    except torch.OutOfMemoryError:
        return None
    finally:
        q = k = v = do = step = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _parallel(name, tokens, args, device, lam, world):
    layout, fn = METHODS[name]
    local = tokens // world
    q, k, v, do = _inputs((1, local, args.heads, args.dim), args.dim, device, args.dtype, seed=2 + dist.get_rank())
    for t in (q, k, v):
        t.requires_grad_()
    step = _fwd_bwd(lambda a, b, c: fn(a, b, c, lam, layout), q, k, v, do)
    with count_traffic() as traffic:
        step()
    ms = _time_ms(step, device, args.iters, args.warmup, distributed=True, windows=args.windows)
    times = [None] * world
    dist.all_gather_object(times, ms)
    return dict(method=name, layout=layout, ms=max(times), ms_per_rank=times, bytes_per_layer=traffic.total_bytes,
                calls=dict(traffic.calls))


def _check(args, device, lam, world):
    """bf16 outputs of each method against one GPU on the same 64k-or-less sequence (a sanity check)."""
    tokens = min(*args.tokens, 65536)  # 1M-token methods' outputs in fp32 would not fit beside each other
    q, k, v, _ = _inputs((1, tokens, args.heads, args.dim), args.dim, device, args.dtype, seed=0)
    ref = kernels.lightning_attn(q, k, v, lam)[0].float()
    errs = {}
    with torch.no_grad():
        for name, (layout, fn) in METHODS.items():
            local = [shard_sequence(t, layout=layout) for t in (q, k, v)]
            out = unshard_sequence(fn(*local, lam, layout), layout=layout).float()
            errs[name] = ((out - ref).norm() / ref.norm()).item()
    return errs


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m seqpar.bench lasp", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write (by rank 0)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="total sequence lengths")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of: {', '.join(METHODS)}")
    p.add_argument("--kv-max-tokens", type=int, default=262144,
                   help="longest total sequence for kv_allgather (a rank that runs out of memory hangs its peer)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1,
                   help="time every measure once per round, in turn, one window each; medians over the rounds")
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: must be >= 1")
    args.windows = WINDOWS if args.rounds == 1 else 1
    cuda = torch.cuda.is_available()
    args.tokens = args.tokens or ([65536, 262144, 1048576] if cuda else [2048])
    args.heads = args.heads or (32 if cuda else 4)
    args.dim = args.dim or (128 if cuda else 16)
    args.dtype = torch.bfloat16 if cuda else torch.float32
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; known: {', '.join(METHODS)}")

    device = init_world(cuda)
    world, rank = dist.get_world_size(), dist.get_rank()
    # per-head decays of lightning attention's kind, from -1/2 to -1/256
    lam = -torch.linspace(1, 8, args.heads, device=device).exp2().reciprocal()

    rows = []
    for tokens in args.tokens:
        names = [n for n in methods if not (n == "kv_allgather" and tokens > args.kv_max_tokens)]
        singles, halves, runs = [], [], {name: [] for name in names}
        for _ in range(args.rounds):
            singles.append(_slowest(_single(tokens, args, device, lam)))
            halves.append(_slowest(_single(tokens // world, args, device, lam)))
            for name in names:
                runs[name].append(_parallel(name, tokens, args, device, lam, world))
        single, half = _median(singles), _median(halves)
        for name in names:
            row = dict(tokens=tokens, **_median(runs[name], key=lambda r: r["ms"]), single_ms=single,
                       single_half_ms=half)
            if args.rounds > 1:
                row.update(rounds_ms=[r["ms"] for r in runs[name]], rounds_single_ms=singles,
                           rounds_single_half_ms=halves)
            row["efficiency"] = None if single is None else single / (world * row["ms"])
            row["efficiency_from_half"] = None if half is None else half / row["ms"]
            row["tokens_per_s_per_gpu"] = tokens / world / (row["ms"] / 1e3)
            rows.append(row)
            if rank == 0:
                print(_line(row), flush=True)
    try:
        check = _check(args, device, lam, world)
    except torch.OutOfMemoryError as e:  # keep the timings measured above
        check = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    if rank == 0:
        result = dict(bench="lasp", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      device=torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                      world=world, torch=torch.__version__, python=platform.python_version(), cuda=torch.version.cuda,
                      triton=_triton_version(), kernel=kernels.backend("lightning_attn", *_probe(args, device), lam),
                      heads=args.heads, dim=args.dim, dtype=str(args.dtype).removeprefix("torch."),
                      iters=args.iters, warmup=args.warmup, rounds=args.rounds, rows=rows,
                      rel_err_vs_single_gpu=check)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(check), flush=True)
    dist.destroy_process_group()
    return 0


def _median(values, key=None):
    """The middle of `values` by `key` (the lower middle of an even count); None if any is None."""
    if any(v is None for v in values):
        return None
    return sorted(values, key=key)[(len(values) - 1) // 2]


def _slowest(ms):
    """Every rank timed its own single-GPU run; the slowest one counts (None if any did not fit)."""
    times = [None] * dist.get_world_size()
    dist.all_gather_object(times, ms)
    return None if None in times else max(times)


def _probe(args, device):
    x = torch.empty(1, 1, args.heads, args.dim, device=device, dtype=args.dtype)
    return x, x, x


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _line(row):
    eff = "-" if row["efficiency"] is None else f"{row['efficiency']:.3f}"
    half = "-" if row["efficiency_from_half"] is None else f"{row['efficiency_from_half']:.3f}"
    return (f"{row['tokens']:>8} {row['method']:<17} {row['ms']:9.2f} ms  eff {eff:>5} (from half {half:>5})  "
            f"{row['bytes_per_layer'] / 2**20:9.2f} MiB/layer  {row['tokens_per_s_per_gpu'] / 1e6:6.2f} Mtok/s/GPU")
