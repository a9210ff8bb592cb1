"""Registers and stack (spills) of the lightning kernels and the flash dk/dv kernel per config, compiled for
sm_90a without a GPU.

ptxas decides whether a kernel spills; Triton can compile for a target without a device, and the
cubin's resource usage (`cuobjdump --dump-resource-usage`) says REG (per thread) and STACK (bytes per
thread, spill slots included). At 4 warps, 255 registers allow two programs per SM; a nonzero STACK
at 255 registers means spills to local memory inside the loop. Use the GPU machine's Triton, not the
newer one a CPU machine may have (their register allocation differs):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.11 \\
        --platform manylinux_2_28_x86_64 -d /tmp/t36 triton==3.6.0
    mkdir /tmp/tr36 && python3 -m zipfile -e /tmp/t36/triton-3.6.0-*.whl /tmp/tr36
    chmod +x /tmp/tr36/triton/backends/nvidia/bin/*
    PYTHONPATH=/tmp/tr36 TRITON_CACHE_DIR=/tmp/tc36 python3 docs/benchmarks/kernel_registers.py

Prints one line per kernel and config. The twenty-fifth session found the lightning output pass at the tuner's
pick (2, 4, 2, TMA) on 255 registers and a 496-byte stack; 0231d9c took it to 24 (10-21% faster on H100). The
flash dk/dv kernel's D=64 pick (128, 32, 4, 3, SPLIT) spills 768-968 B; b959a35 (reverted, not timed) took it to
248-352 B.
"""
import os
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from seqpar.kernels.flash_attn import triton as ft
from seqpar.kernels.lightning_attn import triton as lt

# pointers not named here point to bf16
_POINTERS = {"seg_ptr": "*i32", "lam_ptr": "*fp32", "bound_ptr": "*fp32", "edge_in_ptr": "*fp32",
             "edge_out_ptr": "*fp32", "local_ptr": "*fp32", "tail_ptr": "*fp32", "lse2_ptr": "*fp32",
             "delta_ptr": "*fp32", "tiles_ptr": "*i32", "cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "flag_ptr": "*i32"}
_SCALARS = ("intra_scale", "read_scale", "update_scale", "qk_scale", "sm_scale")


def usage(kernel, constexprs, num_warps, num_stages):
    """(registers, stack bytes) per thread of `kernel` (a Tuned kernel) with these constexprs."""
    fn = kernel.tuner.fn
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = _POINTERS.get(name, "*bf16")
        else:
            signature[name] = "fp32" if name in _SCALARS else "i32"
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(part for part in text.splitlines() if "REG:" in part)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    return int(fields["REG"]), int(fields["STACK"])


def main():
    dims = dict(DY=128, DZ=128, BLOCK_DY=128, BLOCK_DZ=128, DOT=tl.bfloat16, PRECISION="tf32")
    print(f"triton {triton.__version__}, sm_90a, D=128 bf16")
    for reverse in (False, True):
        for z, w, s in [(2, 4, 2), (1, 8, 2), (2, 8, 2)]:
            for tma, chain in ((True, False), (False, False), (True, True)):
                consts = dict(dims, C=lt.CHUNK, REVERSE=reverse, HAS_EDGE_IN=False, STORE_EDGE_OUT=False, TMA=tma,
                              CHAIN=chain, Z_SPLIT=z)
                regs, stack = usage(lt._segment_output, consts, w, s)
                print(f"_segment_output reverse={reverse} Z_SPLIT={z} warps={w} stages={s} TMA={tma} CHAIN={chain}: "
                      f"{regs} registers, {stack} B stack", flush=True)
        for z, w, s in [(1, 8, 2), (2, 8, 2), (2, 4, 3)]:
            consts = dict(dims, C=lt.CHUNK, REVERSE=reverse, TAILS=True, TMA=True, Z_SPLIT=z)
            regs, stack = usage(lt._segment_state, consts, w, s)
            print(f"_segment_state reverse={reverse} Z_SPLIT={z} warps={w} stages={s} TMA=True: "
                  f"{regs} registers, {stack} B stack", flush=True)
    for head_dim in (128, 64):
        for keys, queries, w, s, split in ft._DKDV_OPTIONS:
            for varlen in (False, True):
                consts = dict(HEAD_DIM=head_dim, CAUSAL=True, VARLEN=varlen, ACCUM=False, DOT=tl.bfloat16,
                              PRECISION="tf32", TMA=True, BLOCK_M=queries, BLOCK_N=keys, SPLIT=split)
                regs, stack = usage(ft._attn_bwd_dkdv, consts, w, s)
                print(f"_attn_bwd_dkdv D={head_dim} keys={keys} queries={queries} warps={w} stages={s} "
                      f"SPLIT={split} varlen={varlen} TMA=True: {regs} registers, {stack} B stack", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
