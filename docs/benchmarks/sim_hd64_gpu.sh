# The attention rows the simulator lacks (issue 11, docs/sim.md Limits): head dim 64 with GQA 32/8
# (llama_1b's shape), fwd+bwd, bf16, one GPU, on the kernels the dispatcher picks in the measured
# whole steps: SDPA (dense, equal lengths: dp2/tp2 attention), seqpar's Triton kernel on a dense
# chunk whose queries see more keys than they are (all-gather SP, cp2), and the same shapes at head
# dim 128 MHA (the benches' shape) for the ratio. About 1 minute on one H100/H200; writes
# $OUT/sim_hd64.json and prints one line per row.
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/sim_hd64_gpu.sh
mkdir -p "$OUT"
timeout 300 python3 - "$OUT/sim_hd64.json" <<'EOF'
import json, sys, datetime
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench
from seqpar import kernels
from seqpar.kernels.flash_attn.triton import flash_attn_triton

dev = torch.device("cuda")
rows = []
import inspect
PRIORITY = {"set_priority": True} if "set_priority" in inspect.signature(sdpa_kernel).parameters else {}


def pairs(nq, nk):  # causal, bottom-right aligned
    return nq * nk - nq * (nq - 1) / 2


def run(kernel, nq, nk, H, Hkv, D):
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, nq, H, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, nk, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, nk, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    do = torch.randn(1, nq, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    if kernel == "sdpa":  # what kernels/sdpa.py runs for a dense one-document row (cuDNN first)
        def fwd():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], **PRIORITY):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True, enable_gqa=H != Hkv).transpose(1, 2)
    elif kernel == "sdpa_flash":
        def fwd():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True, enable_gqa=H != Hkv).transpose(1, 2)
    elif kernel == "triton":
        fwd = lambda: flash_attn_triton(q, k, v, causal=True)
    else:  # the dispatcher's own choice for this call
        fwd = lambda: kernels.flash_attn(q, k, v, causal=True)
    step = lambda: fwd().backward(do)
    try:
        ms = do_bench(step, warmup=20, rep=100, return_mode="median", grad_to_none=[q, k, v])
    except Exception as e:  # a kernel that does not take the case: say so, keep going
        rows.append(dict(kernel=kernel, nq=nq, nk=nk, H=H, Hkv=Hkv, D=D, error=f"{type(e).__name__}: {e}"[:300]))
        print(rows[-1])
        return
    tf = 3.5 * 4 * H * D * pairs(nq, nk) / (ms * 1e-3) / 1e12
    rows.append(dict(kernel=kernel, nq=nq, nk=nk, H=H, Hkv=Hkv, D=D, fwdbwd_ms=round(ms, 3), fwdbwd_tflops=round(tf, 1)))
    print(f"{kernel:11s} q {nq:6d} k {nk:6d} H {H}/{Hkv} D {D}: {ms:8.3f} ms {tf:6.1f} TFLOP/s")


for D, Hkv in ((64, 8), (128, 32)):
    for nq, nk in ((16384, 16384), (32768, 32768), (8192, 32768), (8192, 16384)):
        for kernel in ("sdpa", "sdpa_flash", "triton", "dispatch"):
            if kernel.startswith("sdpa") and nq != nk:
                continue  # SDPA's causal mask is top-left aligned: not this case
            run(kernel, nq, nk, 32, Hkv, D)
json.dump(dict(bench="sim_hd64", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows),
          open(sys.argv[1], "w"), indent=1)
EOF
echo "sim_hd64: exit $?"
