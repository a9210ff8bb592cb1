"""What cuDNN's graphs cost on the host (kernels/flash_attn/cudnn_graph.py), one H100 (~1 min):

    PYTHONPATH=/tmp/cfe python3 docs/benchmarks/cudnn_graph_build_gpu.py OUT.json

Per geometry (document slots, longest query / key run, llama_1b's heads 32/8 x 64): the first
forward and backward (their graphs built) against the next ones, each graph's workspace, and the
host time of one call (the mean of 20 calls queued without a sync, over the GPU time they take).
"""
import json
import sys
import time

import torch

from seqpar.kernels.flash_attn import cudnn_graph as cg


def main(out_path):
    rows = []
    hq, hkv, d = 32, 8, 64
    for lq, lk in (([4096] * 8, [4096] * 8), ([8192, 1000, 300], [57344, 1000, 300]), ([2048] * 30, [30720] * 30)):
        g = torch.Generator(device="cuda").manual_seed(len(lq))
        q, do = (torch.randn(1, sum(lq), hq, d, device="cuda", generator=g).bfloat16() for _ in range(2))
        k, v = (torch.randn(1, sum(lk), hkv, d, device="cuda", generator=g).bfloat16() for _ in range(2))
        cu = [torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32, device="cuda") for n in (lq, lk)]
        kw = dict(causal=True, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1])

        def timed(fn):
            torch.cuda.synchronize()
            t = time.perf_counter()
            r = fn()
            torch.cuda.synchronize()
            return r, time.perf_counter() - t

        (out, lse), first_f = timed(lambda: cg.attention_forward(q, k, v, **kw))
        _, first_b = timed(lambda: cg.attention_backward(do, q, k, v, out, lse, **kw))
        _, next_f = timed(lambda: cg.attention_forward(q, k, v, **kw))
        _, next_b = timed(lambda: cg.attention_backward(do, q, k, v, out, lse, **kw))
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            cg.attention_forward(q, k, v, **kw)
        host = (time.perf_counter() - t) / 20
        torch.cuda.synchronize()
        gpu = (time.perf_counter() - t) / 20
        lay = cg.layout(tuple(cu[0].tolist()), tuple(cu[1].tolist()), True, "cuda")
        ws = {dirn: cg._graph(dirn == "bwd", lay.docs, lay.max_q, lay.max_k, hq, hkv, d, True, d ** -0.5,
                              torch.bfloat16, 0, lay.square, (lay.total_q, lay.total_k) if dirn == "bwd" else ())[2]
              for dirn in ("fwd", "bwd")}
        row = dict(docs=len(lq), slots=lay.docs, max_q=lay.max_q, max_k=lay.max_k, first_fwd_s=round(first_f, 3),
                   first_bwd_s=round(first_b, 3), next_fwd_s=round(next_f, 4), next_bwd_s=round(next_b, 4),
                   host_per_fwd_ms=round(host * 1e3, 3), gpu_per_fwd_ms=round(gpu * 1e3, 3), workspace_bytes=ws)
        rows.append(row)
        print(json.dumps(row), flush=True)
    json.dump(rows, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
