"""`seqpar-plan model=... cluster=... data.seq_len=N gpus=N [overrides]`: the fastest layouts that fit.

Every layout of `gpus` GPUs is tried: tp inside a node (dividing the heads), pp dividing the layers,
cp, dp filling the rest, each softmax sequence-parallel method that applies (for a document mix
also the ring over the `doc_balanced` layout, and with dp > 1 disaggregation over dp x cp,
`parallel.disagg.group=dp_cp`), and the activation
checkpointing modes; one sequence per micro-batch, `train.global_batch_size` as given. Those whose
memory estimate (seqpar.memory, as `seqpar-train --dry-run` prints it) exceeds the device's usable
memory are dropped; the rest are ranked by predicted tokens/s. The best one's `seqpar-train`
command line is printed ready to paste.
"""
from __future__ import annotations

import copy
import sys

from seqpar.sim.step import LayoutError


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg, gpus: int, gpus_per_node: int):
    """(overrides dict) of every layout worth predicting."""
    m = cfg.model
    softmax = "S" in m.layer_pattern
    for tp in _divisors(min(gpus, gpus_per_node)):
        if m.n_heads % tp or m.n_kv_heads % tp and tp % m.n_kv_heads or m.ffn_dim % tp:
            continue
        for pp in _divisors(gpus // tp):
            if pp > m.n_layers or pp > 1 and m.tie_embeddings:
                continue
            for cp in _divisors(gpus // (tp * pp)):
                dp = gpus // (tp * pp * cp)
                methods = ["ring"]
                if cp > 1 and softmax:
                    heads = m.n_heads // tp
                    if heads % cp == 0:
                        methods.append("ulysses")
                    u = min(cp, max(1, gpus_per_node // tp))
                    if 1 < u < cp and heads % u == 0 and cp % u == 0:
                        methods.append(f"usp:{u}")
                    if cfg.data.name == "synthetic" and cfg.data.distribution != "fixed":
                        methods.append("disagg")
                        if "L" not in m.layer_pattern and pp == 1:  # the document layouts' own rules
                            methods.append("ring:doc_balanced")
                if dp > 1 and softmax and cfg.data.name == "synthetic" and cfg.data.distribution != "fixed":
                    methods.append("disagg:dp_cp")  # attention work moves between the dp ranks too
                for method in methods:
                    for ac in ("none", "selective", "full"):
                        o = {"parallel.dp": dp, "parallel.tp": tp, "parallel.pp": pp, "parallel.cp": cp,
                             "train.activation_checkpointing": ac, "train.micro_batch_size": 1}
                        if method.startswith("usp:"):
                            o["parallel.softmax_sp"], o["parallel.ulysses_degree"] = "usp", int(method[4:])
                        elif method == "ring:doc_balanced":  # whole documents balanced over the cp ranks
                            o["parallel.softmax_sp"], o["parallel.ulysses_degree"] = "ring", 1
                            o["parallel.layout"] = "doc_balanced"
                            if tp > 1:  # the padded local length need not divide by tp
                                o["parallel.tp_sequence_parallel"] = False
                        elif method == "disagg:dp_cp":
                            o["parallel.softmax_sp"], o["parallel.ulysses_degree"] = "disagg", 1
                            o["parallel.disagg.group"] = "dp_cp"
                            if cp > 1:  # the dp rows cut in cp contiguous pieces are the joined row's shards
                                o["parallel.layout"] = "contiguous"
                        else:
                            o["parallel.softmax_sp"], o["parallel.ulysses_degree"] = method, 1
                            if method == "disagg":  # balanced inside each cp group only
                                o["parallel.disagg.group"] = "cp"
                        yield o


def apply(cfg, overrides: dict):
    c = copy.deepcopy(cfg)
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = c
        for part in path:
            node = getattr(node, part)
        setattr(node, name, value)
    return c


def plan(cfg, gpus: int, cluster, calib, *, top: int = 5) -> dict:
    from seqpar.sim.step import predict_step

    from seqpar.memory import MARGIN

    results, dropped = [], {"memory": 0, "batch": 0, "invalid": 0}
    capacity = MARGIN * cluster.memory_gib
    for o in candidates(cfg, gpus, cluster.gpus_per_node):
        c = apply(cfg, o)
        if c.train.global_batch_size % o["parallel.dp"]:
            dropped["batch"] += 1
            continue
        if o["parallel.pp"] > 1 and c.train.global_batch_size // o["parallel.dp"] < o["parallel.pp"]:
            dropped["batch"] += 1  # fewer micro-batches than stages: mostly bubble
            continue
        try:
            r = predict_step(c, gpus, cluster, calib)
        except (LayoutError, ValueError):
            dropped["invalid"] += 1
            continue
        if r["memory_gib"] > capacity:
            dropped["memory"] += 1
            continue
        results.append((r, o))
    results.sort(key=lambda x: -x[0]["tokens_per_s"])
    return {"gpus": gpus, "cluster": cluster.name, "capacity_gib": capacity, "dropped": dropped,
            "best": [dict(overrides=o, tokens_per_s=r["tokens_per_s"], mfu=r["mfu"], memory_gib=r["memory_gib"],
                          step_s=r["step_s"]) for r, o in results[:top]]}


def command(base_overrides: list[str], layout: dict, gpus: int, gpus_per_node: int) -> str:
    nodes = max(1, gpus // gpus_per_node)
    per_node = gpus if nodes == 1 else gpus_per_node
    extra = [f"{k}={v}" for k, v in layout.items() if not (k == "parallel.ulysses_degree" and v == 1)]
    launch = (["launcher=slurm", f"launcher.nnodes={nodes}"] if nodes > 1 else []) + [f"launcher.nproc_per_node={per_node}"]
    kept = [a for a in base_overrides if a.split("=", 1)[0] not in {e.split("=")[0] for e in extra + launch}]
    return "seqpar-train " + " ".join(kept + extra + launch)


def main(argv=None) -> int:
    from seqpar.config import ConfigError
    from seqpar.sim.calibrate import calibrate
    from seqpar.sim.cluster import ClusterError, load_cluster
    from seqpar.sim.configs import compose, split_args

    argv = sys.argv[1:] if argv is None else list(argv)
    overrides, own = split_args(argv)
    if "gpus" not in own or "cluster" not in own:
        print("usage: seqpar-plan model=NAME cluster=NAME|PATH data.seq_len=N gpus=N [top=5] [hydra overrides]",
              file=sys.stderr)
        return 2
    try:
        cluster = load_cluster(own["cluster"])
        gpus = int(own["gpus"])
        if gpus < 1:
            raise LayoutError(f"gpus={gpus}: need at least one GPU")
        cfg = compose(overrides)
        result = plan(cfg, gpus, cluster, calibrate(), top=int(own.get("top", 5)))
    except (ClusterError, LayoutError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.model.name}, data.seq_len={cfg.data.seq_len}, train.global_batch_size={cfg.train.global_batch_size}, "
          f"{gpus} x {cluster.gpu} ({cluster.name}); usable memory {result['capacity_gib']:.0f} GiB per GPU")
    if not result["best"]:
        d = result["dropped"]
        print(f"no layout fits: {d['memory']} over memory, {d['batch']} not matching train.global_batch_size="
              f"{cfg.train.global_batch_size}, {d['invalid']} invalid; try more GPUs, a shorter data.seq_len, or a "
              "global batch divisible by more data-parallel ranks", file=sys.stderr)
        return 1
    print(f"{'#':>2} {'dp':>3} {'tp':>3} {'pp':>3} {'cp':>4} {'softmax_sp':<12} {'ckpt':<9} {'tokens/s':>12} "
          f"{'MFU':>6} {'GiB/rank':>9}")
    for i, b in enumerate(result["best"], 1):
        o = b["overrides"]
        sp = o["parallel.softmax_sp"] + (f"/{o['parallel.ulysses_degree']}" if o["parallel.softmax_sp"] == "usp" else "") \
            + ("/doc_bal" if o.get("parallel.layout") == "doc_balanced" else "")
        sp += "/dp_cp" if o.get("parallel.disagg.group") == "dp_cp" else ""
        print(f"{i:>2} {o['parallel.dp']:>3} {o['parallel.tp']:>3} {o['parallel.pp']:>3} {o['parallel.cp']:>4} "
              f"{sp:<12} {o['train.activation_checkpointing']:<9} {b['tokens_per_s']:>12,.0f} {b['mfu']:>6.3f} "
              f"{b['memory_gib']:>9.1f}")
    d = result["dropped"]
    print(f"({d['memory']} layouts over memory, {d['batch']} not matching the global batch, {d['invalid']} invalid)")
    cmd = command(overrides, result["best"][0]["overrides"], gpus, cluster.gpus_per_node)
    print("best:\n  " + cmd)
    if gpus > cluster.gpus_per_node:  # the same job through the sbatch script directly
        args = [a for a in cmd.split()[1:] if not a.startswith("launcher")]
        print(f"  (or: sbatch --nodes={gpus // cluster.gpus_per_node} slurm/train_multi_node.sbatch {' '.join(args)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
