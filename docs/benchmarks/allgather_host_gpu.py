"""Host microseconds of posting one all-gather of LASP-2's states (issue 4, twenty-fourth session: two of
them per fwd+bwd, ~120-250 us each in the profiles of LASP-2 at 32k tokens per GPU). 2 MiB per rank (a
[1, 1, 32, 128, 128] fp32 state), async, the mean over 300 posts (no wait inside the loop: the host cost
only), through torch.distributed's function and through the process group's own method (what the
function calls after its checks). Run it with and without TORCH_NCCL_TRACE_BUFFER_SIZE=0 (NCCL's flight
recorder) to see that part.

    torchrun --standalone --nproc_per_node 2 docs/benchmarks/allgather_host_gpu.py OUT.json
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from seqpar.parallel.dims import init_world


def _us(post, n=300):
    works = [post() for _ in range(20)]
    for w in works:
        w.wait()
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    works = [post() for _ in range(n)]
    host = (time.perf_counter() - t0) * 1e6 / n
    for w in works:
        w.wait()
    torch.cuda.synchronize()
    return round(host, 1)


def main(out):
    device = init_world(True)
    world = dist.get_world_size()
    x = torch.randn(1, 1, 32, 128, 128, device=device)
    parts = x.new_empty((world, *x.shape[1:]))
    pg = dist.distributed_c10d._get_default_group()
    opts = dist.distributed_c10d.AllgatherOptions()
    opts.asyncOp = True
    method = getattr(pg, "all_gather_single", None) or pg._allgather_base
    res = {"trace_buffer": os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE", "default"),
           "dist.all_gather_into_tensor": _us(lambda: dist.all_gather_into_tensor(parts, x, async_op=True)),
           "ProcessGroup method": _us(lambda: method(parts, x, opts)),
           "tiny torch op (x.add_(0))": _us(lambda: type("W", (), {"wait": lambda self: None})() if x.add_(0) is None
                                             else type("W", (), {"wait": lambda self: None})())}
    every = [None] * world
    dist.all_gather_object(every, res)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(every, f, indent=1)
        print(json.dumps(every))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
