# Two GPUs (device tool, nvidia-h200-x2), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/disagg_ab_gpu.sh        (~7 minutes)
#   ... PART=2 OUT=DIR2 bash docs/benchmarks/disagg_ab_gpu.sh                                    (~5.5 minutes)
#   ... PART=3 OUT=DIR3 bash docs/benchmarks/disagg_ab_gpu.sh                                    (~5.5 minutes)
#   ... PART=4 OUT=DIR4 bash docs/benchmarks/disagg_ab_gpu.sh                                    (~5 minutes)
# Issue 10 after the twenty-ninth session (the servers' pieces over a prefix on cuDNN by default, ee7b846:
# llama_1b dp=2 64k/GPU of lognormal documents, eps 0.02, ran 1.025x / 1.030x the balanced ideal on 2 H200).
# Part 1: that lane again beside the local_remote schedule (edcff20: local work, then remote work; the
# backward remote first, so Q|K|V arrive and dQ|dK|dV return behind the local work; single's exposed
# transfers were 43.8-44.9 ms a step, 21.6 of them waiting for dQ|dK|dV), lognormal, in alternating order.
# Parts 2-3: the end-to-end goal on DistCA's mixes (wlbllm, prolong): the balanced ideal's lanes and
# disagg at eps 0.02, 64k tokens per GPU (plain data parallelism's step is the slower of the two rows: each step's
# max of the two ideal lanes; thirtieth session, 2 H200, after 2874c1c: 1.022x / 1.026x). Part 4: the layer bench at llama_1b's heads (32/8 x 64), 64k tokens per GPU, every
# schedule with its compute and transfers timed apart.
set -u
mkdir -p "$OUT"
case "${PART:-1}" in
  1) MIX=lognormal; lanes="dp2_as0 dp2_disagg_local_remote_eps02 dp2_as1 dp2_disagg_eps02" ;;
  2) MIX=wlbllm; lanes="dp2_as0 dp2_disagg_eps02 dp2_as1" ;;
  3) MIX=prolong; lanes="dp2_as0 dp2_disagg_eps02 dp2_as1" ;;
  4) timeout 280 torchrun --standalone --nproc_per_node 2 -m seqpar.bench disagg --tokens 65536 --mixes lognormal \
       --heads 32 --kv-heads 8 --head-dim 64 --eps 0.02 --batches 16 --parts-batches 16 \
       --out "$OUT/disagg_2gpu_64k_llama1b.json" 2>&1 | grep -v Warning | tail -3
     exit 0 ;;
  *) echo "PART=${PART}: 1-4" >&2; exit 2 ;;
esac
folder="$OUT/gpu01_disagg_dp_cp_gpu_65536"
[ "$MIX" = lognormal ] || folder="$OUT/gpu01_disagg_dp_cp_gpu_${MIX}_65536"
MIX=$MIX STEPS=18 LANES="$lanes" EXTRA=" " OUT="$folder" bash docs/benchmarks/disagg_dp_cp_gpu.sh 65536 2>&1 \
  | grep -v Warn | tail -4
