"""Does LASP-2's host wait for the GPU inside a step? (issue 4; the twenty-third session's steady-state profile,
`lasp_steady_gpu.py`: at 32k tokens per GPU the GPU computes 2.43-2.48 ms of a 2.89 ms step, idle the rest,
where the kernel alone keeps it busy.) Per rank:
1. a probe: ~5 ms of matmuls queued, an async all-gather behind them, then the host time of `work.wait()`
   (microseconds if it only orders the stream, milliseconds if it blocks the host);
2. LASP-2 fwd+bwd, 30 steps: host time to enqueue each step, the step's GPU time, and the host time spent
   inside every `work.wait()` of the state exchange (`state_scan._Gathered.settle`), and CUDA's sync debug
   mode's warnings (host-device syncs) over one step.

    torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_hostwait_gpu.py OUT.json [LOCAL_TOKENS]
"""
import json
import sys
import time
import warnings

import torch
import torch.distributed as dist

from lasp_host import layer_inputs  # this folder's (scripts run from it)
from seqpar.attention import lasp2_attention, state_scan
from seqpar.parallel.dims import init_world


def main(out, local):
    device = init_world(True)
    rank, world = dist.get_rank(), dist.get_world_size()
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    x = torch.randn(32, 128, 128, device=device)
    parts = x.new_empty(world * 32, 128, 128)
    for _ in range(3):
        dist.all_gather_into_tensor(parts, x)
    torch.cuda.synchronize()
    probe = []
    for _ in range(5):
        for _ in range(8):
            a = (a @ a).clamp_(-1, 1)
        work = dist.all_gather_into_tensor(parts, x, async_op=True)
        t0 = time.perf_counter()
        work.wait()
        probe.append(round((time.perf_counter() - t0) * 1e3, 4))
        torch.cuda.synchronize()

    waits = []
    settle = state_scan._Gathered.settle

    def timed_settle(self):
        t0 = time.perf_counter()
        settle(self)
        waits.append((time.perf_counter() - t0) * 1e3)

    state_scan._Gathered.settle = timed_settle
    lam, q, k, v, do = layer_inputs(device, rank, local)

    def step():
        for t in (q, k, v):
            t.grad = None
        lasp2_attention(q, k, v, log_decay=lam).backward(do)

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    waits.clear()
    host = []
    for _ in range(30):
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(30):
        step()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) * 1e3 / 30
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode("default")
    syncs = sorted({str(w.message)[:200] for w in caught})
    mine = dict(rank=rank, probe_wait_ms=probe, host_enqueue_ms_mean=round(sum(host) / len(host), 4),
                host_enqueue_ms=[round(h, 3) for h in host[:10]], step_ms_back_to_back=round(per_step, 4),
                settle_host_ms_mean=round(sum(waits[:60]) / max(1, len(waits[:60])), 4),
                settle_host_ms=[round(w, 3) for w in waits[:12]], sync_warnings=syncs)
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(dict(local_tokens=local, device=torch.cuda.get_device_name(), ranks=every), f, indent=1)
        for r in every:
            print(json.dumps(r)[:1500])
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32768)
