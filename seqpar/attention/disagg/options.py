"""`parallel.disagg.*`: the knobs of core-attention disaggregation, their validation, and the
process-wide setting that `disagg_attention` reads when a call does not pass them.

The model calls attention with the ring contract only (no disagg keywords), so training sets
the options once per process with `configure(cfg.parallel.disagg)`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

from seqpar.attention.disagg.planner import TASK_OVERHEAD, TRITON_COST
from seqpar.attention.disagg.rows import GROUPS

# The runtime's nano-batch schedules (runtime.py's docstring): one call per server; local halves
# L1 / remote R / L2; ping-pong L1 / R1 / R2 / L2; local L then remote R (the backward R, L).
SCHEDULES = ("single", "halves", "ping_pong", "local_remote")
# one: the backward reuses the forward's plan (servers keep their inputs); per_direction: each
# direction balances its own cost (runtime.py's docstring)
PLANS = ("one", "per_direction")


@dataclass(frozen=True)
class DisaggOptions:
    eps: float = 0.1                 # stop when every server is within eps of the mean load
    min_chunk: int = 128             # smallest query piece the planner cuts (the kernel loses throughput below)
    task_overhead: Optional[int] = None  # per-task cost in score pairs; None: fitted from cost_table, else 8192
    schedule: str = "single"         # how a server's calls meet the transfers (SCHEDULES; see config)
    cost_table: Optional[str] = None  # JSON of (q_len, kv_len) -> ms profiled on the GPU
    group: str = "dp_cp"             # cp: balance inside the cp group; dp_cp: across data-parallel ranks too (rows.py)
    triton_cost: float = TRITON_COST  # a score pair on the servers' Triton kernel, in cuDNN pairs (KernelSpeed)
    plans: str = "one"               # PLANS: one plan for both directions, or one per direction

    def overhead(self) -> int:
        """The per-task overhead the planner uses."""
        if self.task_overhead is not None:
            return int(self.task_overhead)
        if self.cost_table:
            from seqpar.attention.disagg.cost_table import fit_task_overhead, load_cost_table
            return fit_task_overhead(load_cost_table(self.cost_table))
        return TASK_OVERHEAD


_current = DisaggOptions()
_overhead_cache: dict = {}


def validate(options) -> DisaggOptions:
    """`options` (a DisaggOptions, a mapping or a Hydra node) checked; ValueError names the key."""
    opts = _coerce(options)
    if not 0 <= opts.eps < 1:
        raise ValueError(f"parallel.disagg.eps={opts.eps}: must be in [0, 1) (the allowed load above/below the mean, "
                         "as a fraction of it; 0.1 = within 10%)")
    if isinstance(opts.min_chunk, bool) or not isinstance(opts.min_chunk, int) or opts.min_chunk < 1:
        raise ValueError(f"parallel.disagg.min_chunk={opts.min_chunk}: must be an integer >= 1 (128 keeps tasks at "
                         "the kernel's tile size)")
    if opts.task_overhead is not None and (isinstance(opts.task_overhead, bool) or opts.task_overhead < 0):
        raise ValueError(f"parallel.disagg.task_overhead={opts.task_overhead}: must be >= 0 score pairs, or null "
                         "(fitted from parallel.disagg.cost_table, else the default)")
    if opts.task_overhead is not None and opts.cost_table:
        raise ValueError(f"parallel.disagg.task_overhead={opts.task_overhead} and parallel.disagg.cost_table="
                         f"{opts.cost_table}: the overhead comes from one of them; set the other to null")
    if isinstance(opts.triton_cost, bool) or not isinstance(opts.triton_cost, (int, float)) or not opts.triton_cost > 0:
        raise ValueError(f"parallel.disagg.triton_cost={opts.triton_cost}: must be a number > 0 (the cost of a score "
                         "pair on the Triton kernel relative to cuDNN; 1 ignores the kernels)")
    if opts.schedule not in SCHEDULES:
        raise ValueError(f"parallel.disagg.schedule={opts.schedule!r}: choose {', '.join(SCHEDULES)} (single: one "
                         "kernel call per server, transfers exposed; halves: local work split around the remote "
                         "work; ping_pong: four nano-batches; local_remote: local work, then remote work)")
    if opts.plans not in PLANS:
        raise ValueError(f"parallel.disagg.plans={opts.plans!r}: choose one (the backward reuses the forward's plan) "
                         "or per_direction (each direction balanced for its own kernel speeds, the backward's "
                         "inputs sent again)")
    if opts.group not in GROUPS:
        raise ValueError(f"parallel.disagg.group={opts.group!r}: choose cp (balance inside each cp group) or dp_cp "
                         "(balance across the data-parallel ranks too)")
    if opts.cost_table:
        opts.overhead()  # a missing or malformed table fails here, before any worker starts
    return opts


def configure(options=None, **overrides) -> DisaggOptions:
    """Set the process-wide options (validated); returns the previous ones."""
    global _current
    opts = validate(replace(_coerce(options) if options is not None else _current, **overrides))
    previous, _current = _current, opts
    return previous


def current() -> DisaggOptions:
    return _current


def planner_overhead(opts: DisaggOptions) -> int:
    """`opts.overhead()`, the cost table read once per process."""
    key = (opts.task_overhead, opts.cost_table)
    if key not in _overhead_cache:
        _overhead_cache[key] = opts.overhead()
    return _overhead_cache[key]


def _coerce(options) -> DisaggOptions:
    if isinstance(options, DisaggOptions):
        return options
    names = {f.name for f in fields(DisaggOptions)}
    items = dict(options.items()) if hasattr(options, "items") else {}
    unknown = sorted(set(items) - names)
    if unknown:
        raise ValueError(f"parallel.disagg.{unknown[0]}: unknown key; the keys are {sorted(names)}")
    # a null triton_cost is the planner's measured one (the field's default)
    return DisaggOptions(**{k: v for k, v in items.items() if not (k == "triton_cost" and v is None)})
