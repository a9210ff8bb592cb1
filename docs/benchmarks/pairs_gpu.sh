# Two-GPU checks side by side on a 4-GPU machine (device tool, kind nvidia-h200-x4 or
# nvidia-h100-x4; it costs the same device time as a 2-GPU one). Two arguments, the scripts (of
# docs/benchmarks/) that GPUs 0,1 and GPUs 2,3 run, each pair its list in order; NAME.sh:ARG passes
# ARG to the script, a trailing @1 runs it on the pair's first GPU alone. The pairs share the host (64 cores) and nothing else; each script
# writes under its own $OUT subfolder (gpu01_NAME, gpu23_NAME), all packed into one archive (the tool
# returns 8 files).
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/pairs_gpu.sh \
#       "disagg_check_gpu.sh" "ring_doc_balanced_gpu.sh kernels_tune_gpu.sh@1"
set -u
ROOT=$OUT
export SEQPAR_GPU_READY=1
run_pair() {  # GPUS SCRIPTS...
    local gpus=$1 s name; shift
    for s in "$@"; do
        devices=$gpus; [ "$s" != "${s%@1}" ] && devices=${gpus%%,*}
        s=${s%@1}; script=${s%%:*}; arg=""; [ "$s" != "$script" ] && arg=${s#*:}
        name=gpu${gpus/,/}_${script%.sh}${arg:+_$arg}  # e.g. gpu01_disagg_check, gpu23_maxlen_8b_gpu_cp2
        # shellcheck disable=SC2086
        CUDA_VISIBLE_DEVICES=$devices OUT=$ROOT/$name bash "docs/benchmarks/$script" $arg > "$ROOT/$name.txt" 2>&1
    done
}
# Both pairs stop at PAIRS_TIMEOUT seconds (timeout kills each pair's whole process group), so that
# the archive below is written inside the device tool's 600 s per command.
export -f run_pair; export ROOT
timeout "${PAIRS_TIMEOUT:-560}" bash -c "run_pair 0,1 ${1:?scripts for GPUs 0,1}" &
timeout "${PAIRS_TIMEOUT:-560}" bash -c "run_pair 2,3 ${2:?scripts for GPUs 2,3}" &
wait
for f in "$ROOT"/*.txt; do echo "=== $(basename "$f" .txt)"; cut -c1-400 "$f" | tail -40; done
tar czf /tmp/pairs.tgz -C "$ROOT" . && rm -rf "${ROOT:?}"/* && mv /tmp/pairs.tgz "$ROOT/"
