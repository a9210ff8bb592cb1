"""When each benchmark run ran, with which code and on which card.

A run belongs to the code era of the last change before it (`CODE_CHANGES`); its date comes from its
file, the timed JSONs beside it or in its call, or the day its run folder is named for, bounded by
the commit that added it (`COMMITTED_BY`). Files lie in dated run folders (`YYYY-MM-DD-...`), from
the fifth session of 2026-11-26 on in lanes below them (`callN/<lane>/`): `run_folder` and `run_key`
name a file by its run folder.
"""
from __future__ import annotations

import datetime
import functools
import json
from pathlib import Path


# Commits after which what a runtime costs beyond its kernels changed (the fitted extras, the ring's
# per-step work): a measurement belongs to the era of the last change before it ran. Each era's
# constants are fitted on its own runs (those it has no runs for are the previous era's), each
# case is predicted with its era's constants, and predictions for today's code use the latest.
CODE_CHANGES = (
    ("2026-11-26T00:55:00+00:00", ("79fc72c LASP-2 exchange hook, 7a17a3f ring fold plans, 1fad4de disagg runtime "
                                   "without per-token index ops, e049981 lightning kernel one-scan exchange")),
    # no run yet: today's code differs from era 1's in what attention_cost models from this era on
    # (`era_since("c8d5eb5")`), never in fitted constants, which are era 1's until a run here
    ("2026-11-26T04:07:39+00:00", ("c8d5eb5 one-document calls with bounds and an lse (a one-task disagg server, the "
                                   "ring's bounded one-document blocks) on seqpar's Triton flash instead of FA2 varlen, "
                                   "e23bcd3 (04:13:39) disagg without ping-pong as L1, R, L2 instead of local then "
                                   "remote")),
    # no run yet: what attention_cost models changes (`era_since("755a3a8")`), not the constants
    ("2026-11-26T05:56:48+00:00", ("755a3a8 disagg without ping-pong keeps the same local work for L2 on every "
                                   "server (was half of each server's local work)")),
    # no run yet: what attention_cost models changes back (`era_since("852d464")`), not the constants
    ("2026-11-26T08:13:57+00:00", ("852d464 disagg without ping-pong back to each server's local work halved "
                                   "around R (reverts 755a3a8)")),
    # no run yet: what attention_cost models changes (`era_since("235a598")`), not the constants
    ("2026-11-26T10:10:47+00:00", ("235a598 packed self-attention rows (flash_attn without lse) through the "
                                   "split: documents of >= 4096 tokens on cuDNN at their bucket length, the rest "
                                   "in one Triton call (SPLIT_FASTER)")),
    # what attention_cost models changes (`era_since("219ea22")`: the default schedule), not the constants
    ("2026-11-26T10:14:53+00:00", ("219ea22 disagg's default schedule single (one kernel call per server, its "
                                   "transfers exposed; parallel.disagg.schedule=single|halves|ping_pong replaces "
                                   "ping_pong)")),
    # what attention_cost models changes (`era_since("b77bec6")`), not the constants
    ("2026-11-26T10:22:56+00:00", ("b77bec6 the split only for packed rows with equal query and K/V head counts "
                                   "(GQA rows back on the Triton kernel unless forced)")),
    # what attention_cost models changes (`era_since("8969915")`), not the constants
    ("2026-11-26T10:28:24+00:00", ("8969915 the split for GQA rows again, documents on cuDNN only up to "
                                   "max_doc_len (2 GiB of cuDNN scratch: 52k tokens at 32 query heads x 64 "
                                   "dims, ten tensors per token), longer ones in the Triton call")),
    # what attention_cost models changes (`era_since("cec5aa8")`: `lse_split_applies`), not the ring and
    # kernels benchmarks' constants (`SAME_KERNEL_BENCHES`)
    ("2026-11-26T12:13:34+00:00", ("cec5aa8 calls with bounds and an lse (ring blocks with cu_seqlens, disagg "
                                   "and per-document CP servers) through the split's lse form (SPLIT_FASTER "
                                   "packed_lse): square tasks of 4096..max_doc_len tokens on cuDNN at their bucket "
                                   "length, the rest in one Triton call")),
    # no run yet: what attention_cost models changes (`era_since("9a4c89d")`: `lse_prefix_applies`)
    ("2026-11-26T12:33:04+00:00", ("9a4c89d the split's lse form also sends causal tasks of >= 4096 queries over "
                                   "a longer prefix (at most max_doc_len keys) to cuDNN: a causal call of blank + "
                                   "real queries at a bucket length and a non-causal call over the prefix "
                                   "(SEQPAR_CUDNN_PREFIX=0 keeps them in the Triton call)")),
    # the lightning kernel's own speed (`fit_linear` on its rows from this era on: `lightning_eras`);
    # the softmax kernels, the ring and the disagg runtime are unchanged (SAME_KERNEL_BENCHES)
    ("2026-11-26T14:18:52+00:00", ("83f5aae lightning kernel segments: the longest with (tokens // (2 x segment)) "
                                   "x heads >= SMs (was >= 4 x SMs), 2048-token segments from 16k tokens on")),
    # not modelled: its per-call head rule meets no run of this era (no split call of its runs has fewer
    # than 8 query heads), so its cases are priced as era 11's code; its runs still date its constants
    ("2026-11-26T14:26:40+00:00", ("7a02c2d the split (both forms) only for calls of >= SPLIT_MIN_HEADS (8) query "
                                   "heads; below, one Triton call (tensor parallelism's share of the heads)")),
    # no run yet: what attention_cost models changes (`era_since("790f716")`: `split_min_len`)
    ("2026-11-26T15:17:23+00:00", ("790f716 the split (both forms) for every call again, its documents (tasks) on "
                                   "cuDNN from split.min_doc_len(query heads) = max(4096, 65536 / heads) tokens "
                                   "(8192 at 8 heads, 16384 at 4), replacing 7a02c2d's SPLIT_MIN_HEADS")),
    # the LASP-2 exchange's wait (its fitted extras), not the kernels (SAME_KERNEL_BENCHES)
    ("2026-11-26T17:19:44+00:00", ("6619ad8 LASP-2: a rank whose chunks receive no state skips waiting for the "
                                   "exchange (ChunkChain.receives) and settles it after its passes")),
    # the ring's per-step work (its fitted extras), not the kernels (SAME_KERNEL_BENCHES)
    ("2026-11-26T17:32:06+00:00", ("47528c5 kernels.attn_merge_: a ring step's (out, lse) folded into the running "
                                   "result in one Triton pass (525bf9f: no fp32 running buffer at cp=2)")),
    # what attention_cost models changes (`era_since("a8a710a")`: the plan's KernelSpeed); no run of its own
    # (6eda7f2 followed before the next GPU call)
    ("2026-11-26T19:51:48+00:00", ("a8a710a disagg's planner weighs each task's score pairs by the kernel its "
                                   "server runs it on (parallel.disagg.triton_cost: 1.5 per Triton pair, 1.7 from "
                                   "2737d3b)")),
    # what attention_cost models changes (`era_since("6eda7f2")`: `split_call_seconds`); first runs:
    # 2026-11-26-2gpu-10th
    ("2026-11-26T20:23:25+00:00", ("6eda7f2 the split gives cuDNN the head of a causal document or task past "
                                   "max_doc_len (its first queries whose keys fit), the tail staying in the Triton "
                                   "call")),
    # the disagg runtime's per-step extras (fitted on its runs: 2026-11-27-2gpu-11th calls 1-3), not the kernels
    ("2026-11-26T22:50:47+00:00", ("148d759 disagg plan look-ahead: once a step's backward is queued, the next "
                                   "step's server calls are planned and their new cuDNN shapes built (a forward "
                                   "and backward run per shape; from 73bf75a / 9e5dfe5, 2026-11-27 01:00-01:15, "
                                   "inside a thrown-away CUDA graph capture)")),
    # what attention_cost models changes (`era_since("a63d362")`: `lse_prefix_applies`)
    ("2026-11-27T01:34:28+00:00", ("a63d362 no look-ahead, and the split's lse form keeps causal tasks over a "
                                   "prefix in the Triton call again by default (SEQPAR_CUDNN_PREFIX=1 sends them "
                                   "to cuDNN as 9a4c89d did)")),
    # the Triton kernel's tuning moves from a step's first call in a token bucket to startup
    ("2026-11-27T03:54:46+00:00", ("c52307c train.cudnn_prebuild also tunes the Triton attention kernels for every "
                                   "token bucket of a row (a disagg server's new bucket stalled a step by 5.6 s)")),
    # the Triton flash kernel's backward at head dim <= 64 (llama_1b's heads: the disagg servers' and the
    # split's Triton calls; 2026-11-27-gpu-14th/call3: 5-9% faster per fwd+bwd), D = 128 unchanged
    ("2026-11-27T08:27:07+00:00", ("7262efd the Triton flash backward's dk/dv kernel owns 128 keys at head dim <= 64 "
                                   "(64 before; each warpgroup then owns 64 keys)")),
    # the Triton flash kernels themselves (2026-11-27-gpu-15th/call2: 4-10% faster fwd+bwd on one H100)
    ("2026-11-27T10:46:28+00:00", ("1693e8a the Triton flash kernels load their inner blocks through TMA descriptors "
                                   "on sm_90+ (SEQPAR_TMA=0: pointer loads as before)")),
    # what attention_cost models changes (`era_since("ff4de8f")`: `disagg_speed`), not the constants
    ("2026-11-27T11:08:59+00:00", ("ff4de8f disagg's planner weighs a Triton score pair 1.55 cuDNN pairs "
                                   "(parallel.disagg.triton_cost; 1.7 before)")),
    # the lightning kernels themselves (2026-11-27-gpu-16th/call2: 2-6% faster fwd+bwd on H200)
    ("2026-11-27T13:07:06+00:00", ("195962d the lightning kernels load their chunks through TMA descriptors on "
                                   "sm_90+ (SEQPAR_TMA=0: pointer loads as before)")),
    # what attention_cost models changes (`era_since("bb52ff6")`: `allgather_layer`), no kernel
    ("2026-11-27T13:11:27+00:00", ("bb52ff6 allgather attention merge-free: one call per query range over its "
                                   "causal prefix (bounds, lse), only the rows a rank sees sent point to point, "
                                   "behind its local-only calls")),
    # the ring's per-step work (its fitted extras), no kernel
    ("2026-11-27T13:19:09+00:00", ("de46c0e the ring's (and all-gather's) pairs of 16-bit gradients summed by "
                                   "torch.add (vectorised) instead of addcmul with an fp32 one (same bits)")),
    # no run yet; `allgather_layer` models this plan for every era from bb52ff6 on (the plan of bb52ff6
    # itself is gone: its all-gather rows, 2026-11-27-gpu-16th calls 3-5, held out of every fit, are
    # predicted with this one's)
    ("2026-11-27T13:42:30+00:00", ("e1a8f31 the all-gather's adjacent pieces one range, and its forward runs a "
                                   "causal range's own rows first and the rows before them after, merged")),
    # the ring's per-step work (its fitted extras), no attention kernel (2026-11-27-gpu-17th/call4: the
    # 2-rank cuDNN ring at 32k 30.99 -> 30.58 ms, its fold ops 1.03 -> 0.28 ms of GPU time per rank)
    ("2026-11-27T15:25:46+00:00", ("ba5602e the ring's gradient sums through kernels.block_sum_ (one Triton pass, "
                                   "fp32, rounded once), a row's three results in one op (trios); the all-gather's "
                                   "dK/dV sums too")),
    # no run yet: the ring's FA2 (and Triton) backward makes one call fewer per rank; attention_cost
    # still prices the rectangle and the diagonal (the probe's ~0.9 ms at 32k is within its error)
    ("2026-11-27T15:46:23+00:00", ("ce206fa the ring backward's own blocks after the remote steps as one call over "
                                   "their local prefix (bottom-right) where the kernel takes it as fast: FA2, "
                                   "Triton; not cuDNN")),
    # the lightning kernels' grid (2026-11-27-gpu-19th/call4: LASP-2 at 256k on 2 H100 10.61 -> 10.07 ms,
    # its one-GPU baseline 20.04 -> 19.64)
    ("2026-11-27T21:37:20+00:00", ("c8f2856 the lightning kernels' segments up to 8192 tokens (2048 before): "
                                   "fewer boundary states")),
    # the lightning output pass's registers (2026-11-28-gpu-25th/call9, one H100: one 64k row 4.69 -> 4.23 ms
    # fwd+bwd, 16 rows of 4k 4.11 -> 3.38); its kernels-bench rows: 2026-11-28-gpu-26th/call7 (one H200)
    ("2026-11-28T08:11:32+00:00", ("0231d9c the lightning output pass scales the state read's rows on its fp32 "
                                   "result and stores its outputs by TMA: no register spills at the tuner's pick")),
    # the ring of 2's K/V shift (2026-11-28-gpu-26th/calls 3-4, 2 H200, alternating with the code before:
    # ring ms at 32k equal within noise with keep, 0.08 ms faster without)
    ("2026-11-28T09:44:17+00:00", ("95a8d48 a ring of 2 sends only the K/V rows its peer's remote step reads "
                                   "(zigzag, causal: rank 0 half its rows), forward and backward")),
    # disagg's communicator (2026-11-28-gpu-27th/call4, 2 H200, wlbllm 128k: ping-pong's waits per call
    # 1.1-4.4 ms -> 0.02, the calls' times equal within noise; call 6: llama_1b dp_cp 1.042x as before)
    ("2026-11-28T11:11:00+00:00", ("f0ec2cd disagg's all-to-alls on a communicator whose NCCL streams run at "
                                   "high priority (training over dp_cp, and the disagg bench)")),
    # no run yet: training's disagg over cp on that communicator too (f0ec2cd's over dp_cp only)
    ("2026-11-28T11:45:45+00:00", ("c885b3a disagg over cp on its own high-priority communicator, apart from "
                                   "LASP-2's cp group")),
    # what attention_cost models changes where a run sets SEQPAR_CUDNN_PREFIX=1 (`era_since("716cea5")`:
    # `_prefix_task_seconds`), not the default's kernels
    ("2026-11-28T12:29:57+00:00", ("716cea5 pieces over a prefix on cuDNN (SEQPAR_CUDNN_PREFIX=1) as non-causal "
                                   "calls of min_len keys and one causal call after < min_len blank rows, taken "
                                   "whenever that causal call fits max_doc_len (was: at most max_doc_len keys, one "
                                   "non-causal call over a bucketed prefix)")),
    # what attention_cost models changes (`era_since("3a77b25")`: the plan's KernelSpeed.row_cost)
    ("2026-11-28T12:54:58+00:00", ("3a77b25 disagg's planner weighs each query row as ROW_COST (1250) cuDNN "
                                   "pairs beyond its score pairs")),
    # what attention_cost models changes (`era_since("be4b206")`: the plan's default triton_cost)
    ("2026-11-28T12:56:47+00:00", ("be4b206 disagg's planner weighs a Triton score pair as 1.3 cuDNN pairs by "
                                   "default (was 1.55)")),
    # what attention_cost models changes where a run sets SEQPAR_CUDNN_PREFIX=1 (`era_since("2ad0d6b")`:
    # `split_call_seconds`' cut tails)
    ("2026-11-28T13:04:57+00:00", ("2ad0d6b with pieces over a prefix on cuDNN, a cut task's tail goes to cuDNN "
                                   "too where it is one (split.cudnn_tail)")),
    # what attention_cost models changes (`era_since("ee7b846")`: `lse_prefix_applies`): 716cea5's and
    # 2ad0d6b's pieces by default (2026-11-28-gpu-29th, 2 H200: e2e 1.025x / 1.030x against 1.036x / 1.042x)
    ("2026-11-28T14:15:29+00:00", ("ee7b846 the split's lse form runs causal pieces over a prefix on cuDNN in "
                                   "chunks by default (SEQPAR_CUDNN_PREFIX=0 keeps them in the Triton call)")),
    # no run yet: disagg's backward runs the nano-batches last to first (halves and ping_pong are
    # symmetric: modelled as before), and the local_remote schedule (`_ping_pong_layer`)
    ("2026-11-28T14:26:58+00:00", ("edcff20 disagg's backward runs its nano-batches last to first; schedule "
                                   "local_remote (L, R; the backward R, L)")),
    # no run yet: opt-in (SEQPAR_LIGHTNING_CHAIN=1); the default launches the same three kernels
    ("2026-11-28T14:35:32+00:00", ("d6df634 the lightning output pass can make the boundary states itself "
                                   "(SEQPAR_LIGHTNING_CHAIN=1, opt-in)")),
    # what a disagg step costs beyond its kernels: no Triton compile or tuning inside steps 2+ (2 H200,
    # 2026-11-28-gpu-30th, llama_1b dp=2 64k/GPU: wlbllm 1.058x -> 1.022x the ideal, prolong 1.075x -> 1.026x)
    ("2026-11-28T15:50:46+00:00", ("2874c1c no compiles or tuning inside steps: the Triton kernel tuned up to a "
                                   "disagg server's rows, the prefix path warmed up, attn_merge unspecialised")),
    # the lightning kernel's grid (2026-11-28-gpu-31st/call4, one H200: 4 rows of 16k 19.6 -> 22.4 Mtok/s fwd+bwd,
    # one 64k row 17.7 -> 18.4; call5, 2 H200: LASP-2 64k 2.43 -> 2.23 ms, 256k 7.33 -> 7.25, 1M 29.8 -> 28.4)
    ("2026-11-28T17:30:28+00:00", ("7b5be80 lightning segments up to 16384 tokens, a grid of 7/8 of the SMs "
                                   "counted full: rows of up to 16k skip the state pass")),
    # a ring of 2 on FA2: each pass's second call fills the first's last wave (2 H200, 2026-11-28-gpu-32nd/call3:
    # 32k FA2 ring 50.48 / 50.53 -> 50.05 / 50.14 ms, compute-only 49.2 -> 48.7-48.9; call7 0.956 in 5 rounds)
    ("2026-11-28T19:06:50+00:00", ("b4fe250 a ring of 2 runs each pass's first call on a high-priority stream "
                                   "(b2cd4b5, 19:15:32: on FA2 only)")),
    # the cp groups' NCCL streams at high priority, the lead's kernel before the K/V post (2 H200,
    # 2026-11-28-gpu-33rd/call2: 32k FA2 keep ring 49.76 / 49.87 -> 49.33 / 49.32 ms; cuDNN the same)
    ("2026-11-28T20:33:42+00:00", "3bb4ed5 the ring's transfers on high-priority NCCL streams, posted after the lead"),
)


