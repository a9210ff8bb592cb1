# One H100 (device tool), from the repo root, .whl and .cfe (the nvidia-cudnn-frontend wheel) carried:
#   source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/cudnn_graph_gpu.sh
# Issues 5 and 10, about 8 minutes: attention through cuDNN's graph API (kernels/flash_attn/cudnn_graph.py,
# SEQPAR_ATTN_KERNEL=graph):
# 1. its GPU tests (bf16 against float64: pieces over a prefix, blind rows, packed autograd);
# 2. graph builds, workspaces and host time per call (cudnn_graph_build_gpu.py), and every plan of
#    heuristics A, B and FALLBACK timed (cudnn_graph_plans_gpu.py: is the first the fastest?);
# 3. `bench kernels --only flash`: dense 16k and packed lognormal 16k / 64k (H=32, D=128), the graph
#    family beside the split, Triton, SDPA cuDNN and FlexAttention in one run;
# 4. llama_1b on one GPU, 64k tokens of lognormal documents, 10 steps: default, then SEQPAR_ATTN_KERNEL=graph
#    with 4 and with 1 length bucket per octave (SEQPAR_CUDNN_GRAPH_BUCKETS).
# PART=2, two GPUs (about 5 minutes): the ring's and disagg's GPU tests on the graph family and `bench ring
# --kernels graph cudnn` at 32k and 128k. PART=3, two GPUs (about 10 minutes): llama_1b's dp=2 disagg
# lanes at 64k/GPU (18 steps) with the default kernels, then with the servers on the graph family, each
# beside its balanced ideal (dp2_as0 / dp2_as1). PART=4, two GPUs (~5 min): disagg's GPU tests on the graph family
# and its lane with the servers on it, graphs built per step. PART=5, one GPU (~6 min): llama_1b 30 steps on
# the split and on the default with the wheel (packed rows on the graph family), builds per step.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/cfe .cfe/*.whl
export PYTHONPATH=/tmp/cfe${PYTHONPATH:+:$PYTHONPATH}
e2e() {  # NAME STEPS (environment from the caller): llama_1b on one GPU, 64k tokens of lognormal documents
    rm -rf /tmp/e2e_$1
    timeout $((90 + 4 * $2)) seqpar-train model=llama_1b parallel=none data=synthetic data.seq_len=65536 \
        data.distribution=lognormal data.mean_len=16384 data.sigma=1.0 train=long train.steps=$2 train.warmup_steps=1 \
        train.activation_checkpointing=selective train.global_batch_size=1 train.micro_batch_size=1 \
        launcher.nproc_per_node=1 logging.console=false run_dir=/tmp/e2e_$1 > "$OUT/$1.log" 2>&1
    echo "$1: exit $?"
    cp /tmp/e2e_$1/metrics.jsonl "$OUT/$1_metrics.jsonl" 2>/dev/null
    python3 -c "import json,sys; ms=[json.loads(l) for l in open(sys.argv[1])]; t=[m['step_time_s'] for m in ms]; \
print('   step s', [round(x, 3) for x in t], 'steps 2- s', round(sum(t[1:]), 2), 'builds', \
[m.get('attn_graph_builds') for m in ms], 'loss', ms[-1]['loss'])" "$OUT/$1_metrics.jsonl"
}
if [ "${PART:-1}" = 2 ]; then
    SEQPAR_FLASH_TUNE=0 timeout 300 python3 -m pytest -q -m gpu tests/test_ring.py tests/test_disagg.py \
        -k "graph" > "$OUT/gpu_tests_2gpu.log" 2>&1
    echo "gpu tests (2 GPUs): exit $? ($(tail -1 "$OUT/gpu_tests_2gpu.log"))"
    timeout 240 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring --seq-lens 32768 131072 --packed-lens \
        --methods ring --kernels graph cudnn --rounds 2 --iters 10 --torch-cp-rotate allgather \
        --out "$OUT/ring_graph.json" > "$OUT/ring_graph.log" 2>&1
    echo "ring bench: exit $?"; python3 docs/benchmarks/ring_summary.py "$OUT/ring_graph.log"
    exit 0
