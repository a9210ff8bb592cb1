"""Issue 3 at 32k on 2 GPUs: how much of the ring's loss is its block shapes and merges, and would a
merge-free "prefix" schedule (each rank's contiguous query range against its whole causal prefix
of keys, one call, causal aligned bottom-right; K/V gathered first) do better. One GPU, no
communication: the kernel calls each schedule makes on each rank of a 2-rank zigzag ring, timed
fwd+bwd, against the one-GPU call, for both kernel families (FA2 and cuDNN, through the aten ops
seqpar's ring calls). Also: which way cuDNN aligns a causal mask when Sq < Sk (top-left, as SDPA
documents, or bottom-right), since a prefix call on cuDNN needs bottom-right. ~1 minute:

    python3 docs/benchmarks/ring_prefix_probe_gpu.py OUT.json
"""
import json
import sys

import torch

from seqpar.kernels.flash_attn.aten import attention_backward, attention_with_lse

aten = torch.ops.aten
H, D, S = 32, 128, 32768
C = S // 4  # zigzag chunk: rank 0 holds chunks 0, 3; rank 1 holds 1, 2


def cudnn_alignment():
    torch.manual_seed(0)
    sq, sk = 256, 1024
    q, k, v = (torch.randn(1, 4, n, D, device="cuda", dtype=torch.bfloat16) for n in (sq, sk, sk))
    try:
        out = aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, True, False)[0].float()
    except RuntimeError as e:
        return {"error": str(e)[:300]}
    res = {}
    for name, diag in (("top_left", 0), ("bottom_right", sk - sq)):
        mask = torch.ones(sq, sk, dtype=torch.bool, device="cuda").tril(diag)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        res[name] = (out - ref).abs().max().item()
    return res


def _time(fn, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def call_ms(kernel, sq, sk, causal):
    """(fwd ms, bwd ms) of one call: sq queries (the last sq positions) against sk keys."""
    q = torch.randn(1, sq, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, sk, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    out, lse = attention_with_lse(q, k, v, kernel=kernel, causal=causal)
    fwd = _time(lambda: attention_with_lse(q, k, v, kernel=kernel, causal=causal))
    bwd = _time(lambda: attention_backward(dout, q, k, v, out, lse, kernel=kernel, causal=causal))
    return fwd, bwd


# (forward calls, backward calls) per rank, each (sq, sk, causal): the ring's forward joins its own
# shard's blocks into one causal call, its backward splits them around the remote step
SCHEDULES = {
    "ring_rank0": ([(2 * C, 2 * C, True), (C, 2 * C, False)],
                   [(C, C, True), (C, 2 * C, False), (C, C, False), (C, C, True)]),
    "ring_rank1": ([(2 * C, 2 * C, True), (2 * C, C, False)],
                   [(C, C, True), (C, C, False), (C, C, True), (2 * C, C, False)]),
    "prefix_rank0": ([(C, C, True), (C, 4 * C, True)],) * 2,
    "prefix_rank1": ([(2 * C, 3 * C, True)],) * 2,
    "prefix_rank1_split_bwd": ([(2 * C, 3 * C, True)], [(2 * C, C, False), (2 * C, 2 * C, True)]),
}


def main(path):
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "S": S, "H": H, "D": D,
              "cudnn_causal_sq_lt_sk_max_diff": cudnn_alignment()}
    align = result["cudnn_causal_sq_lt_sk_max_diff"]
    cudnn_br = align.get("bottom_right", 1.0) < 2e-2  # then cuDNN serves the prefix calls too
    cache = {}

    def timed(kern, sq, sk, causal):
        if (kern, sq, sk, causal) not in cache:
            cache[kern, sq, sk, causal] = call_ms(kern, sq, sk, causal)
        return cache[kern, sq, sk, causal]

    for kernel in ("flash", "cudnn"):
        fwd, bwd = timed(kernel, S, S, True)
        rows = {"single_ms": fwd + bwd, "half_single_ms": (fwd + bwd) / 2}
        for name, (fwd_calls, bwd_calls) in SCHEDULES.items():
            # cuDNN: causal where Sq == Sk (top-left == bottom-right) or it aligns bottom-right; else FA2
            kern = lambda sq, sk, causal: kernel if (not causal or sq == sk or cudnn_br) else "flash"
            rows[name + "_ms"] = (sum(timed(kern(*c), *c)[0] for c in fwd_calls)
                                  + sum(timed(kern(*c), *c)[1] for c in bwd_calls))
        result[kernel] = rows
        print(kernel, json.dumps(rows, indent=1), flush=True)
    result["calls_ms"] = {f"{k}:{sq}x{sk}:{'causal' if c else 'full'}": {"fwd": t[0], "bwd": t[1]} for (k, sq, sk, c), t in cache.items()}
    print(json.dumps(result["cudnn_causal_sq_lt_sk_max_diff"]))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
