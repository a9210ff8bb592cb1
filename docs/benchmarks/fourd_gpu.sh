# Issue 6 on two GPUs (device tool, kind nvidia-h100-x2 or nvidia-h200-x2), from the repo root, .whl carried
# (it holds DeepSpeed 0.19.8 built with DS_BUILD_OPS=0 and the pure-python/cp312 needs the image lacks):
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/fourd_gpu.sh
# llama_1b and hybrid_1b at 32k context, one 32k document per sequence, 2 sequences per step (64k tokens
# whatever the layout): cp=2 and tp=2 (FSDP2 over what is left: nothing), dp=2 under FSDP2 and under
# DeepSpeed ZeRO-2. tokens/s and MFU are the means of steps 3..6 of seqpar-train's metrics.jsonl.
# About 7 minutes (9 runs of ~45 s: start, first-step compiles, 6 steps); runs left when 7 minutes have
# passed are skipped and say so. CPU smoke form (mechanics only):
#   OUT=/tmp/o MODELS=tiny_hybrid SEQ=256 EXTRA="train.device=cpu" bash docs/benchmarks/fourd_gpu.sh
mkdir -p "$OUT"
START=$(date +%s)
SEQ=${SEQ:-32768}
COMMON="data=synthetic data.seq_len=$SEQ data.distribution=fixed data.mean_len=$SEQ train=long train.steps=6
  train.warmup_steps=1 train.global_batch_size=2 train.micro_batch_size=1 launcher.nproc_per_node=2 logging.console=false
  ${EXTRA:-}"
declare -A LAYOUT=(
  [cp2]="parallel.cp=2 parallel.dp=1"
  # train=long chunks the MLP (16k positions), which tp's sequence-parallel reduce-scatter cannot;
  # tp halves the MLP's intermediates instead (estimate: 60 GB llama_1b, 71 GB hybrid_1b)
  [tp2]="parallel.cp=1 parallel.tp=2 parallel.dp=1 train.mlp_chunk_tokens=0"
  [dp2_fsdp2]="parallel=none"
  [dp2_zero2]="parallel=none parallel.dp_engine=deepspeed parallel.zero_stage=2"
  # interleaved 1F1B on NCCL (2 micro-batches x 2 virtual stages per rank), llama_1b only
  [pp2_v2]="parallel.cp=1 parallel.pp=2 parallel.virtual_stages=2 parallel.dp=1"
)
MODELS=${MODELS:-llama_1b hybrid_1b}
bench() {  # bench MODEL LAYOUT
  local model=$1 name=$2 run=/tmp/fourd/$1_$2
  if [ $(( $(date +%s) - START )) -gt 420 ]; then echo "skipped $model $name: time budget"; return; fi
  rm -rf "$run"
  # shellcheck disable=SC2086
  timeout 100 seqpar-train model=$model $COMMON ${LAYOUT[$name]} run_dir=$run > "$OUT/${model}_${name}.log" 2>&1
  echo "$model $name: exit $? after $(( $(date +%s) - START )) s"; tail -2 "$OUT/${model}_${name}.log"
  [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$OUT/${model}_${name}_metrics.jsonl"
}
for model in $MODELS; do
  for name in cp2 tp2 dp2_fsdp2 dp2_zero2; do bench "$model" "$name"; done
done
bench "${MODELS%% *}" pp2_v2
SEQ=$SEQ python3 - "$OUT" <<'EOF'
import glob, json, os, sys, platform
import torch
out = sys.argv[1]
rows = []
for path in sorted(glob.glob(os.path.join(out, "*_metrics.jsonl"))):
    name = os.path.basename(path)[:-len("_metrics.jsonl")]
    steps = [json.loads(line) for line in open(path)]
    if not steps:  # the run failed before its first step: its log says why
        rows.append({"run": name, "failed": True})
        continue
    timed = [m for m in steps if m["step"] >= 3] or steps
    mean = lambda k: sum(m.get(k, 0.0) for m in timed) / len(timed)
    rows.append({"run": name, "steps_timed": [m["step"] for m in timed], "tokens_per_s": round(mean("tokens_per_s")),
                 "mfu": round(mean("mfu"), 4), "step_time_s": round(mean("step_time_s"), 3),
                 "max_mem_gb": max(m.get("max_mem_gb", 0.0) for m in steps), "final_loss": steps[-1]["loss"]})
cuda = torch.cuda.is_available()
doc = {"benchmark": "fourd_2gpu", "device": torch.cuda.get_device_name(0) if cuda else "cpu",
       "gpus": torch.cuda.device_count(),
       "torch": torch.__version__, "python": platform.python_version(), "seq_len": int(os.environ.get("SEQ", 32768)), "mfu_note": "seqpar.model.flops (causal sum(l^2) attention) over 2 x peak bf16",
       "runs": rows}
json.dump(doc, open(os.path.join(out, "fourd_2gpu.json"), "w"), indent=1)
print(f"{'run':24s} {'tok/s':>8s} {'mfu':>6s} {'step s':>7s} {'mem GB':>7s}")
for r in rows:
    if r.get("failed"):
        print(f"{r['run']:24s} failed (see its log)")
        continue
    print(f"{r['run']:24s} {r['tokens_per_s']:8d} {r['mfu']:6.3f} {r['step_time_s']:7.3f} {r['max_mem_gb']:7.1f}")
EOF
