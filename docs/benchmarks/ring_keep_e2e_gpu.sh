# Two GPUs (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/ring_keep_e2e_gpu.sh
# Issue 3, about 3 minutes: llama_1b at cp=2 with the ring (parallel.softmax_sp=ring), one 32k
# document per sequence, 6 steps, without and with SEQPAR_RING_KEEP_KV=1 (a ring of 2 keeping the
# peer's K/V for the backward): tokens/s (mean of steps 3-6) and the peak memory it costs.
mkdir -p "$OUT"
for keep in 0 1; do
    run=/tmp/ring_keep_e2e/keep$keep
    rm -rf "$run"
    SEQPAR_RING_KEEP_KV=$keep timeout 120 seqpar-train model=llama_1b data=synthetic data.seq_len=32768 \
        data.distribution=fixed data.mean_len=32768 train=long train.steps=6 train.warmup_steps=1 \
        train.global_batch_size=1 train.micro_batch_size=1 launcher.nproc_per_node=2 logging.console=false \
        parallel.cp=2 parallel.dp=1 parallel.softmax_sp=ring run_dir=$run > "$OUT/keep$keep.log" 2>&1
    echo "keep $keep: exit $?"; tail -2 "$OUT/keep$keep.log"
    [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$OUT/llama_1b_cp2_ring_keep${keep}_metrics.jsonl"
done
python3 - "$OUT" <<'PY'
import json, sys
for keep in (0, 1):
    try:
        steps = [json.loads(line) for line in open(f"{sys.argv[1]}/llama_1b_cp2_ring_keep{keep}_metrics.jsonl")]
    except OSError:
        print(f"keep {keep}: no metrics"); continue
    timed = [m for m in steps if m["step"] >= 3] or steps
    print(f"keep {keep}: tokens/s {sum(m['tokens_per_s'] for m in timed) / len(timed):.0f}, step "
          f"{sum(m['step_time_s'] for m in timed) / len(timed):.3f} s, max_mem_gb {max(m.get('max_mem_gb', 0) for m in steps):.2f}, "
          f"loss {steps[-1]['loss']:.4f}")
PY
