"""Is cuDNN's first heuristic plan the fastest for seqpar's attention graphs? One H100 (~2 min):

    PYTHONPATH=/tmp/cfe python3 docs/benchmarks/cudnn_graph_plans_gpu.py OUT.json

kernels/flash_attn/cudnn_graph.py builds each graph with heuristics A then FALLBACK and runs the
first plan that builds. Here every plan of heuristics A, B and FALLBACK is built (build_plan_policy.ALL)
and timed (CUDA events, 5 runs after one), forward and backward, on the cases of the call-5 probe:
a packed lognormal 16k row at 32 x 128 (issue 5: 8.74 ms fwd+bwd there, 1.3x FlexAttention needs
~8.5), a piece of 8k queries over 56k keys and 30 pieces of 2k over 30k at llama_1b's heads (issue 10).
If a later plan wins, the module should time its plans once per geometry (as cudnn's own
gemm.swiglu_mlp does) instead of taking the first.
"""
import json
import sys
import traceback

import torch

from seqpar.bench.ring import lognormal_lengths
from seqpar.kernels.flash_attn import cudnn_graph as cg


def _case(lq, lk, hq, hkv, d, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, do = (torch.randn(1, sum(lq), hq, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    k, v = (torch.randn(1, sum(lk), hkv, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    cu = [torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32, device="cuda") for n in (lq, lk)]
    return q, k, v, do, cu


def _plans(backward, lay, q, k, bufs, scale, reps=5):
    """[(plan name, ms or error)] of every plan of this direction's graph."""
    cudnn = cg._frontend()
    index = torch.cuda.current_device()
    g, t = cg._declare(backward, lay.docs, lay.max_q, lay.max_k, q.shape[2], k.shape[2], q.shape[3], lay.causal,
                       float(scale), q.dtype, index, lay.square, (lay.total_q, lay.total_k) if backward else ())
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans(cudnn.build_plan_policy.ALL)
    handle = cg._handle(index)
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    feed = cg._feed(lay, t, q, k, bufs)
    out = []
    for i in range(g.get_execution_plan_count()):
        try:
            name = g.get_plan_name_at_index(i)
            ws = torch.empty(max(g.get_workspace_size_plan_at_index(i), 1), dtype=torch.uint8, device="cuda")
            g.execute_plan_at_index(feed, ws, index=i, handle=handle)
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(reps):
                g.execute_plan_at_index(feed, ws, index=i, handle=handle)
            b.record()
            b.synchronize()
            out.append((name, round(a.elapsed_time(b) / reps, 3), ws.numel()))
        except Exception as e:  # a plan may build but not run this geometry
            out.append((f"plan {i}", repr(e)[:200], None))
    return out


def main(out_path):
    rows = []
    cases = [("packed 16k lognormal, 32 x 128", lognormal_lengths(16384), None, (32, 32, 128)),
             ("piece 8k over 56k, 32/8 x 64", [8192], [57344], (32, 8, 64)),
             ("30 pieces 2k over 30k, 32/8 x 64", [2048] * 30, [30720] * 30, (32, 8, 64))]
    for name, lq, lk, (hq, hkv, d) in cases:
        try:
            q, k, v, do, cu = _case(lq, lk or lq, hq, hkv, d, seed=len(lq))
            lay = cg._layout_of(q, k, cu[0], cu[1], True)
            scale = d ** -0.5
            out, lse = cg.attention_forward(q, k, v, causal=True, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1])
            stats = cg.stats_from_lse(lse, lay)
            fwd = _plans(False, lay, q, k, dict(q=q, k=k, v=v, o=torch.empty_like(q),
                                                stats=torch.empty_like(stats)), scale)
            bwd = _plans(True, lay, q, k, dict(q=q, k=k, v=v, o=out, dO=do, stats=stats, dQ=torch.empty_like(q),
                                               dK=torch.empty_like(k), dV=torch.empty_like(v)), scale)
            row = dict(case=name, forward=fwd, backward=bwd)
        except Exception:
            row = dict(case=name, error=traceback.format_exc()[-1500:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    json.dump(rows, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
