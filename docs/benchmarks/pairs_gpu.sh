# Two-GPU checks side by side on a 4-GPU machine (device tool, kind nvidia-h200-x4 or
# nvidia-h100-x4; it costs the same device time as a 2-GPU one). Two arguments, the scripts (of
# docs/benchmarks/) that GPUs 0,1 and GPUs 2,3 run, each pair its list in order; NAME.sh:ARG passes
# ARG to the script, a trailing @1 (@2) runs it on the pair's first (second) GPU alone, and A.sh@1+B.sh@2
# runs the two side by side. The pairs share the host (64 cores) and nothing else; each script
# writes under its own $OUT subfolder (gpu01_NAME, gpu23_NAME), all packed into one archive (the tool
# returns 8 files).
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/pairs_gpu.sh \
#       "disagg_check_gpu.sh" "ring_doc_balanced_gpu.sh kernels_tune_gpu.sh@1"
set -u
ROOT=$OUT
export SEQPAR_GPU_READY=1
run_one() {  # GPUS SCRIPT
    local gpus=$1 s=$2 devices name script arg
    devices=$gpus
    case $s in *@1) devices=${gpus%%,*} ;; *@2) devices=${gpus##*,} ;; esac
    s=${s%@[12]}; script=${s%%:*}; arg=""; [ "$s" != "$script" ] && arg=${s#*:}
    name=gpu${devices/,/}_${script%.sh}${arg:+_$arg}  # e.g. gpu01_disagg_check, gpu2_maxlen_anchor_gpu
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=$devices OUT=$ROOT/$name bash "docs/benchmarks/$script" $arg > "$ROOT/$name.txt" 2>&1
}
run_pair() {  # GPUS ITEMS...   (an item: SCRIPT, or SCRIPT+SCRIPT run side by side)
    local gpus=$1 item part; shift
    for item in "$@"; do
        for part in ${item//+/ }; do run_one "$gpus" "$part" & done
        wait
    done
}
# Both pairs stop at PAIRS_TIMEOUT seconds (timeout kills each pair's whole process group), so that
# the archive below is written inside the device tool's 600 s per command.
export -f run_one run_pair; export ROOT
timeout "${PAIRS_TIMEOUT:-560}" bash -c "run_pair 0,1 ${1:?scripts for GPUs 0,1}" &
timeout "${PAIRS_TIMEOUT:-560}" bash -c "run_pair 2,3 ${2:?scripts for GPUs 2,3}" &
wait
for f in "$ROOT"/*.txt; do echo "=== $(basename "$f" .txt)"; cut -c1-400 "$f" | tail -40; done
tar czf /tmp/pairs.tgz -C "$ROOT" . && rm -rf "${ROOT:?}"/* && mv /tmp/pairs.tgz "$ROOT/"
