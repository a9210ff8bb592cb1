"""Job configs for the simulator: seqpar-train's own Hydra composition, so that `predict` and
`seqpar-plan` take exactly the overrides `seqpar-train` takes."""
from __future__ import annotations

import functools


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    from seqpar.config import register_configs

    register_configs()
    with initialize_config_module(config_module="seqpar.conf", version_base=None):
        cfg = hydra_compose(config_name="train", overrides=[*overrides, "run_dir=unused"])
    OmegaConf.set_struct(cfg, False)
    return cfg


def plain_config(overrides) -> Section:
    """`as_plain(compose(overrides))`, composed once per distinct overrides (Hydra takes ~0.3 s a
    composition; calibration and validation predict the same runs many times). A fresh copy each call."""
    import copy

    return copy.deepcopy(_plain_config(tuple(overrides)))


@functools.lru_cache(maxsize=64)
def _plain_config(overrides: tuple) -> Section:
    return as_plain(compose(list(overrides)))


def world_of(cfg) -> int:
    """GPUs of the run the config describes (launcher.nproc_per_node x nnodes; 'auto' counts as 1 node
    of the parallel degrees' product)."""
    n = cfg.launcher.nproc_per_node
    if n == "auto":
        p = cfg.parallel
        return max(1, p.pp * p.cp * p.tp * max(1, p.dp))
    return int(n) * int(cfg.launcher.nnodes)


def split_args(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Hydra overrides, and the simulator's own `key=value` arguments (cluster=, gpus=, ...)."""
    own_keys = {"cluster", "gpus", "family", "top", "out"}
    overrides, own = [], {}
    for a in argv:
        key = a.split("=", 1)[0].lstrip("-")
        if "=" in a and key in own_keys:
            own[key] = a.split("=", 1)[1]
        else:
            overrides.append(a)
    return overrides, own


class Section(dict):
    """A plain attribute view of a resolved config: OmegaConf's attribute access costs ~50 us a
    read, and a plan reads the config millions of times."""
    __getattr__ = dict.get

    def __setattr__(self, key, value):
        self[key] = value

    def __deepcopy__(self, memo):
        return Section({k: (v.__deepcopy__(memo) if isinstance(v, Section) else v) for k, v in self.items()})


def as_plain(cfg):
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg):
        return cfg
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "run_dir"])  # run_dir: ${now:...}

    def wrap(x):
        if isinstance(x, dict):
            return Section({k: wrap(v) for k, v in x.items()})
        return x
    return wrap(OmegaConf.to_container(cfg, resolve=True))


def check_config(cfg, world: int) -> None:
    """seqpar.config's rules for `cfg` on `world` GPUs of a CUDA cluster (raises ConfigError naming the
    key), judged as if launched there: this machine's devices do not matter."""
    import copy

    from omegaconf import OmegaConf

    from seqpar.config import ConfigError, validate

    c = copy.deepcopy(cfg)
    if OmegaConf.is_config(c):
        OmegaConf.set_struct(c, False)
    c.train.device = "cuda"
    c.launcher.name = "slurm"  # the local launcher's rule compares nproc with this machine's GPUs
    try:
        validate(c, world)
    except ConfigError as e:
        if "is not installed" not in str(e):  # an optional engine missing here may exist on the cluster
            raise
