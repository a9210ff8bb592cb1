"""Core-attention disaggregation: attention work re-planned over the group's ranks acting as
in-place attention servers (DistCA). `plan` decides who computes what; `disagg_attention` runs it."""
from seqpar.attention.disagg.planner import TASK_OVERHEAD, Plan, Task, pairs, plan, plan_owned, task_cost
from seqpar.attention.disagg.runtime import disagg_attention

__all__ = ["TASK_OVERHEAD", "Plan", "Task", "disagg_attention", "pairs", "plan", "plan_owned", "task_cost"]
