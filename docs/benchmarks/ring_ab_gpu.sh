#!/usr/bin/env bash
# A/B of two source trees on the ring benchmark, alternating A B A B (drift shows as a trend, not a
# difference): `A=DIR B=DIR bash docs/benchmarks/ring_ab_gpu.sh OUTDIR [bench ring args...]`, on 2 GPUs.
# Default args: 32k, the ring with FA2 and cuDNN, the peer's K/V kept, 3 rounds, torch CP beside.
set -u
out=$1; shift
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--seq-lens 32768 --packed-lens --methods ring --kernels flash cudnn --rounds 3 \
                               --iters 10 --warmup 3 --torch-cp-rotate allgather)
mkdir -p "$out"
for pass in 1 2; do
  for side in A B; do
    dir=${!side}
    (cd "$dir" && SEQPAR_RING_KEEP_KV=${KEEP:-1} timeout ${PART_TIMEOUT:-170} torchrun --standalone --nproc_per_node 2 \
       -m seqpar.bench ring "${args[@]}" --out "$out/ring_${side}${pass}.json" > "$out/ring_${side}${pass}.log" 2>&1)
    echo "$side$pass rc=$? $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print([(r['kernel'], r.get('efficiency'), r.get('ring_ms'), r.get('compute_only_ms')) for r in d['dense']])" "$out/ring_${side}${pass}.json" 2>&1 | tail -1)"
  done
done
