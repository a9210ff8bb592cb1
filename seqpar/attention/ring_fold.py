"""How ring attention folds its blocks' results into per-row buffers, in the fewest passes over memory.

A ring step's kernel call returns a result for some rows of a buffer (forward: (out, lse) for
query rows; backward: dq for query rows, dk/dv for the visiting shard's key rows). The blocks
of a whole call, and so how many results reach each row and in which order, are known from the
plan alone (`ring.plan_blocks`), so every row's fold is decided once per plan, not per row at run
time. Per row, with n results and the merge in fp32 (an accumulator `acc`; the buffer itself
when the inputs are fp32 or fp64):

- n = 1: the result is written straight to the final buffer (no fp32 pass at all);
- n > 1: the first result is kept as the kernel wrote it and meets the second in one op that
  writes acc (no zero-fill, no copy to fp32; attention through `kernels.attn_merge_`), the
  middle ones fold into acc in place, and the last one folds AND casts to the final buffer in one
  op (computed in fp32, rounded once, as ``.to()`` after would); with n = 2 the pair writes the
  final buffer directly. Gradients (`trios`) keep the second result too and meet the first two
  with the third in one op: a row of three results (the 2-rank ring's dQ of its later chunk and
  dK/dV of its earlier one) is one pass that reads three blocks and writes the final buffer.
  Every gradient sum is `kernels.block_sum_`: in fp32 whatever the blocks' dtypes, rounded once
  (one Triton pass on CUDA);
- n = 0: zero (forward: out 0, lse -inf).

Every op computes what the fp32 running merge computed before (bitwise the same in bf16 on CPU).
The attention merges are `kernels.attn_merge_`: one Triton pass per run on CUDA (old, o and both
lse read once, out and lse written once), torch's ops elsewhere.

A travelling buffer (dK/dV of a visiting shard, sent on in fp32) has no final cast; one that
arrives with a value (`base`: the partial sums of the ranks before) takes every result as a fold.
Under doc_balanced only a shard's leading rows travel: its home buffer has a base in those rows only.
"""
from __future__ import annotations

from dataclasses import dataclass

from seqpar.kernels.attn_merge import attn_merge_
from seqpar.kernels.block_sum import block_sum_

# final = c; acc = c; acc += c; final = acc + c; keep c for these rows' next result (forward:
# lse = l); merge the kept one with c (into acc, or into final when c is the rows' last); sum the
# two kept ones and c (gradients)
ROLES = ("put", "init", "add", "last", "hold", "pair", "pair_last", "trio", "trio_last")


@dataclass(frozen=True)
class Run:
    """One element-wise op of a result: its rows `src` fold into rows `dst` of the buffer (pair
    and trio: with rows `s` of the kept result number `i`, for each `(i, s)` in `held`)."""
    role: str
    dst: slice
    src: slice
    held: tuple[tuple[int, slice], ...] = ()


@dataclass(frozen=True)
class Folds:
    """Per result (in arrival order) its runs; `rest`: rows no result reaches (zeroed, or copied
    from the base into the final buffer); `base`: the leading rows that arrive with a value."""
    runs: tuple[tuple[Run, ...], ...]
    rest: tuple[slice, ...]
    final: bool
    base: int

    @property
    def needs_acc(self) -> bool:
        """Whether a row keeps a running sum apart from the final buffer (when their dtypes differ):
        not for a row of two results ("hold" then "pair_last"), nor of three gradients ("hold",
        "hold", "trio_last"), which meet in one op that writes the final buffer (2 ranks: every
        merged row; an fp32 buffer of the shard's size saved)."""
        return any(r.role in ("init", "add", "pair", "trio") for runs in self.runs for r in runs)

    @property
    def kept(self) -> tuple[bool, ...]:
        """Per result: whether a later one pairs with it (the caller keeps it until then)."""
        return tuple(any(r.role == "hold" for r in runs) for runs in self.runs)

    @property
    def released(self) -> tuple[tuple[int, ...], ...]:
        """Per result: the kept results that no result after it pairs with any more."""
        last = {}
        for i, runs in enumerate(self.runs):
            for r in runs:
                for h, _ in r.held:
                    last[h] = i
        return tuple(tuple(h for h, i_last in last.items() if i_last == i) for i in range(len(self.runs)))


