# Simulator calibration on two GPUs of one node (device tool, kind nvidia-h100-x2), from the repo
# root with .whl carried; about 1.5 minutes:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/sim_gpu.sh
# 1. the collective sweep (4 KiB .. 256 MiB, every op seqpar issues) that seqpar.sim fits its
#    intra-node alpha-beta on; 2. validate with it, to see the prediction errors on this machine.
# Commit $OUT/comm_2gpu.json under docs/benchmarks/<date>-2xh100-comm/ for the next `validate`.
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
timeout 150 torchrun --standalone --nproc_per_node 2 -m seqpar.bench comm --out "$OUT/comm_2gpu.json" \
    > "$OUT/comm.log" 2>&1
grep -E '"op"' "$OUT/comm.log" | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    if r['bytes'] in (4096, 1 << 20, 1 << 24, 1 << 28):
        print(f\"{r['op']:<15} {r['bytes']:>10} B  {r.get('time_s', 0) * 1e6:10.1f} us  bus {r.get('busbw_GBps', r.get('error'))} GB/s\")
"
rm -rf /tmp/simbench && mkdir -p /tmp/simbench/new-comm && cp "$OUT/comm_2gpu.json" /tmp/simbench/new-comm/
for d in docs/benchmarks/*/; do cp -r "$d" /tmp/simbench/; done
SEQPAR_BENCH_DIR=/tmp/simbench timeout 60 python3 -m seqpar.sim validate --out "$OUT/validate_with_comm.json" 2>&1 | tail -8
