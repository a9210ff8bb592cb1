"""Step cost model, cluster simulator and layout planner (issue 11); see docs/sim.md.

`predict(cfg, cluster)` returns the predicted step time, tokens/s, MFU and memory per rank of a
composed job config (`seqpar.sim.configs.compose([...overrides])`) on a cluster
(`seqpar.sim.cluster.load_cluster("h100_8x400g")`), with constants fitted on docs/benchmarks/.
"""
from __future__ import annotations


def predict(cfg, cluster, *, world: int | None = None, calib=None, **kwargs) -> dict:
    from seqpar.sim.calibrate import calibrate
    from seqpar.sim.cluster import Cluster, load_cluster
    from seqpar.sim.configs import world_of
    from seqpar.sim.step import predict_step

    cluster = cluster if isinstance(cluster, Cluster) else load_cluster(cluster)
    calib = calib or calibrate()
    out = predict_step(cfg, world or world_of(cfg), cluster, calib, **kwargs)
    out["cluster"] = cluster.name
    return out
