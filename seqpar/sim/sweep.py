"""`python -m seqpar.sim sweep --out DIR`: the published scaling trends, predicted, beside the papers' figures.

1. DistCA (core-attention disaggregation) over per-document context parallelism, Llama-8B shape,
   document mixes of ../shared/data/doc_lengths (WLB-LLM's pretrain mix, ProLong), 16-512 H200,
   without and with pipeline parallelism. Per-document CP keeps each data-parallel rank's rows to
   itself: the step waits for the rank whose documents cost most. DistCA pools the attention of
   all rows over all dp x cp servers (the planner), with its all-to-alls hidden by the ping-pong
   schedule. Published: 1.07-1.20x without PP, 1.10-1.35x with PP (the issue's figures).
2. LASP-2 against ring attention on a linear-attention 1B model at 64 GPUs, 32k to 2048k tokens.
   Published: LASP-2 +36.6% throughput over ring attention at 2048k.
3. Ring vs Ulysses vs USP (Ulysses inside a node, ring across) for Llama-8B from 8 to 64 GPUs
   and 128k to 1M tokens: where each wins.
4. Data parallelism with document mixes: the straggler effect without rebalancing (each dp rank
   its own rows; every layer waits for the rank whose documents cost most) against
   disaggregation over dp x cp (`parallel.disagg.group=dp_cp`, DistCA's main setting: the ranks'
   rows joined and their attention planned over all ranks), with the bytes it moves. Beside it,
   seqpar's own 2-GPU measurement of the same comparison (attention only).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from seqpar.sim.calibrate import calibrate
from seqpar.sim.cluster import load_cluster
from seqpar.sim.configs import as_plain, compose
from seqpar.sim.step import predict_step, row_documents

DOC_LENGTHS = Path(os.environ.get("SEQPAR_DOC_LENGTHS", Path(__file__).resolve().parents[3] / "shared" / "data" / "doc_lengths"))


def _cfg(*overrides):
    return as_plain(compose(list(overrides)))


def _rows(mix: str, length: int, n: int, seed: int = 0) -> list[tuple[int, ...]]:
    path = DOC_LENGTHS / f"{mix}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the document-length mix is not here (SEQPAR_DOC_LENGTHS=DIR points elsewhere)")
    cfg = _cfg("data=synthetic", f"data.seq_len={length}", "data.distribution=file", f"data.lengths_file={path}",
               f"data.max_len={length}", f"data.seed={seed}")
    return row_documents(cfg, n)


def _pipeline(times: list[float], pp: int) -> float:
    """1F1B over micro-batches of unequal cost (each a stage's share of one micro-batch's time x pp):
    their sum, plus (pp - 1) fill/drain slots of the slowest."""
    stage = [t / pp for t in times]
    return sum(stage) + (pp - 1) * max(stage) if pp > 1 else sum(times)


def wlb_pack(docs: list[int], bins: int, cap: int, cost) -> list[list[int]]:
    """WLB-LLM-style variable-length packing: documents, costliest first, each into the bin of least
    cost that still has room (`cap` tokens; a bin too full for every document takes it anyway)."""
    packed, load, size = [[] for _ in range(bins)], [0.0] * bins, [0] * bins
    for n in sorted(docs, key=cost, reverse=True):
        fits = [b for b in range(bins) if size[b] + n <= cap] or list(range(bins))
        b = min(fits, key=lambda b: load[b])
        packed[b].append(n)
        load[b] += cost(n)
        size[b] += n
    return packed


def _layout(length, tp, cp, pp, dp, n_micro, method):
    cfg = _cfg("model=llama_8b", "data=synthetic", f"data.seq_len={length}", f"parallel.tp={tp}", f"parallel.cp={cp}",
               f"parallel.pp={pp}", f"parallel.dp={dp}", f"train.global_batch_size={dp * n_micro}",
               "train.micro_batch_size=1", "train.activation_checkpointing=full")
    cfg.parallel.softmax_sp = method
    return cfg


def _row_time(docs, tp, cp, pp, dp, n_micro, n, cluster, calib, method="perdoc") -> float:
    """One micro-batch of these documents (rounded up to the layout's chunking with a padding document)."""
    unit = 2 * cp * tp
    seq = -(-sum(docs) // unit) * unit
    bounds = [0]
    for d in list(docs) + ([seq - sum(docs)] if seq > sum(docs) else []):
        bounds.append(bounds[-1] + d)
    cfg = _layout(seq, tp, cp, pp, dp, n_micro, method)
    return predict_step(cfg, n, cluster, calib, doc_bounds=[tuple(bounds)])["step_s"] / n_micro


def distca(cluster, calib, *, gpus=(16, 64, 256, 512), lengths=(131072, 262144, 524288),
           mixes=("wlbllm", "prolong"), pp_options=(1, 4), tp=8, cp_max=4, cap=1.25) -> list[dict]:
    """Step time of one global batch (dp x n_micro rows of `length` tokens drawn from `mix`) under
    per-document CP with rows packed in order, the same with WLB-LLM's balanced variable-length
    packing (rows up to `cap` x length), and DistCA (every micro-batch's attention pooled over all
    dp x cp servers, all-to-alls hidden by ping-pong)."""
    from seqpar.model.flops import block_params
    from seqpar.sim.compute import matmul_time

    out = []
    m = _cfg("model=llama_8b").model
    per_token = matmul_time(6 * block_params(m)["S"], cluster)
    per_pair = 3 * 2 * 2 * m.n_heads * (m.d_model // m.n_heads) / 2 / calib.attn["flash"].rate
    cost = lambda n: per_token * n + per_pair * n * n
    for mix in mixes:
        for pp in pp_options:
            for n in gpus:
                cp = min(cp_max, n // (tp * pp))
                dp = n // (tp * cp * pp) if cp else 0
                if dp < 1:
                    continue
                n_micro = 2 * pp if pp > 1 else 1
                for length in lengths:
                    rows = _rows(mix, length, dp * n_micro)
                    docs_of = lambda r: [b - a for a, b in zip(r[:-1], r[1:])]
                    args = (tp, cp, pp, dp, n_micro, n, cluster, calib)
                    # per-document CP, rows as the loader packs them: the step waits for the slowest dp rank
                    t = [_row_time(docs_of(r), *args) for r in rows]
                    in_order = max(_pipeline(t[i * n_micro:(i + 1) * n_micro], pp) for i in range(dp))
                    # the same with WLB-LLM's packing: every document of the batch re-binned by cost
                    bins = wlb_pack([d for r in rows for d in docs_of(r)], dp * n_micro, int(cap * length), cost)
                    t = [_row_time(b, *args) for b in bins]
                    wlb = max(_pipeline(t[i * n_micro:(i + 1) * n_micro], pp) for i in range(dp))
                    # DistCA: micro-batch m of every dp rank attends together on all dp x cp servers
                    pooled = _layout(length * dp, tp, cp * dp, pp, 1, n_micro, "disagg_overlap")
                    t = []
                    for k in range(n_micro):
                        merged = [0]
                        for i in range(dp):
                            for d in docs_of(rows[i * n_micro + k]):
                                merged.append(merged[-1] + d)
                        t.append(predict_step(pooled, n, cluster, calib, doc_bounds=[tuple(merged)])["step_s"] / n_micro)
                    ours = _pipeline(t, pp)
                    out.append(dict(mix=mix, pp=pp, gpus=n, dp=dp, tp=tp, cp=cp, context=length,
                                    perdoc_in_order_s=round(in_order, 4), perdoc_wlb_s=round(wlb, 4),
                                    distca_s=round(ours, 4), speedup_vs_wlb=round(wlb / ours, 3),
                                    speedup_vs_in_order=round(in_order / ours, 3)))
    return out


def dp_disagg(cluster, calib, *, gpus=(16, 64, 256), lengths=(65536, 131072), mixes=("wlbllm", "prolong"),
              tp=8, n_micro=4) -> list[dict]:
    """Step of Llama-8B (tp inside a node, cp=1, full checkpointing) on `gpus`, one row of `length`
    tokens of `mix` per dp rank and micro-batch: plain dp (the slowest rank's attention per layer)
    against disaggregation over dp (`parallel.disagg.group=dp_cp`) on the same rows."""
    out = []
    for mix in mixes:
        path = DOC_LENGTHS / f"{mix}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the document-length mix is not here (SEQPAR_DOC_LENGTHS=DIR points elsewhere)")
        for n in gpus:
            dp = n // tp
            for length in lengths:
                o = ["model=llama_8b", "data=synthetic", f"data.seq_len={length}", "data.distribution=file",
                     f"data.lengths_file={path}", f"data.max_len={length}", f"parallel.tp={tp}", "parallel.cp=1",
                     "parallel.pp=1", f"parallel.dp={dp}", f"train.global_batch_size={dp * n_micro}",
                     "train.micro_batch_size=1", "train.activation_checkpointing=full"]
                plain = predict_step(_cfg(*o), n, cluster, calib)
                ours = predict_step(_cfg(*o, "parallel.softmax_sp=disagg", "parallel.disagg.group=dp_cp"), n, cluster,
                                    calib)
                info = ours["dp_attention"]["S"]
                out.append(dict(mix=mix, gpus=n, dp=dp, tp=tp, context=length,
                                dp_no_rebalance_s=round(plain["step_s"], 3), dp_cp_disagg_s=round(ours["step_s"], 3),
                                speedup=round(plain["step_s"] / ours["step_s"], 3),
                                attention_imbalance_before=round(float(info["imbalance_before"]), 3),
                                moved_mib_per_layer=round(info["moved_bytes_per_rank"] / 2**20, 1)))
    return out


def measured_dp_disagg(root=None) -> list[dict]:
    """seqpar's 2-GPU disagg benchmark (attention only, fwd+bwd per layer): no rebalancing against
    disagg with and without ping-pong and (d987b2e on) its `single` schedule, today's default, mean
    over the batches, per run, mix and tokens per rank."""
    from seqpar.sim.eras import run_key
    from seqpar.sim.measurements import disagg_samples, load_benchmarks

    out = []
    for s in disagg_samples(load_benchmarks(root)):
        rows = [r for _, r in s["batches"] if "dp_no_rebalance_ms" in r and "disagg_ms" in r]
        if rows:
            plain, ours, no_pp = (sum(r.get(key, float("nan")) for r in rows) / len(rows)
                                  for key in ("dp_no_rebalance_ms", "disagg_ms", "disagg_no_pingpong_ms"))
            single = (sum(r["disagg_single_ms"] for r in rows) / len(rows)
                      if all("disagg_single_ms" in r for r in rows) else None)
            out.append(dict(run=str(Path(run_key(s["file"])).parent), mix=s["mix"], tokens_per_rank=s["tokens"],
                            batches=len(rows), dp_no_rebalance_ms=round(plain, 1), disagg_ms=round(ours, 1),
                            disagg_no_pingpong_ms=round(no_pp, 1), speedup=round(plain / ours, 3),
                            speedup_no_pingpong=round(plain / no_pp, 3),
                            disagg_single_ms=None if single is None else round(single, 1),
                            speedup_single=None if single is None else round(plain / single, 3)))
    return out


def lasp_vs_ring(cluster, calib, *, gpus=64, lengths=(32768, 131072, 524288, 2097152)) -> list[dict]:
    out = []
    for length in lengths:
        res = {}
        for method in ("lasp2", "lasp1", "ring"):
            cfg = _cfg("model=hybrid_1b", "model.layer_pattern=L", "data=synthetic", f"data.seq_len={length}",
                       "data.distribution=fixed", f"data.mean_len={length}", f"parallel.cp={gpus}", "parallel.dp=1",
                       "parallel.layout=contiguous", "train=long", "train.activation_checkpointing=full")
            cfg.parallel.linear_sp = method
            res[method] = predict_step(cfg, gpus, cluster, calib)
        tps = {k: v["tokens_per_s"] for k, v in res.items()}
        out.append(dict(gpus=gpus, tokens=length, lasp2_tokens_s=round(tps["lasp2"]), lasp1_tokens_s=round(tps["lasp1"]),
                        ring_tokens_s=round(tps["ring"]), lasp2_gain_over_ring=round(tps["lasp2"] / tps["ring"] - 1, 3),
                        lasp2_gain_over_lasp1=round(tps["lasp2"] / tps["lasp1"] - 1, 3)))
    return out


def sp_crossover(cluster, calib, *, gpus=(8, 16, 32, 64), lengths=(131072, 524288, 1048576)) -> list[dict]:
    out = []
    for n in gpus:
        for length in lengths:
            row = dict(gpus=n, tokens=length)
            for method in ("ring", "ulysses", "usp"):
                o = ["model=llama_8b", "data=synthetic", f"data.seq_len={length}", "data.distribution=fixed",
                     f"data.mean_len={length}", f"parallel.cp={n}", "parallel.dp=1", "train=long",
                     "train.activation_checkpointing=full", f"parallel.softmax_sp={method}"]
                if method == "usp":
                    u = min(n, cluster.gpus_per_node)
                    if u == n:
                        row[method] = None  # one node: usp is Ulysses
                        continue
                    o.append(f"parallel.ulysses_degree={u}")
                if method == "ulysses" and 32 % n:
                    row[method] = None  # Ulysses splits 32 heads: at most 32 ranks
                    continue
                r = predict_step(_cfg(*o), n, cluster, calib)
                row[method] = round(r["tokens_per_s"])
            best = max((m for m in ("ring", "ulysses", "usp") if row.get(m)), key=lambda m: row[m])
            row["best"] = best
            out.append(row)
    return out


PUBLISHED = {
    "distca": "DistCA (Zhuang et al., 2025): 1.07-1.20x over per-document CP without PP, 1.10-1.35x with PP, 16-512 H200",
    "lasp": "LASP-2 (Sun et al., 2025, arXiv 2502.07563): +36.6% training speed over ring attention and +15.2% over LASP "
            "at 2048k tokens on 64 GPUs, Linear-Llama3-1B",
    "crossover": "USP (Fang & Zhao, 2024): Ulysses inside a node, ring across nodes; Ulysses is capped by the head count",
    "dp_disagg": "Predicted whole steps (Llama-8B, H200, tp=8): plain data parallelism, every layer waiting for the dp "
                 "rank whose documents cost most, against disaggregation over dp x cp (parallel.disagg.group=dp_cp)",
    "dp_disagg_measured": "seqpar's own 2-GPU disagg benchmark (attention only, fwd+bwd of one layer; the H100 and H200 "
                          "runs of 2026-11-25/26, each under its run folder and, from the fifth session on, its call and "
                          "lane; speedup_no_pingpong: the local halves in eras 2-5, one nano-batch before; speedup_single: one "
                          "call per server, the default since 219ea22, timed from d987b2e on): the same comparison "
                          "measured",
}


def markdown(name: str, rows: list[dict]) -> str:
    if not rows:
        return f"## {name}\n\n(no rows)\n"
    keys = list(rows[0])
    lines = [f"## {name}", "", PUBLISHED.get(name, ""), "", "| " + " | ".join(keys) + " |",
             "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(k) is None else f"{r[k]:,}" if isinstance(r[k], int) else str(r[k])
                                       for k in keys) + " |")
    return "\n".join(lines) + "\n"


def plot(out_dir: Path, results: dict) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib); the tables are written")
        return []
    files = []

    def save(fig, name):
        files.append(str(out_dir / name))
        fig.tight_layout()
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    context = min(r["context"] for r in results["distca"])
    for ax, pp, band in ((axes[0], 1, (1.07, 1.20)), (axes[1], 4, (1.10, 1.35))):
        for mix in sorted({r["mix"] for r in results["distca"]}):
            rs = [r for r in results["distca"] if r["mix"] == mix and r["pp"] == pp and r["context"] == context]
            ax.plot([r["gpus"] for r in rs], [r["speedup_vs_wlb"] for r in rs], marker="o", label=f"{mix}, vs WLB packing")
            ax.plot([r["gpus"] for r in rs], [r["speedup_vs_in_order"] for r in rs], marker="x", ls=":",
                    label=f"{mix}, vs rows in order")
        ax.axhspan(*band, color="grey", alpha=0.2, label="DistCA paper")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (H200)")
        ax.set_title(f"pp={pp}, {context // 1024}k context")
    axes[0].set_ylabel("DistCA speedup over per-document CP")
    axes[0].legend(fontsize=7)
    save(fig, "distca.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    rs = results["lasp"]
    ax.plot([r["tokens"] for r in rs], [100 * r["lasp2_gain_over_ring"] for r in rs], marker="o", label="predicted, vs ring")
    ax.scatter([2097152], [36.6], color="red", zorder=3, label="LASP-2 paper, vs ring")
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=100)
    ax.set_xlabel("tokens (64 GPUs)")
    ax.set_ylabel("LASP-2 throughput gain (%)")
    ax.legend()
    save(fig, "lasp_vs_ring.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    length = max(r["tokens"] for r in results["crossover"])
    for method in ("ring", "ulysses", "usp"):
        rs = [r for r in results["crossover"] if r["tokens"] == length and r.get(method)]
        ax.plot([r["gpus"] for r in rs], [r[method] for r in rs], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs (H100, 8 per node)")
    ax.set_ylabel("predicted tokens/s")
    ax.set_title(f"llama_8b, {length // 1024}k tokens, cp = all GPUs")
    ax.legend()
    save(fig, "crossover.png")
    return files


def main(out: str) -> int:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = calibrate()
    h100, h200 = load_cluster("h100_8x400g"), load_cluster("h200_8x400g")
    results = {"distca": distca(h200, calib), "lasp": lasp_vs_ring(h100, calib), "crossover": sp_crossover(h100, calib),
               "dp_disagg": dp_disagg(h200, calib), "dp_disagg_measured": measured_dp_disagg()}
    text = "\n".join(markdown(k, v) for k, v in results.items())
    (out_dir / "sweep.md").write_text(text)
    (out_dir / "sweep.json").write_text(json.dumps({"published": PUBLISHED, **results}, indent=1))
    print(text)
    for f in plot(out_dir, results):
        print("wrote", f)
    return 0
