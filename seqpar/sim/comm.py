"""Alpha-beta cost of each collective seqpar issues, per link class (NVLink in a node, NIC across).

`bytes` is always the per-rank buffer in nccl-tests' convention: the whole output of an
all-gather, the whole input of a reduce-scatter or all-reduce, the whole send buffer of an
all-to-all, the message of a send/recv. Time = steps x latency + moved bytes / bus bandwidth, with
the moved fraction of ring algorithms ((n-1)/n, twice for all-reduce). A group that spans nodes
runs at the NIC's bandwidth (the slowest link of NCCL's rings); an all-to-all that spans nodes sends
its off-node share through the NIC while its on-node share uses NVLink at the same time.

Measured intra-node figures (`python -m seqpar.bench comm`, fitted in `calibrate`) replace the
cluster file's NVLink numbers per operation where they exist.
"""
from __future__ import annotations

from dataclasses import dataclass, field

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")

# mesh dims, outermost first (ARCHITECTURE: pp, dp, cp, tp; tp innermost stays inside a node)
MESH_ORDER = ("pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class Group:
    size: int
    per_node: int  # members of the group on one node

    @property
    def inter_node(self) -> bool:
        return self.per_node < self.size


def dim_stride(sizes: dict[str, int], name: str) -> int:
    """Rank distance between neighbours of mesh dim `name`: the product of the dims inside it."""
    stride = 1
    for dim in reversed(MESH_ORDER):
        if dim == name:
            return stride
        stride *= sizes.get(dim, 1)
    raise ValueError(f"unknown mesh dim {name!r}; choose one of {MESH_ORDER}")


def placed(size: int, stride: int, gpus_per_node: int) -> Group:
    """A group of `size` ranks `stride` apart, ranks filling nodes of `gpus_per_node` in order."""
    per_node = 1 if stride >= gpus_per_node else max(1, min(size, gpus_per_node // stride))
    return Group(size=size, per_node=per_node)


def group_of(sizes: dict[str, int], name: str, gpus_per_node: int) -> Group:
    return placed(sizes.get(name, 1), dim_stride(sizes, name), gpus_per_node)


@dataclass
class LinkFit:
    """A measured (latency s, bandwidth B/s) per operation inside a node."""
    ops: dict[str, tuple[float, float]] = field(default_factory=dict)
    source: str = ""


def _link(cluster, group: Group, op: str, fit: LinkFit | None) -> tuple[float, float]:
    if not group.inter_node and fit is not None and op in fit.ops:
        return fit.ops[op]
    return cluster.link(group.inter_node)


def collective_time(op: str, nbytes: float, group: Group, cluster, fit: LinkFit | None = None) -> float:
    """Seconds for one call of `op` moving `nbytes` (per-rank buffer, see the module docstring)."""
    n = group.size
    if op not in OPS:
        raise ValueError(f"unknown collective {op!r}; choose one of {OPS}")
    if n == 1 or nbytes <= 0:
        return 0.0
    alpha, bw = _link(cluster, group, op, fit)
    if op == "send_recv":
        return alpha + nbytes / bw
    if op == "all_reduce":
        return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / bw
    if op in ("all_gather", "reduce_scatter"):
        return (n - 1) * alpha + (n - 1) / n * nbytes / bw
    # all_to_all: every peer at once; on-node and off-node shares travel in parallel
    if not group.inter_node:
        return alpha + (n - 1) / n * nbytes / bw
    a_nv, bw_nv = _link(cluster, Group(group.per_node, group.per_node), op, fit)
    off = (n - group.per_node) / n * nbytes / bw
    on = (group.per_node - 1) / n * nbytes / bw_nv
    return alpha + max(off, on)


def moved_bytes(op: str, nbytes: float, n: int) -> float:
    """Bytes one rank sends for one call (the traffic a method's benchmark counts is `nbytes`)."""
    if n == 1:
        return 0.0
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
              "all_to_all": (n - 1) / n, "send_recv": 1.0}
    if op not in factor:
        raise ValueError(f"unknown collective {op!r}; choose one of {OPS}")
    return factor[op] * nbytes


def overlapped(compute: float, comm: float, tax: float) -> float:
    """Time of `compute` with `comm` running beside it: the longer of the two, plus the share of the
    shorter one that sharing the SMs costs (`tax`, fitted on the ring benchmark's exposed comm;
    ANCHORS.md measured a third of a matmul's speed lost under a 256 MiB send/recv stream)."""
    return max(compute, comm) + tax * min(compute, comm)