# CODE_CHANGES entries that changed only the disagg runtime's schedule (which local work runs when):
# the ring, the attention kernels and their dispatch are the same code before and after them, so the
# ring and kernels benchmarks of those eras measure one thing and are fitted together (`kernel_eras`)
DISAGG_SCHEDULE_ONLY = ("755a3a8", "852d464", "219ea22", "edcff20")
# CODE_CHANGES entries after which the ring and kernels benchmarks still measure the same thing: the
# disagg schedule changes, and cec5aa8 and 9a4c89d, whose changes reach only auto-dispatched calls with an
# lse (the ring bench forces torch's kernels with SEQPAR_ATTN_KERNEL, the kernels bench times no lse
# call); the disagg bench's ring rows that changed are priced per run (`Calibration.lse_split`)
SAME_KERNEL_BENCHES = DISAGG_SCHEDULE_ONLY + ("cec5aa8", "9a4c89d")
# ... and 83f5aae (the lightning kernel only: its rows are fitted per `lightning_eras`), 7a02c2d and 790f716
# (the head rules reach only calls below 16 query heads: the kernels bench times the split and the
# Triton kernel by name, its split rows priced per era by `attention_cost.split_min_len`; the ring
# bench forces torch's kernels, the disagg bench runs 32 heads)
SAME_KERNEL_BENCHES += ("83f5aae", "7a02c2d", "790f716")
# ... and 6619ad8 (the LASP exchange), 47528c5 (the ring's merge), a8a710a (disagg's plan): no kernel changed
SAME_KERNEL_BENCHES += ("6619ad8", "47528c5", "a8a710a")
# ... and 148d759 (disagg's runtime) and a63d362 (as 9a4c89d: only auto-dispatched calls with an lse)
SAME_KERNEL_BENCHES += ("148d759", "a63d362")
# ... and c52307c (tuning at startup: the kernels bench tunes before it times), ff4de8f (disagg's plan)
SAME_KERNEL_BENCHES += ("c52307c", "ff4de8f")
# ... and 195962d (the lightning kernel only, as 83f5aae), bb52ff6 (the all-gather) and de46c0e (the ring's folds)
SAME_KERNEL_BENCHES += ("195962d", "bb52ff6", "de46c0e", "e1a8f31")
# ... and ba5602e (the ring's folds, as de46c0e)
SAME_KERNEL_BENCHES += ("ba5602e",)
# ... and f0ec2cd, c885b3a (disagg's communicator: no kernel, no ring)
SAME_KERNEL_BENCHES += ("f0ec2cd", "c885b3a")
# ... and c8f2856, 0231d9c (the lightning kernel only, as 195962d)
SAME_KERNEL_BENCHES += ("c8f2856", "0231d9c")
# ... and 95a8d48 (the ring's transfers, as 47528c5)
SAME_KERNEL_BENCHES += ("95a8d48",)
# ... and 716cea5 (as 9a4c89d: only auto-dispatched calls with an lse, and only with SEQPAR_CUDNN_PREFIX=1)
SAME_KERNEL_BENCHES += ("716cea5",)
# ... and 3a77b25, be4b206 (disagg's plan, as a8a710a)
SAME_KERNEL_BENCHES += ("3a77b25", "be4b206")
# ... and 2ad0d6b (as 716cea5: only with SEQPAR_CUDNN_PREFIX=1)
SAME_KERNEL_BENCHES += ("2ad0d6b",)
# ... and ee7b846 (as 9a4c89d: only auto-dispatched calls with an lse), d6df634 (opt-in, the default's kernels as before)
SAME_KERNEL_BENCHES += ("ee7b846", "d6df634")
# ... and 2874c1c (startup work; attn_merge keeps its kernel, unspecialised on the row count: memory-bound on o)
SAME_KERNEL_BENCHES += ("2874c1c",)
# ... and 7b5be80 (the lightning kernel's grid only, as 0231d9c)
SAME_KERNEL_BENCHES += ("7b5be80",)
# ... and b4fe250 (the ring's streams, as 95a8d48: the same kernels, the ring's time measured per run)
SAME_KERNEL_BENCHES += ("b4fe250",)
# ... and 3bb4ed5 (the ring's communicator and post order)
SAME_KERNEL_BENCHES += ("3bb4ed5",)
# (not 6eda7f2: the kernels bench's split rows and the disagg bench's servers change with it)
# CODE_CHANGES entries that changed the lightning kernel (79fc72c's entry holds e049981's one-scan
# exchange): its kernels-bench rows measure one kernel only between two of them
LIGHTNING_CHANGES = ("79fc72c", "83f5aae", "195962d", "c8f2856", "0231d9c", "7b5be80")


