# The two-GPU checks side by side on a 4-GPU machine (device tool, kind nvidia-h200-x4 or
# nvidia-h100-x4; it costs the same time as a 2-GPU one): GPUs 0,1 run issue 10's
# disagg_check_gpu.sh while GPUs 2,3 run issue 3's ring_doc_balanced_gpu.sh and then, on GPU 2
# alone, issue 5's kernels_tune_gpu.sh if KERNELS=1. The pairs share the host (64 cores) and
# nothing else; each keeps its own $OUT subfolder, packed into one archive (the tool returns 8 files).
#   source docs/benchmarks/gpu_setup.sh && KERNELS=1 bash docs/benchmarks/pairs_gpu.sh
set -u
ROOT=$OUT
export SEQPAR_GPU_READY=1
(export CUDA_VISIBLE_DEVICES=0,1 OUT=$ROOT/disagg; bash docs/benchmarks/disagg_check_gpu.sh > "$ROOT/disagg.txt" 2>&1) &
(export CUDA_VISIBLE_DEVICES=2,3 OUT=$ROOT/ring; bash docs/benchmarks/ring_doc_balanced_gpu.sh > "$ROOT/ring.txt" 2>&1
 if [ "${KERNELS:-0}" = 1 ]; then
     export CUDA_VISIBLE_DEVICES=2 OUT=$ROOT/kernels; bash docs/benchmarks/kernels_tune_gpu.sh > "$ROOT/kernels.txt" 2>&1
 fi) &
wait
for f in disagg ring kernels; do [ -f "$ROOT/$f.txt" ] && { echo "=== $f"; cut -c1-400 "$ROOT/$f.txt" | tail -40; }; done
tar czf /tmp/pairs.tgz -C "$ROOT" . && rm -rf "${ROOT:?}"/* && mv /tmp/pairs.tgz "$ROOT/"
