"""Core-attention disaggregation: attention work re-planned over the group's ranks acting as
in-place attention servers (DistCA). `plan` decides who computes what; `disagg_attention` runs it;
`configure` sets the `parallel.disagg.*` options; `step_metrics` is the step's `sp/` numbers;
`join_row_bounds` joins the data-parallel ranks' rows into one row to balance over
(`parallel.disagg.group=dp_cp`, see rows.py)."""
from seqpar.attention.disagg.cost_table import fit_task_overhead, fit_triton_cost, load_cost_table
from seqpar.attention.disagg.metrics import step_metrics
from seqpar.attention.disagg.options import DisaggOptions, configure, current, validate
from seqpar.attention.disagg.planner import (TASK_OVERHEAD, KernelSpeed, Plan, Task, pairs, plan, plan_owned,
                                             task_cost)
from seqpar.attention.disagg.rows import check_group, join_row_bounds, joins_dp_rows
from seqpar.attention.disagg.runtime import disagg_attention

__all__ = ["TASK_OVERHEAD", "DisaggOptions", "KernelSpeed", "Plan", "Task", "check_group", "configure", "current",
           "disagg_attention", "fit_task_overhead", "fit_triton_cost", "join_row_bounds", "joins_dp_rows",
           "load_cost_table", "pairs", "plan", "plan_owned", "step_metrics", "task_cost", "validate"]
