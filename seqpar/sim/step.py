"""One training step of a config on a cluster: time per part, tokens/s, MFU and memory per rank.

Per micro-batch and pipeline stage, each layer costs its matmuls + element-wise passes + attention
(by method, `attention_cost`) + tensor-parallel collectives (Megatron-SP: two all-gathers and two
reduce-scatters of the activations forward, the same backward; exposed). A stage never runs faster
than the host launches its layers (`layer_overhead_s` per layer and micro-batch: eager mode
launches every kernel from Python, ahead of the GPU; small models are launch-bound). The step is then

    n_micro stage times x (1 + (pp - 1) / (v * n_micro))      1F1B (v = 1) or interleaved bubble
    + pipeline sends, + FSDP gathers / reduce-scatters not hidden behind compute, + AdamW.

(DeepSpeed ZeRO-1/2: whole parameters, the gradients' reduce-scatter per micro-batch and one
all-gather of the updated parameters, exposed.)

Data-parallel ranks draw their own rows (a document-length mix gives each different work) and meet
at FSDP's collectives every layer: a layer's attention lasts as long as the slowest dp rank's
(`dp_attention`; the mean over MAX_DRAWS micro-batches drawn). With
`parallel.disagg.group=dp_cp` the dp ranks' rows are joined into one row (as
`seqpar.attention.disagg.rows.join_row_bounds` joins them) whose attention the planner spreads
over all dp x cp ranks: the straggler becomes the busiest server after balancing, plus the
all-to-alls of the work it moved (`parts_s`/`dp_attention` report both sides).

Memory comes from seqpar.memory.estimate (the same estimate `seqpar-train --dry-run` prints).
"""
from __future__ import annotations

import copy
import functools

from seqpar.sim.attention_cost import (allgather_layer, disagg_layer, disagg_moved_bytes, disagg_speed, lasp_layer,
                                       perdoc_layer, ring_layer, ulysses_layer, usp_groups)
from seqpar.memory import MARGIN  # the share of a GPU's memory a run may plan to use
from seqpar.sim.comm import collective_time, dim_stride, group_of, overlapped, placed
from seqpar.sim.compute import elementwise_time, loss_bytes_per_token, matmul_time


# micro-batches drawn per prediction (each: every dp rank its own rows), however few a step has: their
# mean is the expected step of a run. One draw (a step of one micro-batch per rank) predicted a wlbllm
# run's step 1.58x too slow (2026-11-27-2gpu-12th): that mix's first rows hold 2.6x the attention of its mean
MAX_DRAWS = 16


class LayoutError(ValueError):
    """A layout that cannot run (degrees that do not multiply to the GPUs, heads that do not split)."""


def sizes_of(cfg, world: int) -> dict[str, int]:
    p = cfg.parallel
    fixed = p.pp * p.cp * p.tp
    if p.dp == -1:
        if world % fixed:
            raise LayoutError(f"parallel.pp*cp*tp={fixed} does not divide the {world} GPUs")
        dp = world // fixed
    else:
        dp = p.dp
        if dp * fixed != world:
            raise LayoutError(f"parallel.dp*pp*cp*tp={dp * fixed} must equal the {world} GPUs")
    return {"pp": p.pp, "dp": dp, "cp": p.cp, "tp": p.tp}


def row_documents(cfg, rows: int) -> list[tuple[int, ...]]:
    """Document bounds of `rows` packed rows of data.seq_len tokens, drawn as seqpar.data draws them
    (documents cut at row ends); the byte corpus gives one document per row. `fixed` lengths: the
    windows the loader hands out (`packed_windows`), whose EOS tokens shift every later window."""
    d = cfg.data
    S = d.seq_len
    if d.name != "synthetic":
        return [(0, S)] * rows
    if d.distribution == "fixed":
        return list(packed_windows(S, d.mean_len, d.num_tokens, getattr(d, "max_len", None), d.seed, cfg.train.seed,
                                   rows))
    from seqpar.data.synthetic import synthetic_lengths

    lengths = synthetic_lengths(S * rows, d.distribution, seed=d.seed, mean_len=d.mean_len, sigma=d.sigma,
                                max_len=d.max_len, lengths_file=d.lengths_file).tolist()
    out, it, carry = [], iter(lengths), 0
    for _ in range(rows):
        bounds, pos = [0], 0
        while pos < S:
            n = carry or next(it)
            take = min(n, S - pos)
            carry = n - take
            pos += take
            bounds.append(pos)
        out.append(tuple(bounds))
    return out