def plan_folds(slices, length: int, *, final: bool, base: bool | int = False, pairs: bool = False,
               trios: bool = False) -> Folds:
    """The runs of results that reach rows `slices[i]` (in that order) of a buffer of `length` rows.

    final: the buffer ends in the inputs' dtype (roles put/init/add/last); otherwise it is an
    accumulator that travels on (init/add). base: it already holds a value in every row (True) or
    in its first `base` rows (an int).
    pairs: a row's first result is kept as it is and merged with its second in one op (no copy
    to acc first); the caller keeps the results that `Folds.kept` names until `Folds.released`.
    trios (with pairs): a row of three or more results keeps its second one too, and the first
    two meet the third in one op (sums, not attention merges)."""
    base = length if base is True else int(base)
    cuts = sorted({0, length, min(base, length), *(s.start for s in slices), *(s.stop for s in slices)})
    segments = list(zip(cuts[:-1], cuts[1:]))
    reach = [[i for i, s in enumerate(slices) if s.start <= a and b <= s.stop] for a, b in segments]
    runs: list[list[Run]] = [[] for _ in slices]
    for (a, b), who in zip(segments, reach):
        n = len(who)
        meet = 3 if trios and pairs and n >= 3 else 2  # the result that meets the kept ones
        for j, i in enumerate(who):
            last = final and j == n - 1
            held = ()
            if a < base:
                role = "last" if last else "add"
            elif j == 0:
                role = "put" if final and n == 1 else "hold" if pairs and n > 1 else "init"
            elif pairs and j < meet - 1:
                role = "hold"
            elif pairs and j == meet - 1:
                role = ("trio" if meet == 3 else "pair") + ("_last" if last else "")
                held = tuple((h, slice(a - slices[h].start, b - slices[h].start)) for h in who[:j])
            else:
                role = "last" if last else "add"
            start = slices[i].start
            run = Run(role, slice(a, b), slice(a - start, b - start), held)
            prev = runs[i][-1] if runs[i] else None
            if prev is not None and _adjacent(prev, run):
                joined = tuple((h, slice(p.start, r.stop)) for (h, p), (_, r) in zip(prev.held, run.held))
                runs[i][-1] = Run(role, slice(prev.dst.start, b), slice(prev.src.start, b - start), joined)
            else:
                runs[i].append(run)
    rest = [slice(a, b) for (a, b), who in zip(segments, reach) if not who and b > a]
    rest = _join([s for s in rest if s.stop <= base]) + _join([s for s in rest if s.start >= base])
    return Folds(tuple(map(tuple, runs)), tuple(rest), final, base)


def _adjacent(prev: Run, run: Run) -> bool:
    if prev.role != run.role or prev.dst.stop != run.dst.start or len(prev.held) != len(run.held):
        return False
    return all(h == g and p.stop == r.start for (h, p), (g, r) in zip(prev.held, run.held))


def _join(slices):
    out = []
    for s in slices:
        if out and out[-1].stop == s.start:
            out[-1] = slice(out[-1].start, s.stop)
        else:
            out.append(s)
    return out


def fold_grad(runs, c, acc, final, kept=None):
    """Fold one block's gradient `c` ([B, rows, H, D]) into `acc` / `final` along dim 1; `kept`:
    the earlier results that this one meets, by number. Every sum is taken in fp32 (or wider) and
    rounded once, whatever the dtypes of the blocks and of acc (acc may be final: bf16)."""
    for r in runs:
        src = c[:, r.src]
        if r.role == "put":
            final[:, r.dst].copy_(src)
        elif r.role == "init":
            acc[:, r.dst].copy_(src)
        elif r.role == "add":
            block_sum_(acc[:, r.dst], [acc[:, r.dst], src])
        elif r.role == "last":
            block_sum_(final[:, r.dst], [acc[:, r.dst], src])
        elif r.role != "hold":  # pair, trio: the kept results and this one
            out = final if r.role.endswith("_last") else acc
            block_sum_(out[:, r.dst], [kept[h][:, rows] for h, rows in r.held] + [src])


def fold_rest(folds: Folds, acc, final):
    """The rows no result reached: zero, or the base's value cast to the final buffer."""
    for s in folds.rest:
        if s.stop <= folds.base:
            if folds.final and acc is not final:
                final[:, s].copy_(acc[:, s])
        else:
            (final if folds.final else acc)[:, s].zero_()


def fold_out(runs, o, l, acc, lse, final, kept=None):
    """Fold one block's attention (o `[B, rows, H, D]`, l `[B, H, rows]`) into the running
    (acc, lse) along the rows, or into `final` for a row's last (or only) block:
    out_new = out e^(lse - lse_new) + o e^(l - lse_new), lse_new = logaddexp(lse, l).
    `kept`: the earlier results (o) that this one pairs with, by number."""
    for r in runs:
        o_r, l_r = o[:, r.src], l[:, :, r.src].to(lse.dtype)
        lse_r = lse[:, :, r.dst]
        if r.role in ("put", "init", "hold"):
            if r.role != "hold":
                (final if r.role == "put" else acc)[:, r.dst].copy_(o_r)
            lse_r.copy_(l_r)
            continue
        # the earlier result: the row's first, kept as the kernel wrote it, or the running acc
        old = kept[r.held[0][0]][:, r.held[0][1]] if r.held else acc[:, r.dst]
        attn_merge_(old, o_r, lse_r, l_r, (acc if r.role in ("add", "pair") else final)[:, r.dst])


def fold_out_rest(folds: Folds, final, lse):
    for s in folds.rest:
        final[:, s].zero_()
        lse[:, :, s].fill_(float("-inf"))