def kernel_eras(era: int) -> tuple[int, ...]:
    """The eras whose ring and kernels benchmarks measure what era `era`'s do: back to the last
    change that was not in SAME_KERNEL_BENCHES."""
    first = era
    while first > 0 and CODE_CHANGES[first - 1][1].split()[0] in SAME_KERNEL_BENCHES:
        first -= 1
    return tuple(range(first, era + 1))


def lightning_eras(era: int) -> tuple[int, ...]:
    """The eras whose lightning kernel rows measure era `era`'s kernel: `kernel_eras` back to the last
    of LIGHTNING_CHANGES at or before `era`, and forward up to the next change that is not in
    SAME_KERNEL_BENCHES or is itself a lightning change (a kernel first benchmarked after a ring
    change, as 0231d9c's after 95a8d48, still prices the LASP runs made before that change)."""
    since = max((era_since(c) for c in LIGHTNING_CHANGES if era_since(c) <= era), default=0)
    last = era
    while last < len(CODE_CHANGES) and CODE_CHANGES[last][1].split()[0] in SAME_KERNEL_BENCHES \
            and CODE_CHANGES[last][1].split()[0] not in LIGHTNING_CHANGES:
        last += 1
    return tuple(e for e in kernel_eras(era) if e >= since) + tuple(range(era + 1, last + 1))