@functools.lru_cache(maxsize=64)
def packed_windows(S: int, doc_len: int, num_tokens: int, max_len, data_seed: int, seed: int,
                   rows: int) -> tuple[tuple[int, ...], ...]:
    """Bounds of the first `rows` windows seqpar.data's loader hands out of documents of `doc_len`
    tokens (`data.distribution=fixed`). The packer follows every document with an EOS and windows
    overlap by one token (seqpar.data.packing), so a document of exactly data.seq_len tokens fills
    only window 0; every later window holds the tail of one document and the head of the next
    ([0, i, S] for window i). That makes the row a packed (varlen) attention call: seqpar's Triton
    kernel since TRITON_FASTER named the case, torch's varlen flash before, never cuDNN (the
    profile of llama_1b dp2 at 32k, 2026-11-26-4xh100-5th: _attn_fwd / _attn_bwd_* on every layer)."""
    import numpy as np

    from seqpar.data.loader import PackedLoader
    from seqpar.data.packing import PackedSequences
    from seqpar.data.synthetic import SyntheticDocuments, synthetic_lengths

    lengths = synthetic_lengths(num_tokens, "fixed", seed=data_seed, mean_len=doc_len, max_len=max_len)
    data = PackedSequences(SyntheticDocuments(lengths, seed=data_seed), S)
    if len(data) == 0:
        return ((0, S),) * rows
    order = PackedLoader(data, global_batch_size=1, micro_batch_size=1, dp_rank=0, dp_size=1, seed=seed)
    out = []
    for j in range(rows):  # with one window per "batch", batch j is position j of the loader's order
        i = int(order.global_indices(j)[0])
        lo = i * S
        # packing.PackedSequences.__getitem__'s cu_seqlens, from the document starts (no tokens read)
        inner = data.starts[(data.starts > lo) & (data.starts < lo + S)] - lo
        out.append(tuple(int(x) for x in np.concatenate([[0], inner, [S]])))
    return tuple(out)

def dp_draws(cfg, dp: int, rows_per_rank: int, doc_bounds=None) -> list[list[list[tuple[int, ...]]]]:
    """draws[k][d]: the rows of dp rank d in drawn micro-batch k (consecutive rows of the data's
    draw; MAX_DRAWS of them, however many a step has). Given `doc_bounds`, every rank holds those
    rows (one draw)."""
    if doc_bounds is not None:
        return [[list(doc_bounds)] * dp]
    k = MAX_DRAWS
    drawn = row_documents(cfg, k * dp * rows_per_rank)
    per = rows_per_rank
    return [[drawn[(i * dp + d) * per:(i * dp + d + 1) * per] for d in range(dp)] for i in range(k)]


def disagg_schedule(opts) -> str | None:
    """`parallel.disagg.schedule` (219ea22 on), or the `ping_pong` flag of the configs before it (then
    None: the era's default without ping-pong, `attention_cost.default_schedule`)."""
    if opts.get("schedule"):
        return opts["schedule"]
    return "ping_pong" if opts.get("ping_pong") else None


def dp_cp_disagg(cfg) -> bool:
    """Whether attention work moves between data-parallel ranks (`parallel.disagg.group=dp_cp`, the
    default; callers also need dp > 1)."""
    p = cfg.parallel
    return p.softmax_sp == "disagg" and ((getattr(p, "disagg", None) or {}).get("group", "dp_cp") == "dp_cp")


