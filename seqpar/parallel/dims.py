"""ParallelDims: the one owner of every process group.

The world mesh is ordered (pp, dp, cp, tp) so that tp, the chattiest dimension, is innermost
and stays inside a node. Sub-meshes are named for what uses them:
  batch  = dp           (which samples a rank loads)
  cp     = cp           (sequence-parallel attention)
  dp_cp  = dp x cp      (gradient reduction / FSDP sharding, and the loss all-reduce:
                         cp ranks hold different tokens of the same samples)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    cp: int
    tp: int
    pp: int
    world_size: int

    def __post_init__(self):
        if self.dp * self.cp * self.tp * self.pp != self.world_size:
            raise ValueError(f"dp*cp*tp*pp={self.dp}*{self.cp}*{self.tp}*{self.pp} != world size {self.world_size}")

    @classmethod
    def from_config(cls, parallel_cfg, world_size: int) -> "ParallelDims":
        p = parallel_cfg
        dp = world_size // (p.pp * p.cp * p.tp) if p.dp == -1 else p.dp
        return cls(dp=dp, cp=p.cp, tp=p.tp, pp=p.pp, world_size=world_size)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        mesh = init_device_mesh(device_type, (self.pp, self.dp, self.cp, self.tp), mesh_dim_names=("pp", "dp", "cp", "tp"))
        mesh["dp", "cp"]._flatten("dp_cp")
        object.__setattr__(self, "_mesh", mesh)
        return mesh

    @property
    def mesh(self) -> DeviceMesh:
        if not hasattr(self, "_mesh"):
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        return self._mesh

    def group(self, name: str) -> dist.ProcessGroup:
        """Process group of a named sub-mesh: pp, dp (alias batch), cp, tp, dp_cp (alias loss)."""
        name = {"batch": "dp", "loss": "dp_cp"}.get(name, name)
        return self.mesh[name].get_group()

    def rank_in(self, name: str) -> int:
        name = {"batch": "dp", "loss": "dp_cp"}.get(name, name)
        return self.mesh[name].get_local_rank()

    @cached_property
    def sequence_parallel(self) -> bool:
        return self.cp > 1