@functools.lru_cache(maxsize=None)  # CODE_CHANGES is a constant; the cost model asks this per call priced
def era_since(commit: str) -> int:
    """The era that begins with `commit` (the first hash of its CODE_CHANGES entry): the code from
    that commit on is era >= this."""
    for i, (_, what) in enumerate(CODE_CHANGES):
        if what.split()[0] == commit:
            return i + 1
    raise KeyError(f"no CODE_CHANGES entry starts with commit {commit!r}")


# Runs whose files give only a day (or nothing): the time of the commit that added them, a bound
# on when they ran, so that a change later that day does not claim them (folder or folder/file)
COMMITTED_BY = {
    "2026-11-26-2xh200-fourd": "2026-11-26T01:26:45+00:00",  # a4192d6
    "2026-11-26-2xh200-pm/maxlen_8b_1gpu_offload_optimizer.json": "2026-11-26T03:22:54+00:00",  # 5fbc617
    "2026-11-26-2xh200-pm/maxlen_8b_cp2.json": "2026-11-26T03:37:17+00:00",  # 06bb906
    # the e2e metrics and fourd_2gpu.json are undated and maxlen_8b_cp2.json gives only the day (which
    # would date the folder's undated files at 23:59): the runs were made at code ae43a7a (07:00),
    # after 755a3a8 and with nothing since that changes what the model costs (split attention is
    # opt-in, the autotune cache only shortens step 1), so era 3 either way
    "2026-11-26-4xh200-4th": "2026-11-26T08:07:48+00:00",  # 69140ea
    # the fifth session (4x H100): its maxlen JSONs give only the day; the run folder's lanes are dated
    # by their own or their call's timed JSONs (`_folder_date`)
    "2026-11-26-4xh100-5th/call1": "2026-11-26T09:55:26+00:00",  # e9b18af
    # the sixth session (4x H100 as two pairs): its maxlen JSONs and the dp_cp metrics give only the
    # day. Calls 1-3 (~11:55-12:08) ran code 22114c2, before cec5aa8 (12:13:34); call 4 (~12:15) ran
    # cec5aa8, before 771d76d (12:23:10, no cost change); call 6 (~12:25) ran 771d76d
    "2026-11-26-4xh100-6th/call1": "2026-11-26T12:13:33+00:00",
    "2026-11-26-4xh100-6th/call2": "2026-11-26T12:13:33+00:00",
    "2026-11-26-4xh100-6th/call3": "2026-11-26T12:13:33+00:00",
    "2026-11-26-4xh100-6th/call4": "2026-11-26T12:23:09+00:00",
    # the GPU call whose kernels bench made fc26d23 (23:10:59) send packed rows to Triton ran these
    # before that commit (results committed with 14f0567 at 23:16, "dispatch since then")
    "2026-11-25-h100-llama1b-kernels": "2026-11-25T23:10:58+00:00",
    "2026-11-25-2xh100-fourd": "2026-11-25T23:10:58+00:00",
    # the ninth session (2x H100): its e2e lanes are undated; every call ran before a8a710a (19:51:48)
    "2026-11-26-2gpu-9th": "2026-11-26T19:51:47+00:00",
    # the tenth session (2x H100 / 2x H200): its e2e lanes are undated; every call ran code d8a7086 or
    # 3d7fc82 (data.read_as_rank only), before anything committed after the results
    "2026-11-26-2gpu-10th": "2026-11-26T22:35:00+00:00",
    # the eleventh session's calls ran 00:58-01:31 (device tool), all before a63d362 (01:34:28): era 148d759
    "2026-11-27-2gpu-11th": "2026-11-27T01:31:00+00:00",
    # the twelfth session's calls ran 03:20-03:50 at b08da29 (lanes added only to the script), before c52307c
    "2026-11-27-2gpu-12th": "2026-11-27T03:54:45+00:00",
    # the thirteenth session's calls ran 06:10-06:43 (7cc8513, then fp16 lightning only): era c52307c
    "2026-11-27-2gpu-13th": "2026-11-27T06:44:00+00:00",
    # the fourteenth session: calls 1-2 ran 0f68538 (08:16-08:22, before 7262efd), calls 3-7 7262efd on
    # (the bench's timing only changed after it)
    "2026-11-27-gpu-14th/call1": "2026-11-27T08:27:06+00:00",
    "2026-11-27-gpu-14th/call2": "2026-11-27T08:27:06+00:00",
    "2026-11-27-gpu-14th": "2026-11-27T09:15:23+00:00",
    # the fifteenth session: calls 1-2 ran the TMA loads opt-in (7b170da, 9f5a8fb: pointer loads by default;
    # their JSON is flash_tma_gpu.py's, not read), calls 3-5 1693e8a / 8847949, before ff4de8f
    "2026-11-27-gpu-15th": "2026-11-27T11:08:58+00:00",
    # the sixteenth session: call 1 a3bff51, call 2 7b3bc9d (SEQPAR_TMA A/B by environment), calls 3-4
    # bb52ff6, call 5 de46c0e; its JSONs carry their times
    "2026-11-27-gpu-16th": "2026-11-27T13:29:17+00:00",
    # the seventeenth session: calls 1-3 ran 8a877ef / e894535 (15:03-15:21, before ba5602e), calls 4-5
    # ba5602e (their code before it, run beside, is in DIAGNOSTIC_FILES); the bench JSONs carry their times
    "2026-11-27-gpu-17th/call1": "2026-11-27T15:25:45+00:00",
    "2026-11-27-gpu-17th/call2": "2026-11-27T15:25:45+00:00",
    "2026-11-27-gpu-17th/call3": "2026-11-27T15:25:45+00:00",
    "2026-11-27-gpu-17th": "2026-11-27T15:39:06+00:00",  # 523dc18
    # the eighteenth session: calls 1-4 ran 96e362f and later (ce206fa's era; SEQPAR_RING_KEEP_KV and the copy
    # transport are off unless set, and the loader skips the runs that set them)
    "2026-11-27-gpu-18th": "2026-11-27T18:03:03+00:00",
    "2026-11-27-gpu-18th/call5": "2026-11-27T18:11:35+00:00",  # c7f81b4
    "2026-11-27-gpu-18th/call6": "2026-11-27T18:16:43+00:00",  # 0d9c5ae
    "2026-11-27-gpu-18th/call7": "2026-11-27T18:19:06+00:00",  # 968eaa8
    # the twenty-seventh session's end-to-end calls (their lanes undated; f0ec2cd's era, not a later one of the day)
    "2026-11-28-gpu-27th/call6": "2026-11-28T11:20:02+00:00",  # 3214751
    "2026-11-28-gpu-27th/call7": "2026-11-28T11:34:35+00:00",  # 226795d
    # the twenty-ninth session's calls (lanes and JSONs undated) ran 4914af5: 2ad0d6b's era, prefix pieces opt-in
    "2026-11-28-gpu-29th": "2026-11-28T13:31:27+00:00",
}