def joined_row(rows: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The dp ranks' rows end to end (rank order): `join_row_bounds`' virtual row."""
    out = [0]
    for r in rows:
        offset = out[-1]
        out += [offset + b for b in r[1:]]
    return tuple(out)


def dp_attention(kind, cfg, calib, cluster, sizes, draws, tokens_rank, family) -> tuple[tuple, dict]:
    """((seconds, exposed comm, compute) of one layer's attention on the slowest dp rank, averaged
    over the draws; {imbalance, moved_bytes}). Under disagg over dp_cp (softmax layers) the joined row is
    planned over dp x cp servers; otherwise each dp rank runs its own rows and the slowest sets the pace."""
    from seqpar.model.transformer import head_dim

    m, p = cfg.model, cfg.parallel
    dp, cp = sizes["dp"], sizes["cp"]
    cache, total, imbalance, moved = {}, [0.0, 0.0, 0.0], [], []
    for ranks in draws:
        if kind == "S" and dp > 1 and dp_cp_disagg(cfg):
            if any(len(rows) != 1 for rows in ranks):
                raise LayoutError("parallel.disagg.group=dp_cp joins one packed row per rank: train.micro_batch_size=1")
            H, Hkv, D = m.n_heads // p.tp, max(1, m.n_kv_heads // p.tp), head_dim(m)
            opts = getattr(p, "disagg", None) or {}
            group = placed(dp * cp, dim_stride(sizes, "cp"), cluster.gpus_per_node)  # dp x cp flattened
            joined = joined_row([rows[0] for rows in ranks])
            kw = dict(eps=opts.get("eps", 0.1), min_chunk=opts.get("min_chunk", 128))
            weight = opts.get("triton_cost")
            t = disagg_layer(calib, cluster, [joined], dp * cp, H, Hkv, D, group, family,
                             schedule=disagg_schedule(opts), triton_cost=weight, **kw)
            moved.append(disagg_moved_bytes(joined, dp * cp, H, Hkv, D, speed=disagg_speed(calib, H, D, weight), **kw))
            own = [_cached(cache, kind, cfg, calib, cluster, {**sizes, "dp": 1}, rows, tokens_rank, family)[0]
                   for rows in ranks]  # before balancing: each rank its own rows
            imbalance.append(max(own) / (sum(own) / len(own)))
        else:
            per = [_cached(cache, kind, cfg, calib, cluster, sizes, rows, tokens_rank, family) for rows in ranks]
            t = max(per, key=lambda x: x[0])
            imbalance.append(t[0] / (sum(x[0] for x in per) / len(per)))
        total = [a + b for a, b in zip(total, t)]
    n = len(draws)
    info = {"imbalance_before": sum(imbalance) / n}
    if moved:
        info["moved_bytes_per_rank"] = sum(moved) / n
    return tuple(x / n for x in total), info


def _cached(cache, kind, cfg, calib, cluster, sizes, rows, tokens_rank, family):
    key = (tuple(rows), sizes["dp"])
    if key not in cache:
        cache[key] = _attention(kind, cfg, calib, cluster, sizes, rows, tokens_rank, family)
    return cache[key]


def _attention(kind, cfg, calib, cluster, sizes, rows, tokens_rank, family):
    from seqpar.model.transformer import head_dim

    m, p = cfg.model, cfg.parallel
    H, Hkv, D = m.n_heads // p.tp, max(1, m.n_kv_heads // p.tp), head_dim(m)
    cp = sizes["cp"]
    group = group_of(sizes, "cp", cluster.gpus_per_node)
    if kind == "L":
        return lasp_layer(calib, cluster, rows, cp, H, D, group, p.linear_sp)
    method = p.softmax_sp if cp > 1 else "ring"
    args = (calib, cluster, rows, cp, H, Hkv, D, group, family)
    if method == "ring":
        return ring_layer(*args, layout=p.layout if cp > 1 else "zigzag")
    if method == "ulysses":
        return ulysses_layer(*args)
    if method == "allgather":
        return allgather_layer(*args, layout=p.layout)
    if method == "perdoc":
        return perdoc_layer(*args)
    if method in ("disagg", "disagg_overlap"):
        # parallel.disagg.schedule: seqpar's nano-batch schedules; disagg_overlap (the sweep's DistCA):
        # every all-to-all hidden behind the other nano-batch's attention
        opts = getattr(p, "disagg", None) or {}
        overlap = "distca" if method == "disagg_overlap" else False
        return disagg_layer(*args, overlap=overlap, schedule=disagg_schedule(opts), eps=opts.get("eps", 0.1),
                            min_chunk=opts.get("min_chunk", 128), triton_cost=opts.get("triton_cost"))
    if method == "usp":
        u = p.ulysses_degree
        ug, rg = usp_groups(sizes, u, cluster.gpus_per_node)
        # Ulysses exchanges first (whole sequence of the Ulysses group for H/u heads), then the ring
        _, a2a, _ = ulysses_layer(calib, cluster, [(0, b[-1] * u // cp) for b in rows], u, H, Hkv, D, ug, family)
        t, exposed, compute = ring_layer(calib, cluster, rows, cp // u, H // u, max(1, Hkv // u), D, rg, family)
        return t + a2a, exposed + a2a, compute
    raise LayoutError(f"parallel.softmax_sp={method!r}: the simulator models ring, ulysses, usp, allgather, disagg "
                      "(and, for comparisons, perdoc and disagg_overlap)")


def predict_step(cfg, world: int, cluster, calib, *, family: str = "cudnn", virtual_stages: int | None = None,
                 doc_bounds: list[tuple[int, ...]] | None = None, torch_elementwise: bool = False) -> dict:
    """The step time and its parts (seconds), tokens/s, MFU, memory; see the module docstring.
    `torch_elementwise`: the run used torch's norms, RoPE and loss (seqpar before its Triton kernels)."""
    from seqpar.model.flops import block_params, count_params, step_flops
    from seqpar.model.transformer import layer_types
    from seqpar.parallel.pipeline import stage_layers
    from seqpar.sim.configs import as_plain

    cfg = as_plain(cfg)
    m, par, t = cfg.model, cfg.parallel, cfg.train
    sizes = sizes_of(cfg, world)
    v = virtual_stages or getattr(par, "virtual_stages", None) or 1  # parallel.virtual_stages: interleaved 1F1B
    dp, tp, pp, cp = sizes["dp"], sizes["tp"], sizes["pp"], sizes["cp"]
    S, b = cfg.data.seq_len, t.micro_batch_size
    if t.global_batch_size % (dp * b):
        raise LayoutError(f"train.global_batch_size={t.global_batch_size} is not a multiple of dp x "
                          f"train.micro_batch_size = {dp} x {b}")
    # the document layouts cut each packed row by its documents (padding them): any length
    if S % {"zigzag": 2 * cp, "contiguous": cp}.get(par.layout, 1):
        raise LayoutError(f"data.seq_len={S} does not split into the {par.layout} chunks of parallel.cp={cp}")
    n_micro = t.global_batch_size // (dp * b)
    draws = dp_draws(cfg, dp, b, doc_bounds)
    tokens_rank = b * S // cp
    kinds = layer_types(m)
    params = block_params(m)
    act, hbm = 2, cluster.hbm_bytes_per_s
    tp_group = group_of(sizes, "tp", cluster.gpus_per_node)

    layer, dp_info = {}, {}
    for kind in set(kinds):
        mm = matmul_time(6 * params[kind] / tp * tokens_rank, cluster)
        ew = elementwise_time(m, kind, tp, par.tp_sequence_parallel, tokens_rank, calib, hbm, torch_elementwise)
        (attn, attn_exposed, attn_compute), dp_info[kind] = dp_attention(kind, cfg, calib, cluster, sizes, draws,
                                                                          tokens_rank, family)
        tp_comm = 0.0
        if tp > 1:
            full = tokens_rank * m.d_model * act
            tp_comm = 4 * (collective_time("all_gather", full, tp_group, cluster, calib.comm)
                           + collective_time("reduce_scatter", full, tp_group, cluster, calib.comm))
            if par.tp_sequence_parallel:
                # DTensor scatters the stream along the sequence (dim 1 of [B, S, d]) through dim 0:
                # torch's reduce_scatter_single first joins the chunks with a torch.cat, a copy of the
                # whole [S, d] (read and written) per reduce-scatter; its all_gather_single returns a
                # view when B = 1 (pytorch#169404), else it copies too
                copies = 4 + (4 if b > 1 else 0)
                tp_comm += copies * 2 * full / hbm
        # checkpointing runs forwards again in backward: the whole block (full), or norms and MLP
        # (selective); a forward is 1/3 of matmul fwd+bwd work and 1/3.5 of attention's
        mlp_share = 3 * m.d_model * m.ffn_dim / params[kind]
        mlp_forward = (mm * mlp_share + ew / 2) / 3
        if t.activation_checkpointing == "full":
            recompute = (mm + ew + tp_comm / 2) / 3 + attn / 3.5
        elif t.activation_checkpointing == "selective":
            recompute = mlp_forward
        else:
            recompute = 0.0
        if 0 < getattr(t, "mlp_chunk_tokens", 0) < S // cp:
            # the chunked MLP checkpoints each chunk (model/layers.py SwiGLU): its forward runs once
            # more in backward, inside whatever the checkpointing above already recomputes
            recompute += mlp_forward
        gpu = mm + ew + attn + tp_comm + recompute
        layer[kind] = dict(total=gpu, matmul=mm, elementwise=ew, attention=attn,
                           attention_comm_exposed=attn_exposed, tp_comm=tp_comm, recompute=recompute)

    stages = stage_layers(m, par, S) if pp > 1 else [list(range(m.n_layers))]
    head_mm = matmul_time(6 * m.vocab_size * m.d_model / tp * tokens_rank, cluster)
    head_ew = loss_bytes_per_token(m.vocab_size // tp) * tokens_rank * calib.elementwise_factor / hbm
    if not torch_elementwise and tp == 1:  # the fused linear + cross-entropy kernel: its measured share of the unfused time
        head_ew = calib.fused_ce_ratio * (head_mm + head_ew) - head_mm
    if tp > 1:
        # parallel/vocab_parallel.py: eager torch ops on fp32 logit chunks (not the fused kernel),
        # two blocking all-reduces of per-row numbers per 4096-row chunk and one of grad_hidden
        # (fp32 [tokens, d]); Megatron-SP adds the embedding's reduce-scatter (its gradient's
        # all-gather) and the final norm's all-gather (its gradient's reduce-scatter) per micro-batch
        full = tokens_rank * m.d_model * act
        chunks = -(-tokens_rank // 4096)
        head_ew += (2 * chunks * collective_time("all_reduce", 8 * 4096, tp_group, cluster, calib.comm)
                    + collective_time("all_reduce", 2 * full, tp_group, cluster, calib.comm))
        if par.tp_sequence_parallel:
            head_ew += 2 * (collective_time("all_gather", full, tp_group, cluster, calib.comm)
                            + collective_time("reduce_scatter", full, tp_group, cluster, calib.comm))
    stage_times = []
    for s, layers in enumerate(stages):
        st = sum(layer[kinds[i]]["total"] for i in layers)
        if s == len(stages) - 1:
            st += head_mm + head_ew
        stage_times.append(st)
    stage = max(stage_times)
    bubble = (pp - 1) / (v * n_micro)
    # the host launches ahead of the GPU; it sets the pace only when it is slower than the GPU work
    host = n_micro * max(len(layers) for layers in stages) * calib.layer_overhead_s
    stage = max(stage, host / n_micro)
    pipeline = n_micro * stage * (1 + bubble)
    p2p = 0.0
    if pp > 1:
        pp_group = group_of(sizes, "pp", cluster.gpus_per_node)
        # each micro-batch crosses every rank boundary once per virtual stage, each way
        p2p = 2 * v * n_micro * collective_time("send_recv", tokens_rank * m.d_model * act, pp_group, cluster,
                                                calib.comm)

    # FSDP2 over dp x cp (parallelize.py: fully_shard, no mixed-precision policy, so fp32): gather
    # the stage's parameters forward and backward and reduce-scatter the gradients for each
    # micro-batch (the engine never turns gradient sync off between micro-batches); prefetched
    # behind the layers' compute
    shards = dp * cp
    stage_params = max(sum(params[kinds[i]] for i in layers) for layers in stages) / tp \
        + m.vocab_size * m.d_model * (1 if pp > 1 else 2) / tp
    fsdp = fsdp_exposed = 0.0
    deepspeed = getattr(par, "dp_engine", "fsdp2") == "deepspeed" and (getattr(par, "zero_stage", None) or 2) < 3
    if shards > 1 and deepspeed:
        # DeepSpeed ZeRO-1/2 (parallel/engine.py's config): parameters stay whole on every rank, so
        # nothing is gathered in forward or backward; the fp32 gradients (no module is marked
        # lower-precision-safe) are reduced in each micro-batch's backward from DeepSpeed's own
        # hooks on the compute stream (overlap_comm is off below stage 3 unless the config says so),
        # and the updated parameters are all-gathered once after the optimizer step: all exposed
        g = placed(shards, tp, cluster.gpus_per_node)
        p_bytes = 4 * stage_params
        fsdp = fsdp_exposed = (n_micro * collective_time("reduce_scatter", p_bytes, g, cluster, calib.comm)
                               + collective_time("all_gather", p_bytes, g, cluster, calib.comm))
    elif shards > 1:
        g = placed(shards, tp, cluster.gpus_per_node)
        p_bytes = 4 * stage_params
        fsdp = n_micro * (2 * collective_time("all_gather", p_bytes, g, cluster, calib.comm)
                          + collective_time("reduce_scatter", p_bytes, g, cluster, calib.comm))
        fsdp_exposed = overlapped(pipeline, fsdp, calib.overlap_tax) - pipeline
    local_params = stage_params / max(1, shards)
    optimizer = 28 * local_params / hbm  # fused AdamW: read p, g, m, v and write p, m, v in fp32
    total = pipeline + p2p + fsdp_exposed + optimizer

    all_rows = row_documents(cfg, t.global_batch_size) if doc_bounds is None else doc_bounds * n_micro * dp
    flops = sum(step_flops(m, [e - a for a, e in zip(r[:-1], r[1:])]) for r in all_rows)
    tokens = t.global_batch_size * S
    mem = memory_per_rank(cfg, world)
    return {
        "step_s": total, "tokens_per_s": tokens / total, "mfu": flops / (total * world * cluster.peak_flops),
        "tflops_per_gpu": flops / total / world / 1e12,
        "layout": dict(sizes, n_micro=n_micro, micro_batch_size=b, softmax_sp=par.softmax_sp, linear_sp=par.linear_sp,
                       ulysses_degree=par.ulysses_degree, activation_checkpointing=t.activation_checkpointing),
        "parts_s": {"pipeline_compute": pipeline - n_micro * stage * bubble, "pipeline_bubble": n_micro * stage * bubble,
                    "pipeline_p2p": p2p, "fsdp_exposed": fsdp_exposed, "fsdp_total": fsdp, "optimizer": optimizer},
        "per_layer_s": {k: {n: round(x, 6) for n, x in v.items()} for k, v in layer.items()},
        "bubble_fraction": bubble / (1 + bubble),
        "dp_attention": {k: {n: round(float(x), 4) if n == "imbalance_before" else float(x) for n, x in v.items()}
                         for k, v in dp_info.items()},
        "memory_gib": mem["total_gib"], "memory": mem,
        "fits": mem["total_gib"] * 2**30 <= MARGIN * cluster.memory_bytes,
        "params": count_params(m),
    }


def memory_per_rank(cfg, world: int, *, split: bool = True) -> dict:
    """seqpar.memory's estimate as the CUDA run sees it (bf16 autocast), whatever this machine has;
    `split`: with the split attention's cuDNN scratch (runs of code before 235a598 had none)."""
    from seqpar.memory import GiB, estimate
    from seqpar.sim.configs import as_plain

    c = copy.deepcopy(as_plain(cfg))
    c.train.device = "cuda"
    est = estimate(c, world, split=split)
    return {"total_gib": est.total / GiB, "params_gib": est.params / GiB, "grads_gib": est.grads / GiB,
            "optimizer_gib": est.optimizer / GiB, "activations_gib": est.activations / GiB,
            "loss_gib": est.loss / GiB, "transient_gib": est.transient / GiB, "transient_what": est.transient_what,
            "fixed_gib": est.fixed / GiB}
