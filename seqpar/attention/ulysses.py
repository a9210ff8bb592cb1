"""Softmax attention over the cp group by swapping sequence sharding for head sharding
(DeepSpeed-Ulysses, Jacobs et al. 2023), and `usp`, its 2D hybrid with ring attention (USP,
Fang & Zhao 2024): cp = ring x ulysses, the all-to-all inside a node, the ring across nodes.

Ulysses: one all-to-all turns this rank's `[B, S/N, H, D]` into `[B, S, H/N, D]`, the whole
sequence for a subset of heads; the chunks arrive in the layout's order, so they are put in
natural order, attended with the global cu_seqlens, and sent back the same way. Four
all-to-alls per layer (q, k, v, out) move O(S*H*D/N) per rank whatever N is.

usp: the all-to-all runs over the Ulysses group only, leaving each rank with the union of its
Ulysses group's shards for H/U heads; ring attention then runs over the ring group, told which
global ranges each ring member now holds.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar import kernels
from seqpar.attention.ring import ring_attention_held
from seqpar.parallel.dims import cp_split
from seqpar.parallel.sharding import group_size_rank, local_ranges


def ulysses_attention(q, k, v, *, group=None, causal=True, cu_seqlens=None, softmax_scale=None, layout="zigzag"):
    world, _ = group_size_rank(group)
    k, v = _split_heads(q, k, v, world, "the cp group")
    seq_len = q.shape[1] * world
    qh, kh, vh = (_SeqToHeads.apply(t, group) for t in (q, k, v))  # [B, S (layout order), H/N, D]
    held = torch.cat([torch.arange(a, b, device=q.device) for r in range(world)
                      for a, b in local_ranges(seq_len, world, r, layout)])  # gathered row -> global row
    natural = torch.argsort(held)  # global row -> gathered row
    qh, kh, vh = (t.index_select(1, natural) for t in (qh, kh, vh))
    out = kernels.flash_attn(qh, kh, vh, causal=causal, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale)
    return _HeadsToSeq.apply(out.index_select(1, held), group)


def usp_attention(q, k, v, *, group=None, causal=True, cu_seqlens=None, softmax_scale=None, layout="zigzag"):
    """Ulysses inside the groups that ParallelDims split the cp `group` into, ring across them
    (without a split, the Ulysses degree is 1 and this is ring attention)."""
    ulysses_group, ring_group = cp_split(group)
    cp, cp_rank = group_size_rank(group)
    u, u_rank = group_size_rank(ulysses_group) if ulysses_group is not None else (1, 0)
    ring, ring_rank = group_size_rank(ring_group)
    if u * ring != cp or ring_rank * u + u_rank != cp_rank:
        raise ValueError(f"cp rank {cp_rank} of {cp} is not ring rank {ring_rank} x ulysses {u} + {u_rank}")
    if u > 1:
        k, v = _split_heads(q, k, v, u, "the Ulysses group (parallel.ulysses_degree)")
        q, k, v = (_SeqToHeads.apply(t, ulysses_group) for t in (q, k, v))
    seq_len = q.shape[1] * ring
    held = [[rg for m in range(u) for rg in local_ranges(seq_len, cp, r * u + m, layout)] for r in range(ring)]
    out = ring_attention_held(q, k, v, held, group=ring_group, causal=causal, cu_seqlens=cu_seqlens,
                              softmax_scale=softmax_scale)
    return _HeadsToSeq.apply(out, ulysses_group) if u > 1 else out


def _split_heads(q, k, v, world, what):
    """Check that the heads split over `world` ranks; with fewer key/value heads than ranks (GQA),
    repeat each kv head so that every rank receives the one its query heads read (query head h
    reads kv head h // (Hq / Hkv)); the repeat's backward sums the copies' gradients."""
    hq, hkv = q.shape[2], k.shape[2]
    if hq % world or (hkv % world and world % hkv):
        raise ValueError(f"Ulysses splits attention heads over {what} of size {world}: it must divide the query "
                         f"heads ({hq}), and divide or be a multiple of the key/value heads ({hkv})")
    if hkv % world:
        k, v = (t.repeat_interleave(world // hkv, dim=2) for t in (k, v))
    return k, v


def _seq_to_heads(x, group):
    """[B, S_local, H, D] -> [B, N * S_local, H/N, D]: rank j gets head group j of every shard,
    the shards stacked in rank order."""
    world, _ = group_size_rank(group)
    if world == 1:
        return x
    B, S, H, D = x.shape
    send = x.reshape(B, S, world, H // world, D).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] = rank j's shard of my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(B, world * S, H // world, D)


def _heads_to_seq(x, group):
    """The inverse: [B, N * S_local, H/N, D] -> [B, S_local, H, D]."""
    world, _ = group_size_rank(group)
    if world == 1:
        return x
    B, S_all, Hn, D = x.shape
    send = x.reshape(B, world, S_all // world, Hn, D).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] = my shard of head group j
    return recv.permute(1, 2, 0, 3, 4).reshape(B, S_all // world, world * Hn, D)


# all-to-all permutes data, so each direction's backward is the other direction
class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None