@functools.lru_cache(maxsize=None)
def _parse_date(text):
    try:
        when = datetime.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    if len(str(text)) <= 10:  # a day without a time: its end (a run that day ran after that day's changes)
        when = when.replace(hour=23, minute=59, second=59)
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def run_folder(path) -> Path:
    """The dated run folder (`YYYY-MM-DD-...`) a benchmark file lies in: its parent, or for the
    fifth session's lanes (`<run>/callN/<lane>/file.json`) the nearest dated ancestor."""
    for folder in Path(path).parents:
        if _parse_date(folder.name[:10]) is not None and folder.name[4:5] == "-":
            return folder
    return Path(path).parent


@functools.lru_cache(maxsize=None)  # a pure function of the path (str or Path), asked of every file by every fit
def run_key(path) -> str:
    """`folder/file` of a benchmark file, the folder being its run folder (`run_folder`): the key of
    COMMITTED_BY, DIAGNOSTIC_FILES and the other per-file lists."""
    path = Path(path)
    folder = run_folder(path)
    try:
        return f"{folder.name}/{path.relative_to(folder).as_posix()}"
    except ValueError:
        return f"{path.parent.name}/{path.name}"


def run_date(path, data=None):
    """When a benchmark file's run happened: its `date`, else a dated JSON beside it, else the end of
    the day its run folder is named for (`YYYY-MM-DD-...`); never after the commit that added it where
    `COMMITTED_BY` says; None if nothing says."""
    when = _run_date(path, data)
    key = run_key(path)
    # the file's own entry, else the nearest folder's (a lane, a call, the run folder)
    bound = next((COMMITTED_BY[k] for k in [key] + [key.rsplit("/", n)[0] for n in range(1, key.count("/") + 1)]
                  if k in COMMITTED_BY), None)
    return min(when, _parse_date(bound)) if when is not None and bound else when