fi
if [ "${PART:-1}" = 4 ]; then  # two GPUs, ~5 min: the graph lane of disagg with the workspace bound (58d5e09)
    SEQPAR_FLASH_TUNE=0 timeout 150 python3 -m pytest -q -m gpu tests/test_disagg.py -k "graph" \
        > "$OUT/gpu_tests_disagg.log" 2>&1
    echo "disagg gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests_disagg.log"))"
    mkdir -p "$OUT/graph"
    SEQPAR_ATTN_KERNEL=graph STEPS=18 LANES="dp2_disagg_eps02" EXTRA=" " OUT="$OUT/graph" \
        bash docs/benchmarks/disagg_dp_cp_gpu.sh 65536 2>&1 | grep -v Warn | tail -2 | cut -c1-600
    python3 -c "import json,sys; ms=[json.loads(l) for l in open(sys.argv[1])]; \
print('   graph builds', [m.get('attn_graph_builds') for m in ms])" "$OUT/graph/dp2_disagg_eps02_metrics.jsonl"
    exit 0
fi
if [ "${PART:-1}" = 5 ]; then  # one GPU, ~6 min: llama_1b 30 steps, split (auto without the wheel) against graph
    for kern in split auto; do  # auto with the wheel: packed rows on the graph family (GRAPH_FASTER)
        SEQPAR_ATTN_KERNEL=$kern e2e e2e30_$kern 30
    done
    exit 0
fi
if [ "${PART:-1}" = 3 ]; then
    STEPS=18 LANES="dp2_as0 dp2_as1 dp2_disagg_eps02" EXTRA=" " OUT="$OUT" bash docs/benchmarks/disagg_dp_cp_gpu.sh 65536 \
        2>&1 | grep -v Warn | tail -4 | cut -c1-600
    mkdir -p "$OUT/graph"
    SEQPAR_ATTN_KERNEL=graph STEPS=18 LANES="dp2_as0 dp2_as1 dp2_disagg_eps02" EXTRA=" " OUT="$OUT/graph" \
        bash docs/benchmarks/disagg_dp_cp_gpu.sh 65536 2>&1 | grep -v Warn | tail -4 | cut -c1-600
    exit 0
fi
SEQPAR_FLASH_TUNE=0 timeout 200 python3 -m pytest -q -m gpu tests/test_cudnn_graph.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"
timeout 120 python3 docs/benchmarks/cudnn_graph_build_gpu.py "$OUT/build.json" > "$OUT/build.log" 2>&1
echo "builds: exit $?"; grep '^{' "$OUT/build.log"
timeout 150 python3 docs/benchmarks/cudnn_graph_plans_gpu.py "$OUT/plans.json" > "$OUT/plans.log" 2>&1
echo "plans: exit $?"; cut -c1-700 "$OUT/plans.log" | grep '^{'
timeout 300 python3 -m seqpar.bench kernels --only flash --flash-dense-lens 16384 --flash-packed-lens 16384 65536 \
    --flash-no-ring-step --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
echo "bench kernels: exit $?"
python3 - "$OUT/kernels.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["flash"]["rows"]:
    print("   ", r.get("layout"), r.get("S"), r.get("kernel"), r.get("fwd_ms"), r.get("fwdbwd_ms"), r.get("fwdbwd_tflops"),
          r.get("error", ""))
PY
for kern in auto graph graph1; do  # graph1: length buckets at powers of two (fewer graphs to build)
    SEQPAR_CUDNN_GRAPH_BUCKETS=$([ $kern = graph1 ] && echo 1 || echo 4) SEQPAR_ATTN_KERNEL=${kern%1} e2e e2e_$kern 10
done
