# Two GPUs (device tool, nvidia-h200-x2), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/disagg_weights_gpu.sh
# Issue 10, the planner's Triton weight at llama_1b's shapes (~9 minutes). The twenty-seventh session
# found the steps whose plan moves Triton-run work (pieces over a long prefix, parts past cuDNN's cap)
# at 1.055x the ideal and the rest at 1.017x (docs/benchmarks/disagg_steps.py). 1. the cost table at
# 32/8 heads of 64 on one GPU: per task fwd and fwd+bwd, squares on cuDNN, and `fitted_triton_cost`
# (a Triton pair in cuDNN pairs, forward / backward / both); 2. llama_1b dp=2 64k/GPU end to end, eps
# 0.02: the balanced ideal's lanes, the default weight (1.55) and the fitted backward and both-direction
# weights (lanes dp2_disagg_tcNNN_eps02: triton_cost=1.NN), each step's ratio by disagg_steps.py.
set -u
mkdir -p "$OUT"
timeout 150 python3 -m seqpar.bench disagg --profile-cost-table "$OUT/cost_table_llama_1b.json" \
  --heads 32 --kv-heads 8 --head-dim 64 2>&1 | tail -4
lanes=$(python3 - "$OUT/cost_table_llama_1b.json" <<'PY'
import json, sys
fit = json.load(open(sys.argv[1])).get("fitted_triton_cost") or {}
print(fit, file=sys.stderr)
names = []
for key in ("backward", "both"):
    w = fit.get(key)
    if w and 1.0 <= w < 2.0 and round(w, 2) != 1.55:  # the lanes' pattern takes 1.00-1.99
        names.append(f"dp2_disagg_tc{round(w * 100)}_eps02")
print(" ".join(dict.fromkeys(names)))
PY
)
echo "weight lanes: ${lanes:-none}"
STEPS=18 LANES="dp2_as0 dp2_as1 dp2_disagg_eps02 $lanes" EXTRA=" " \
  OUT="$OUT/gpu01_disagg_dp_cp_gpu_65536" bash docs/benchmarks/disagg_dp_cp_gpu.sh 65536 2>&1 | grep -v Warn | tail -8
python3 docs/benchmarks/disagg_steps.py "$OUT/gpu01_disagg_dp_cp_gpu_65536" 2>&1 | tail -4
