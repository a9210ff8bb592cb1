"""`python -m seqpar.sim validate|predict|sweep|plan [...]` (see docs/sim.md)."""
from __future__ import annotations

import json
import os
import sys

USAGE = """usage:
  python -m seqpar.sim validate [--out FILE.json]
  python -m seqpar.sim predict [hydra overrides] cluster=NAME|PATH [gpus=N] [--out FILE.json]
  python -m seqpar.sim sweep [--out DIR]
  python -m seqpar.sim plan model=... cluster=... data.seq_len=N gpus=N   (= seqpar-plan)"""


def _pop_out(argv: list[str]) -> tuple[list[str], str | None]:
    out, rest, it = None, [], iter(argv)
    for a in it:
        if a == "--out":
            out = next(it, None)
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
        else:
            rest.append(a)
    return rest, out


def predict_main(argv: list[str], out: str | None) -> int:
    from seqpar.sim import predict
    from seqpar.sim.cluster import load_cluster
    from seqpar.sim.configs import check_config, compose, split_args, world_of

    overrides, own = split_args(argv)
    if "cluster" not in own:
        print("predict needs cluster=NAME (a conf/cluster preset) or cluster=PATH.yaml", file=sys.stderr)
        return 2
    cluster = load_cluster(own["cluster"])
    cfg = compose(overrides)
    world = int(own["gpus"]) if "gpus" in own else world_of(cfg)
    check_config(cfg, world)
    result = predict(cfg, cluster, world=world, family=own.get("family", "cudnn"))
    result["overrides"] = overrides
    result["gpus"] = world
    print(f"{cluster.name}, {world} GPUs, {' '.join(overrides) or '(defaults)'}: step {result['step_s']:.4f} s, "
          f"{result['tokens_per_s']:,.0f} tokens/s, MFU {result['mfu']:.3f}, memory {result['memory_gib']:.1f} GiB "
          f"per rank ({'fits' if result['fits'] else 'DOES NOT FIT'} in {cluster.memory_gib} GiB)")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("validate", "predict", "sweep", "plan"):
        print(USAGE, file=sys.stderr)
        return 2
    cmd, (rest, out) = argv[0], _pop_out(argv[1:])
    from seqpar.config import ConfigError
    from seqpar.sim.cluster import ClusterError
    from seqpar.sim.step import LayoutError

    try:
        if cmd == "validate":
            from seqpar.sim.validate import main as validate_main
            return validate_main(out)
        if cmd == "predict":
            return predict_main(rest, out)
        if cmd == "sweep":
            from seqpar.sim.sweep import main as sweep_main
            return sweep_main(out or "docs/sim")
        from seqpar.sim.plan import main as plan_main
        return plan_main(rest)
    except (ClusterError, LayoutError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
