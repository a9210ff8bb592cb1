"""A record: SEQPAR_SPLIT_SHORT_BWD existed from f64a9a0 to 8596805 (measured no faster, removed);
this ran at 6070991 (2026-11-28-gpu-21st call 4); at later code both families run Triton's backward.

The split's short-document backward on FlashAttention-2 against Triton at llama_1b's heads
(32/8, D = 64) and at 32 x 128, packed lognormal rows, one H100 (~2 min):

    python3 docs/benchmarks/split_short_bwd_heads_gpu.py OUT.json

At 32 x 128 `bench kernels` found no difference (2026-11-28 call 3); at 32/8 x 64 FA2's backward ran a
whole packed 16k row 25% faster than Triton's (call 2). Causal fwd+bwd ms of `flash_attn_split`
(triton.testing.do_bench, median), SEQPAR_SPLIT_SHORT_BWD=triton / flash alternating over 3 rounds,
with each family's largest gradient difference from the other.
"""
import json
import os
import sys

import torch
from triton.testing import do_bench

from seqpar.bench._flash_cases import case_inputs
from seqpar.bench.ring import lognormal_lengths
from seqpar.kernels.flash_attn.split import SHORT_BWD, SHORT_BWD_ENV, flash_attn_split


def main(out_path):
    device = torch.device("cuda")
    rows = []
    for hq, hkv, hd in ((32, 8, 64), (32, 32, 128)):
        for S in (16384, 65536):
            q, k, v, do, useful, cu = case_inputs(S, lognormal_lengths(S), device, hq, hkv, hd)
            fn = lambda: flash_attn_split(q, k, v, causal=True, cu_seqlens=cu).backward(do)  # noqa: E731
            grads, times = {}, {f: [] for f in SHORT_BWD}
            for _ in range(3):
                for fam in SHORT_BWD:
                    os.environ[SHORT_BWD_ENV] = fam
                    if fam not in grads:
                        grads[fam] = torch.autograd.grad(flash_attn_split(q, k, v, causal=True, cu_seqlens=cu),
                                                         (q, k, v), do)
                    times[fam].append(do_bench(fn, warmup=20, rep=200, return_mode="median", grad_to_none=[q, k, v]))
            diff = {n: (a.float() - b.float()).abs().max().item() for n, a, b in zip("qkv", *grads.values())}
            for fam in SHORT_BWD:
                ms = sorted(times[fam])[1]
                row = dict(heads=(hq, hkv, hd), S=S, short_bwd=fam, fwdbwd_ms=round(ms, 3),
                           fwdbwd_tflops=round(3.5 * useful / ms / 1e9, 1), rounds=[round(t, 3) for t in times[fam]],
                           max_abs_grad_diff_between_families=diff)
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.environ.pop(SHORT_BWD_ENV)
    json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows), open(out_path, "w"),
              indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
