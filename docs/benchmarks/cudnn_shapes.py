"""How many cuDNN attention shapes each rank meets for the first time, step by step, in the runs of
`disagg_dp_cp_gpu.sh` (CPU only: the same seeded batches, the same plans and buckets). cuDNN builds
an execution plan on the host the first time it sees a shape (~50-80 ms on H100/H200, forward and
backward each), and the GPU waits for it; under plain data parallelism one rank's build delays only
that rank until the step's end, while disaggregated attention meets every layer's all-to-alls,
so each build on one rank holds up the other there.

    python docs/benchmarks/cudnn_shapes.py [SEQ] [STEPS] [pow2|prebuilt]     (default 65536 12)

`pow2`: count shapes as torch's TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 keys them (its ragged path:
sequence lengths rounded up to powers of two, batch strides ignored; torch >= 2.9, experimental).
`prebuilt`: count only what `train.cudnn_prebuild` (the default) leaves to build inside the steps
(the causal squares of every bucket are built before step 1, and with SEQPAR_CUDNN_PREFIX=1 every
query bucket over min_len prefix keys: `split.prefix_chunks`).

Per step and rank: new shapes of dp2 (its own row's long documents through split.py) and of disagg
over dp_cp (the tasks each rank serves, through split_tasks.py: causal squares, and a causal call
plus a non-causal one for pieces over a prefix). Each shape is one forward and one backward plan.
"""
import json
import sys

from hydra import compose, initialize_config_dir

from seqpar.attention.disagg import KernelSpeed
from seqpar.attention.disagg.options import planner_overhead, DisaggOptions
from seqpar.attention.disagg.runtime import _plan_routes
from seqpar.config import register_configs
from seqpar.data import PackedLoader, build_dataset
from seqpar.kernels.flash_attn.split import (BUCKETS_PER_OCTAVE, bucket_len, max_doc_len, min_doc_len, prebuilt_lengths,
                                             prefix_chunk, prefix_chunks, split_task_bounds)


def _rows(seq, steps):
    register_configs()
    conf = __file__.rsplit("/docs/", 1)[0] + "/conf"
    with initialize_config_dir(config_dir=conf, version_base=None):
        cfg = compose(config_name="train", overrides=[
            "model=llama_1b", "data=synthetic", f"data.seq_len={seq}", "data.distribution=lognormal",
            f"data.mean_len={seq // 4}", "data.sigma=1.0", "train.global_batch_size=2", "train.micro_batch_size=1"])
    dataset = build_dataset(cfg.data, cfg.data.seq_len)
    loaders = [PackedLoader(dataset, global_batch_size=2, micro_batch_size=1, dp_rank=r, dp_size=2, seed=cfg.train.seed)
               for r in range(2)]
    m = cfg.model
    heads, head_dim = m.n_heads, m.head_dim or m.d_model // m.n_heads
    return [[[int(x) for x in ld.next_batch()[0].cu_seqlens] for ld in loaders] for _ in range(steps)], heads, head_dim


def _pow2(n):
    return 1 << (n - 1).bit_length()


def _task_shapes(bq, bk, lo, hi, causal, pow2=False):
    key = _pow2 if pow2 else (lambda n: n)
    shapes = set()
    long_tasks, _, _ = split_task_bounds(bq, bk, lo, hi, causal, cut=causal)
    for qa, qb, ka, kb in long_tasks:
        n, m = qb - qa, kb - ka
        p, f = prefix_chunks(n, m, prefix_chunk(lo)) if causal else (0, 0)
        shapes.add(("causal", key(bucket_len(f + n, BUCKETS_PER_OCTAVE))))
        if p:
            shapes.add(("prefix", key(bucket_len(n, BUCKETS_PER_OCTAVE)), key(prefix_chunk(lo))))
    return shapes


def main(seq=65536, steps=12, pow2=False, prebuilt=False):
    rows, heads, head_dim = _rows(seq, steps)
    lo, hi = min_doc_len(heads), max_doc_len(heads, head_dim, 2)
    opts = DisaggOptions()
    q_row, kv_row = heads * 2 * head_dim * 2, 8 * 2 * head_dim * 2
    lengths = prebuilt_lengths(heads, head_dim, 2) if prebuilt else []
    built = {("causal", n) for n in lengths} | {("prefix", n, prefix_chunk(lo)) for n in lengths}
    seen = {(lane, r): set(built) for lane in ("dp2", "disagg") for r in range(2)}
    table = []
    for step, (r0, r1) in enumerate(rows, 1):
        joined = r0 + [seq + b for b in r1[1:]]
        line = {"step": step, "docs": [len(r0) - 1, len(r1) - 1]}
        for rank, own in enumerate((r0, r1)):
            need = {"dp2": _task_shapes(own, own, lo, hi, True, pow2)}
            routes, _ = _plan_routes(tuple(joined), 2 * seq, 2, rank, "contiguous", opts.eps, opts.min_chunk, True,
                                     planner_overhead(opts), (q_row, kv_row), "single",
                                     KernelSpeed(lo, hi, True, opts.triton_cost))  # as on the GPU
            need["disagg"] = set().union(*(_task_shapes(r.cu_q, r.cu_k, lo, hi, True, pow2) for r in routes))
            for lane, shapes in need.items():
                line[f"{lane}_r{rank}"] = [len(shapes), len(shapes - seen[lane, rank])]
                seen[lane, rank] |= shapes
        table.append(line)
        print(json.dumps(line))
    later = table[2:]  # the benchmark's mean skips steps 1-2
    print(json.dumps({f"{lane}_r{r}_new_in_steps_3+": sum(x[f"{lane}_r{r}"][1] for x in later)
                      for lane in ("dp2", "disagg") for r in range(2)}))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]), pow2="pow2" in sys.argv[3:], prebuilt="prebuilt" in sys.argv[3:])
