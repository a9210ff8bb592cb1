import json, sys, torch
from triton.testing import do_bench
from seqpar.bench._fused_cases import _graphed
from seqpar.kernels.norm_rope.triton import rms_norm_triton, apply_rotary_triton
dev = torch.device("cuda")
out = []
for N in (2048, 4096):
    x = torch.randn(65536, N, device=dev, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(N, device=dev, dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn_like(x)
    y = rms_norm_triton(x, w, 1e-6)
    bwd = lambda: torch.autograd.grad(y, (x, w), dy, retain_graph=True)
    g = _graphed(bwd, dev)
    for rnd in range(3):
        e1 = do_bench(bwd, warmup=50, rep=300, return_mode="median")
        e8 = do_bench(lambda: [bwd() for _ in range(8)], warmup=50, rep=300, return_mode="median") / 8
        gr = do_bench(g, warmup=50, rep=300, return_mode="median")
        g8 = do_bench(lambda: [g() for _ in range(8)], warmup=50, rep=300, return_mode="median") / 8
        out.append(dict(N=N, round=rnd, eager1=e1, eager8=e8, graph1=gr, graph8=g8))
        print(out[-1], flush=True)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5): bwd()
        torch.cuda.synchronize()
        for _ in range(5): g()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
