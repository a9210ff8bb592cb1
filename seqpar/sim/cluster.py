"""The hardware a prediction is for: one `conf/cluster/*.yaml` file, checked key by key.

A cluster is nodes of `gpus_per_node` GPUs joined by NVLink inside a node and by one NIC per GPU
between nodes. Every figure is per GPU. Unknown keys are errors (a typo must not silently fall
back to a default), and every message names the file, the key and the rule.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path


class ClusterError(ValueError):
    """A cluster file that cannot describe a machine; the message names the key and the fix."""


@dataclass(frozen=True)
class Cluster:
    name: str
    gpu: str
    gpus_per_node: int
    memory_gib: float
    peak_bf16_tflops: float
    matmul_efficiency: float
    hbm_tbps: float
    hbm_efficiency: float
    nvlink_gbps: float  # GB/s, NCCL bus bandwidth inside a node
    nvlink_latency_us: float
    net_gbit_per_gpu: float  # Gb/s line rate of the GPU's NIC
    net_efficiency: float
    net_latency_us: float

    @property
    def peak_flops(self) -> float:
        return self.peak_bf16_tflops * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tbps * 1e12 * self.hbm_efficiency

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    def link(self, inter_node: bool) -> tuple[float, float]:
        """(latency s, bandwidth bytes/s) of one NCCL step on a link class."""
        if inter_node:
            return self.net_latency_us * 1e-6, self.net_gbit_per_gpu / 8 * 1e9 * self.net_efficiency
        return self.nvlink_latency_us * 1e-6, self.nvlink_gbps * 1e9

    def replace(self, **changes) -> "Cluster":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Cluster(**values)


_FRACTIONS = ("matmul_efficiency", "hbm_efficiency", "net_efficiency")


def cluster_dir() -> Path:
    import seqpar.conf  # conf/ is installed as seqpar.conf (pyproject's package-dir)
    return Path(seqpar.conf.__file__).parent / "cluster"


def available() -> list[str]:
    return sorted(p.stem for p in cluster_dir().glob("*.yaml"))


def load_cluster(name_or_path: str) -> Cluster:
    """`name` of a preset in conf/cluster/ (e.g. h100_8x400g) or a path to a YAML file."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or os.sep in str(name_or_path)):
        path = cluster_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ClusterError(f"cluster={name_or_path}: no such file ({path}); presets: {', '.join(available())}, "
                           "or give a path to a YAML file with the keys of conf/cluster/h100_8x400g.yaml")
    import yaml

    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ClusterError(f"cluster file {path}: not valid YAML ({e})") from None
    return cluster_from_dict(raw, source=str(path))


def cluster_from_dict(raw, source: str = "cluster") -> Cluster:
    if not isinstance(raw, dict):
        raise ClusterError(f"{source}: expected a mapping of keys to values, got {type(raw).__name__}")
    known = {f.name: f.type for f in fields(Cluster)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ClusterError(f"{source}: unknown key {unknown[0]!r}; the keys are {', '.join(known)}")
    missing = [k for k in known if k not in raw]
    if missing:
        raise ClusterError(f"{source}: missing key {missing[0]!r} (see conf/cluster/h100_8x400g.yaml for its meaning)")
    values = {}
    for key, kind in known.items():
        value = raw[key]
        if kind == "str":
            values[key] = str(value)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ClusterError(f"{source}: {key}={value!r} must be a number")
        if not value > 0:
            raise ClusterError(f"{source}: {key}={value} must be > 0")
        if key in _FRACTIONS and value > 1:
            raise ClusterError(f"{source}: {key}={value} is a fraction of the peak: it must be within (0, 1]")
        if kind == "int":
            if int(value) != value:
                raise ClusterError(f"{source}: {key}={value} must be a whole number")
            value = int(value)
        values[key] = value
    return Cluster(**values)
