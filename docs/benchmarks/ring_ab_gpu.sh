#!/usr/bin/env bash
# A/B of source trees on the ring benchmark, alternating A B A B (drift shows as a trend, not a
# difference): `A=DIR B=DIR bash docs/benchmarks/ring_ab_gpu.sh OUTDIR [bench ring args...]`, on 2 GPUs.
# More sides: SIDES="A B C" with C=DIR. Per side, X_ARGS adds bench args and X_ENV environment
# assignments (e.g. A_ARGS="--comm-priority high" B_ENV="TORCH_FR_BUFFER_SIZE=0").
# Default args: 32k, the ring with FA2 and cuDNN, the peer's K/V kept, 3 rounds, torch CP beside.
set -u
out=$1; shift
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--seq-lens 32768 --packed-lens --methods ring --kernels flash cudnn --rounds 3 \
                               --iters 10 --warmup 3 --torch-cp-rotate allgather)
mkdir -p "$out"
for pass in 1 2; do
  for side in ${SIDES:-A B}; do
    dir=${!side}
    extra_name=${side}_ARGS env_name=${side}_ENV
    read -r -a extra <<< "${!extra_name:-}"
    read -r -a side_env <<< "${!env_name:-}"
    (cd "$dir" && env "${side_env[@]}" SEQPAR_RING_KEEP_KV=${KEEP:-1} timeout ${PART_TIMEOUT:-170} \
       torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring "${args[@]}" "${extra[@]}" \
       --out "$out/ring_${side}${pass}.json" > "$out/ring_${side}${pass}.log" 2>&1)
    echo "$side$pass rc=$? $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print([(r['kernel'], r.get('efficiency'), r.get('ring_ms'), r.get('compute_only_ms')) for r in d['dense']])" "$out/ring_${side}${pass}.json" 2>&1 | tail -1)"
  done
done
