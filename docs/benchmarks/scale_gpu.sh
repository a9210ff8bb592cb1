# Issue 8 on 4 or 8 GPUs of one host (device tool, kind nvidia-h200-x4/-x8 or nvidia-h100-x4/-x8, when
# lent), carry .whl. One part per call (each under 10 minutes):
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/scale_gpu.sh ring   # cp = all GPUs
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/scale_gpu.sh lasp
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/scale_gpu.sh e2e
# ring: causal fwd+bwd at total S = 128k, 512k, 1M, efficiency vs one GPU (every GPU runs the whole
#   sequence once, the same-run baseline: ~1 min per iteration at 1M, so 1M runs apart with one timed
#   iteration after one warm-up; ~7 minutes in all on H200), torch's context_parallel beside it, Ulysses
#   and USP (Ulysses inside pairs of GPUs, ring across) on the same inputs; cuDNN only.
# ring1m: the 1M case alone (~5 minutes on 4 H200). ring+lasp: both parts in one call (~8 minutes).
# lasp: LASP-2 vs LASP-1 vs the K/V all-gather (up to 1M), total 1M and 2M tokens.
# e2e: hybrid_1b and llama_1b, one sequence per step of 64k tokens per GPU, under cp=N, cp=N/2 x dp=2,
#   cp=2 x tp=2 x dp=N/4, cp=N/2 x pp=2 (2 micro-batches): tokens/s per GPU and MFU, steps 3-4 (step 1 compiles).
#   MODELS="llama_1b" LAYOUTS="cp2_dp2 cp2_pp2" picks some (names as printed); the first step of each
#   run compiled and tuned for ~45-65 s on 4 H200 (2026-11-26, before kernels/autotune.py kept the
#   picks on disk), so about six runs fit one call; RUN_TIMEOUT (110 s) bounds each run (pp needs more).
# SMOKE=1 runs the same commands small on the CPU (gloo, 4 processes): the mechanics, not the figures.
set -u
mkdir -p "$OUT"
N=${N:-$(python3 -c "import torch; print(torch.cuda.device_count() or 4)")}
T="torchrun --standalone --nproc_per_node $N"
if [ "${SMOKE:-0}" = 1 ]; then
    RING="--seq-lens 512 --packed-lens --iters 1 --warmup 0"; RING_1M="--seq-lens 1024 --packed-lens --iters 1 --warmup 0"
    LASP="--tokens 2048"
    E2E_SEQ=512 E2E="train.device=cpu model.d_model=64 model.n_layers=4 model.n_heads=4 model.n_kv_heads=2 model.ffn_dim=128"
else
    RING="--seq-lens 131072 524288 --packed-lens --kernels cudnn --iters 2 --warmup 1"
    RING_1M="--seq-lens 1048576 --packed-lens --kernels cudnn --iters 1 --warmup 1"
    LASP="--tokens 1048576 2097152 --kv-max-tokens 1048576"
    E2E_SEQ=$((65536 * N)) E2E=""
fi
ring() {
    # shellcheck disable=SC2086
    timeout 200 $T -m seqpar.bench ring $RING --methods ring ulysses usp:2 --torch-cp-rotate allgather \
        --out "$OUT/ring_${N}gpu.json" 2>&1 | grep -E '^\{' | cut -c1-700
    ring1m
}
ring1m() {
    # shellcheck disable=SC2086
    timeout 330 $T -m seqpar.bench ring $RING_1M --methods ring ulysses usp:2 --torch-cp-rotate allgather \
        --out "$OUT/ring_${N}gpu_1m.json" 2>&1 | grep -E '^\{' | cut -c1-700
}
lasp() {
    # shellcheck disable=SC2086
    timeout 120 $T -m seqpar.bench lasp $LASP --methods lasp2,lasp2_zigzag,lasp1,kv_allgather \
        --out "$OUT/lasp_${N}gpu.json" 2>&1 | tee "$OUT/lasp_${N}gpu.log" | grep -E '^ +[0-9]+ |^\{'
}
case "${1:-}" in
ring) ring ;;
ring1m) ring1m ;;
lasp) lasp ;;
ring+lasp) lasp; ring ;;
e2e)
    COMMON="data=synthetic data.seq_len=$E2E_SEQ data.distribution=fixed data.mean_len=$E2E_SEQ train=long
      train.steps=4 train.warmup_steps=1 launcher.nproc_per_node=$N logging.console=false $E2E"
    declare -A LAYOUT=(
      [cp$N]="parallel.cp=$N parallel.dp=1 train.global_batch_size=1"
      [cp$((N / 2))_dp2]="parallel.cp=$((N / 2)) parallel.dp=2 train.global_batch_size=2"
      [cp2_tp2_dp$((N / 4))]="parallel.cp=2 parallel.tp=2 parallel.dp=$((N / 4)) train.global_batch_size=$((N / 4)) train.mlp_chunk_tokens=0"
      [cp$((N / 2))_pp2]="parallel.cp=$((N / 2)) parallel.pp=2 parallel.dp=1 train.global_batch_size=2"
    )
    start=$(date +%s)
    for model in ${MODELS:-hybrid_1b llama_1b}; do
        for name in ${LAYOUTS:-${!LAYOUT[@]}}; do
            if [ $(( $(date +%s) - start )) -gt 450 ]; then echo "skipped $model $name: time budget"; continue; fi
            run=/tmp/scale/${model}_$name; rm -rf "$run"
            extra=""  # hybrid_1b's TP pair holds 127 GiB of activations at 64k/GPU (H200: 126 usable)
            [ "$model" = hybrid_1b ] && [[ $name == *tp2* ]] && [ "${SMOKE:-0}" != 1 ] && extra="train.activation_checkpointing=selective"
            # shellcheck disable=SC2086
            timeout "${RUN_TIMEOUT:-110}" seqpar-train model=$model $COMMON ${LAYOUT[$name]} $extra run_dir=$run > "$OUT/${model}_$name.log" 2>&1
            echo "$model $name: exit $?"
            [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$OUT/${model}_${name}_metrics.jsonl" \
                && tail -1 "$run/metrics.jsonl" | cut -c1-300
        done
    done
    tar czf /tmp/scale.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/scale.tgz "$OUT/"  # the tool returns 8 files
    ;;
*)
    echo "usage: bash docs/benchmarks/scale_gpu.sh ring|ring1m|lasp|ring+lasp|e2e" >&2; exit 2
    ;;
esac
