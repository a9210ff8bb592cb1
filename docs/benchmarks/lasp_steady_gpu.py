"""Where LASP-2's time goes at 64k tokens on 2 GPUs in steady state (issue 4: 0.86-0.935 against 0.97,
while the kernel alone on half the tokens is flat). The twenty-first session's profile was of one cold
step; here every variant runs 10 warm steps, then 50 timed back-to-back steps (per rank, CUDA synced
at the ends), in rounds, variants in turn; then 20 steps under torch.profiler: per rank and step, each
kernel's mean time, the union of compute (every kernel but NCCL's) and the GPU's idle time in the window.

Variants: the kernel alone on the rank's 32k tokens (no communication); LASP-2 on the default group;
LASP-2 with its exchange on a group whose NCCL kernels take at most 2 CTAs (`max_ctas`: fewer SMs
taken from the dq pass the backward's gather runs beside); and on a group with high-priority streams.

    torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_steady_gpu.py OUT.json [LOCAL_TOKENS] [ROUNDS]
"""
import json
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from lasp_host import _steps, layer_inputs  # this folder's (scripts run from it)
from seqpar import kernels
from seqpar.attention import lasp2_attention
from seqpar.parallel.dims import init_world


def _group(**config):
    """A 2-rank NCCL group with `config` set on its ncclConfig (None where this torch has no such option)."""
    try:
        opts = dist.ProcessGroupNCCL.Options()
        for key, value in config.items():
            if key == "high_priority":
                opts.is_high_priority_stream = value
            else:
                setattr(opts.config, key, value)
        return dist.new_group(list(range(dist.get_world_size())), backend="nccl", pg_options=opts)
    except Exception as e:  # recorded, not fatal
        print("group", config, "unavailable:", repr(e)[:200], flush=True)
        return None


def _profile(fn, q, k, v, do, n=20):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        _steps(fn, q, k, v, do, n)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / n
    kern = defaultdict(float)
    spans = []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name
        dur = e.time_range.elapsed_us()
        kern[name[:60]] += dur / n / 1e3
        if "nccl" not in name.lower():
            spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    busy, end = 0.0, None
    for s, t in spans:
        if end is None or s > end:
            busy += t - s
            end = t
        elif t > end:
            busy += t - end
            end = t
    top = dict(sorted(((k, round(v, 4)) for k, v in kern.items()), key=lambda kv: -kv[1])[:12])
    return dict(profiled_wall_ms=round(wall, 4), compute_union_ms=round(busy / n / 1e3, 4), kernels_ms=top)


def main(out, local, rounds):
    device = init_world(True)
    rank, world = dist.get_rank(), dist.get_world_size()
    H, D = 32, 128
    lam, q, k, v, do = layer_inputs(device, rank, local, H, D)
    fns = {"kernel_alone": lambda a, b, c: kernels.lightning_attn(a, b, c, lam)[0],
           "lasp2": lambda a, b, c: lasp2_attention(a, b, c, log_decay=lam)}
    for name, config in (("lasp2_max_ctas2", dict(max_ctas=2)), ("lasp2_hiprio", dict(high_priority=True))):
        g = _group(**config)
        if g is not None:
            fns[name] = lambda a, b, c, g=g: lasp2_attention(a, b, c, log_decay=lam, group=g)
    result = {name: dict(rounds_ms=[]) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _steps(fn, q, k, v, do, 10)
            torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            _steps(fn, q, k, v, do, 50)
            torch.cuda.synchronize()
            result[name]["rounds_ms"].append(round((time.perf_counter() - t0) * 1e3 / 50, 4))
    for name, fn in fns.items():
        dist.barrier()
        result[name].update(_profile(fn, q, k, v, do))
        r = result[name]["rounds_ms"]
        result[name]["median_ms"] = sorted(r)[len(r) // 2]
    every = [None] * world
    dist.all_gather_object(every, result)
    if rank == 0:
        doc = dict(local_tokens=local, H=H, D=D, world=world, rounds=rounds,
                   device=torch.cuda.get_device_name(), ranks=every)
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
        for name in fns:
            meds = [every[r][name]["median_ms"] for r in range(world)]
            print(f"{name:18} ms per rank {meds} rounds {[every[r][name]['rounds_ms'] for r in range(world)]}")
            for r in range(world):
                x = every[r][name]
                print(f"   rank {r}: profiled {x['profiled_wall_ms']} ms, compute {x['compute_union_ms']} ms,",
                      json.dumps(x["kernels_ms"])[:600])
        kern = min(every[r]["kernel_alone"]["median_ms"] for r in range(world))
        print("LASP-2 / kernel alone:", {n: round(max(every[r][n]["median_ms"] for r in range(world)) / kern, 4)
                                          for n in fns})
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32768, int(sys.argv[3]) if len(sys.argv) > 3 else 3)
