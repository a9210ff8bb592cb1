"""ParallelDims: the one owner of every process group.

The world mesh is ordered (pp, dp, cp, tp) so that tp, the chattiest dimension, is innermost
and stays inside a node. Sub-meshes are named for what uses them:
  batch  = dp           (which samples a rank loads)
  cp     = cp           (sequence-parallel attention)
  dp_cp  = dp x cp      (gradient reduction / FSDP sharding, and the loss all-reduce:
                         cp ranks hold different tokens of the same samples)
With `ulysses` > 1 (softmax_sp=usp) cp is itself a 2D mesh (cp_ring, cp_ulysses), Ulysses innermost
so that its all-to-all stays inside a node; `cp` and `dp_cp` are then flattened from it, so cp
rank = ring rank * ulysses + ulysses rank. `cp_split(cp_group)` hands the two groups to usp.
Disaggregated attention's all-to-alls get a communicator of their own, `attn`, over the ranks they
balance: dp_cp's with `parallel.disagg.group=dp_cp` (`attention_dp_cp`), cp's otherwise. On FSDP's,
NCCL would run them in issue order behind the parameter all-gathers and gradient reduce-scatters
that FSDP posts ahead of each layer; on cp's, behind or beside LASP-2's state exchanges. Its NCCL
streams run at high priority (`attention_comm_options`), as the cp groups' do (cp, cp_ring,
cp_ulysses: their transfers go beside attention kernels). `SEQPAR_DISAGG_SHARED_GROUP=1` keeps
them on dp_cp's (cp's) group, for an A/B.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def init_world(cuda: bool) -> torch.device:
    """The world process group (NCCL on this rank's LOCAL_RANK GPU, else gloo) and this rank's device.

    Reads the torchrun/Slurm rendezvous variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK)."""
    if not cuda:
        dist.init_process_group("gloo")
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    # without device_id, NCCL init hung on the 2-GPU machine (ENVIRONMENT.md)
    dist.init_process_group("nccl", device_id=device)
    return device


def attention_comm_options():
    """Options of a communicator for attention's transfers (the cp groups', disaggregated
    attention's): NCCL streams at high priority, so that a transfer posted while long attention
    kernels fill the GPU gets the next free SMs rather than queueing behind their blocks. On 2 H200
    (wlbllm, 128k tokens per GPU, a batch holding a 92k-token document; 2026-11-28 27th session,
    call 4) ping-pong's output transfers waited 1.1-9.2 ms per call behind the kernels at normal
    priority and 0.02 ms at high priority, the calls as fast; the ring at 32k gained 0.4 ms of 49.8
    (2026-11-28-gpu-33rd/call1). None where the default group is not NCCL (nothing to set)."""
    nccl = getattr(dist, "ProcessGroupNCCL", None)
    if nccl is None or not dist.is_initialized() or dist.get_backend() != "nccl":
        return None
    options = nccl.Options()
    options.is_high_priority_stream = True
    return options


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    cp: int
    tp: int
    pp: int
    world_size: int
    ulysses: int = 1  # usp: the Ulysses degree inside cp (cp = ring x ulysses)
    attention_dp_cp: bool = False  # disagg attention over dp_cp (parallel.disagg.group=dp_cp, dp > 1)
    disagg: bool = False  # softmax layers through disagg attention: its own communicator (module docstring)

    def __post_init__(self):
        if self.dp * self.cp * self.tp * self.pp != self.world_size:
            raise ValueError(f"dp*cp*tp*pp={self.dp}*{self.cp}*{self.tp}*{self.pp} != world size {self.world_size}")
        if self.ulysses < 1 or self.cp % self.ulysses:
            raise ValueError(f"ulysses degree {self.ulysses} does not divide cp={self.cp}")

    @classmethod
    def from_config(cls, parallel_cfg, world_size: int) -> "ParallelDims":
        p = parallel_cfg
        dp = world_size // (p.pp * p.cp * p.tp) if p.dp == -1 else p.dp
        ulysses = getattr(p, "ulysses_degree", 1) if p.softmax_sp == "usp" else 1
        from seqpar.attention.disagg.rows import joins_dp_rows  # config reading only; no import cycle
        return cls(dp=dp, cp=p.cp, tp=p.tp, pp=p.pp, world_size=world_size, ulysses=ulysses,
                   attention_dp_cp=joins_dp_rows(p, dp), disagg=p.softmax_sp == "disagg")

    def build_mesh(self, device_type: str) -> DeviceMesh:
        high = attention_comm_options()  # the cp groups' transfers go beside attention kernels
        if self.ulysses == 1:
            mesh = init_device_mesh(device_type, (self.pp, self.dp, self.cp, self.tp), mesh_dim_names=("pp", "dp", "cp", "tp"),
                                    backend_override={"cp": high} if high else None)
            mesh["dp", "cp"]._flatten("dp_cp")
        else:
            shape = (self.pp, self.dp, self.cp // self.ulysses, self.ulysses, self.tp)
            mesh = init_device_mesh(device_type, shape, mesh_dim_names=("pp", "dp", "cp_ring", "cp_ulysses", "tp"),
                                    backend_override={"cp_ring": high, "cp_ulysses": high} if high else None)
            mesh["cp_ring", "cp_ulysses"]._flatten("cp", backend_override=high)
            mesh["dp", "cp_ring", "cp_ulysses"]._flatten("dp_cp")
            _CP_SPLITS[mesh["cp"].get_group()] = (mesh["cp_ulysses"].get_group(), mesh["cp_ring"].get_group())
        object.__setattr__(self, "_mesh", mesh)
        balanced = self.dp * self.cp if self.attention_dp_cp else self.cp
        if (self.disagg or self.attention_dp_cp) and balanced > 1 \
                and os.environ.get("SEQPAR_DISAGG_SHARED_GROUP", "0") != "1":
            # every rank creates every group (a collective call): rows of the other dimensions, ranks in
            # (dp, cp) order; the world is ordered (pp, dp, cp..., tp), so tp moves next to pp first
            ranks = mesh.mesh.reshape(self.pp, self.dp, self.cp, self.tp).movedim(-1, 1)
            ranks = ranks.reshape(-1, balanced).tolist()
            own, _ = dist.new_subgroups_by_enumeration(ranks, pg_options=attention_comm_options())
            object.__setattr__(self, "_attn", own)
        return mesh

    @property
    def mesh(self) -> DeviceMesh:
        if not hasattr(self, "_mesh"):
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        return self._mesh

    def group(self, name: str) -> dist.ProcessGroup:
        """Process group of a named sub-mesh: pp, dp (alias batch), cp, tp, dp_cp (alias loss), and
        with ulysses > 1 also cp_ring and cp_ulysses; attn: the ranks disaggregated attention balances
        over, dp_cp's or cp's (its own communicator where one was built, else that group)."""
        if name == "attn":
            own = getattr(self, "_attn", None)
            return own if own is not None else self.group("dp_cp" if self.attention_dp_cp else "cp")
        name = {"batch": "dp", "loss": "dp_cp"}.get(name, name)
        return self.mesh[name].get_group()

    def rank_in(self, name: str) -> int:
        name = {"batch": "dp", "loss": "dp_cp"}.get(name, name)
        return self.mesh[name].get_local_rank()

    @cached_property
    def sequence_parallel(self) -> bool:
        return self.cp > 1


_CP_SPLITS: dict = {}  # cp group -> (ulysses group, ring group), filled by ParallelDims.build_mesh


def cp_split(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """(ulysses group, ring group) that ParallelDims split the cp `group` into; without a split
    (ulysses degree 1, or a group ParallelDims did not build) Ulysses is trivial: (None, group)."""
    key = dist.group.WORLD if group is None and dist.is_initialized() else group
    return _CP_SPLITS.get(key, (None, group))