def _run_date(path, data=None):
    if isinstance(data, dict) and data.get("date"):
        return _parse_date(data["date"])
    return _folder_date(str(path))


@functools.lru_cache(maxsize=None)
def _folder_date(path: str):
    """An undated file's time (read once): the latest `date` of the JSONs beside it; below a run folder
    (the fifth session's `callN/<lane>/`) where none beside it has one, the latest full timestamp
    of its call's JSONs (the lanes of one call ran together); else its run folder's day."""
    folder, top = Path(path).parent, run_folder(path)
    dates = _json_dates(folder, "*.json")
    if not dates and folder != top:
        call = next((f for f in Path(path).parents if f.parent == top), folder)
        dates = [d for d in _json_dates(call, "**/*.json") if d.hour or d.minute or d.second][-1:] or \
            _json_dates(call, "**/*.json")
    if dates:
        return max(dates)
    return _parse_date(top.name[:10])


def _json_dates(folder: Path, pattern: str) -> list:
    dates = []
    for other in sorted(folder.glob(pattern)):
        try:
            d = json.loads(other.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and d.get("date") and _parse_date(d["date"]):
            dates.append(_parse_date(d["date"]))
    return sorted(dates)


def cluster_preset_of(path) -> str:
    """The cluster preset of the card a run used: h200_8x400g when a JSON in its folder names an H200
    as its device (else one in its call's lanes, `callN/**`: a session's calls may get different cards;
    else in its run folder), or the run folder's name says h200; else h100_8x400g (the other committed card)."""
    top = run_folder(path)
    call = next((f for f in Path(path).parents if f.parent == top), None)
    places = [(Path(path).parent, "*.json")] + ([(call, "**/*.json")] if call else []) + [(top, "*.json")]
    for folder, pattern in dict.fromkeys(places):
        for other in sorted(folder.glob(pattern)):
            try:
                d = json.loads(other.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(d, dict) and d.get("device"):
                return "h200_8x400g" if "H200" in str(d["device"]) else "h100_8x400g"
    return "h200_8x400g" if "h200" in run_folder(path).name.lower() else "h100_8x400g"


def era_of(path, data=None) -> int:
    """Index of the code era the run measured (0 before the first of CODE_CHANGES); undated: the latest."""
    when = run_date(path, data)
    if when is None:
        return len(CODE_CHANGES)
    return sum(when >= _parse_date(since) for since, _ in CODE_CHANGES)


def in_era(found: dict, era: int | tuple[int, ...]) -> dict:
    """`found` (load_benchmarks) restricted to the runs of one code era (or of several)."""
    eras = (era,) if isinstance(era, int) else tuple(era)
    return {kind: [(p, d) for p, d in items if era_of(p, d if isinstance(d, dict) else None) in eras]
            for kind, items in found.items()}



# kernels/dispatch.py sends packed calls to seqpar's Triton flash since commit fc26d23 (this time);
# a disagg bench run dated before it ran them on torch's varlen flash
TRITON_PACKED_SINCE = "2026-11-25T23:10:59+00:00"


def packed_kernel_of(data: dict, path: str = "") -> str:
    """The kernel the dispatcher gave a benchmark's packed calls when it ran (from its `date`)."""
    when = run_date(path, data) if path or data.get("date") else None
    if when is None:
        return "triton"  # undated: today's code
    return "flash" if when < _parse_date(TRITON_PACKED_SINCE) else "triton"


def era_overrides(era: int, overrides) -> list[str]:
    """The overrides that give today's config the defaults of the code a run of `era` ran: without
    ping-pong, disagg ran the local halves from c8d5eb5 / e23bcd3 until 219ea22 made `single` the
    default (one nano-batch before c8d5eb5, which `single` is)."""
    if any(o.startswith("parallel.disagg.schedule=") for o in overrides) or \
            "parallel.softmax_sp=disagg" not in overrides:
        return []
    return ["parallel.disagg.schedule=halves"] if era_since("c8d5eb5") <= era < era_since("219ea22") else []
