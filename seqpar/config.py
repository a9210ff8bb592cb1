"""The typed configuration of a run (registered with Hydra's ConfigStore) and its validation.

Validation is the one place that knows the rules between keys; it runs in the launching process
before any worker starts, and every message names the key, its value and the rule.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    vocab_size: int = MISSING
    d_model: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: int = MISSING
    head_dim: Optional[int] = None
    ffn_dim: int = MISSING
    layer_pattern: str = "S"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    linear_decay: str = "transnormer"
    tie_embeddings: bool = False
    # Under bf16 autocast the residual stream (and so what a checkpoint keeps) is bf16, as in Megatron
    # (its default) and torchtitan (FSDP2 param_dtype=bf16); true keeps it fp32 (Megatron's fp32_residual_connection)
    fp32_residual: bool = False


@dataclass
class DisaggConfig:  # parallel.softmax_sp=disagg (core-attention servers); rules in seqpar.attention.disagg.options
    eps: float = 0.1  # planning stops when every server is within eps of the mean attention load
    min_chunk: int = 128  # smallest query piece the planner cuts
    task_overhead: Optional[int] = None  # per-task cost in score pairs; null: fitted from cost_table, else 8192
    # single: every server runs its tasks in ONE kernel call per direction, its transfers exposed;
    # halves: its local work split around the remote work (L1 / R / L2), transfers behind L1 and L2;
    # ping_pong: L1 / R1 / R2 / L2; local_remote: L / R uncut (the backward R / L), Q|K|V in and
    # dQ|dK|dV back behind L. single measured fastest on 2 H100 (all five mixes x lengths,
    # 16 batches each, 2026-11-26): the overlapped schedules' extra calls cost more than they hide
    schedule: str = "single"
    cost_table: Optional[str] = None  # JSON from `python -m seqpar.bench disagg --profile-cost-table`
    # a score pair a server computes on seqpar's Triton kernel costs this many on cuDNN, where the
    # split hands its long tasks to cuDNN (CUDA): the planner weighs tasks by their kernel; null:
    # planner.TRITON_COST, the measured one (it says why)
    triton_cost: Optional[float] = None
    # one: the backward reuses the forward's plan (the servers keep their inputs); per_direction: the
    # forward is planned for the Triton kernel's forward speed (planner.TRITON_FWD_COST) and the
    # backward for triton_cost, each balanced, the backward's servers sent their inputs again
    plans: str = "one"
    # dp_cp: also move attention work between the data-parallel ranks (their packed rows joined into
    # one); the same as cp where dp = 1 or softmax_sp is not disagg
    group: str = "dp_cp"


@dataclass
class ParallelConfig:
    dp: int = -1  # -1: whatever the world size leaves after pp, cp and tp
    tp: int = 1
    tp_sequence_parallel: bool = True  # Megatron-SP: norms and the residual stream split along the sequence over tp
    pp: int = 1
    virtual_stages: int = 1  # >1: interleaved 1F1B, each pp rank holding this many non-contiguous layer chunks
    pp_layers: Optional[List[int]] = None  # layers per (virtual) pipeline stage; None: balanced on the cost model
    cp: int = 1
    softmax_sp: str = "allgather"
    ulysses_degree: int = 1  # softmax_sp=usp: cp = ring x ulysses, Ulysses (all-to-all) inside a node
    linear_sp: str = "lasp2"
    linear_scan: str = "allgather"  # how lasp2 exchanges memory states: allgather | pipelined
    layout: str = "zigzag"  # sharding.LAYOUTS: contiguous | zigzag | doc_zigzag | doc_balanced
    dp_engine: str = "fsdp2"  # fsdp2 | deepspeed (ZeRO), both over the dp x cp ranks
    zero_stage: Optional[int] = None  # dp_engine=deepspeed: 1, 2 or 3 (None: 2); FSDP2 always shards like stage 3
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # merged over the generated DeepSpeed config
    disagg: DisaggConfig = field(default_factory=DisaggConfig)


@dataclass
class DataConfig:
    name: str = "embedded"  # embedded | token_file | synthetic
    path: Optional[str] = None
    seq_len: int = 256
    distribution: str = "lognormal"  # synthetic documents: fixed | uniform | lognormal | file
    mean_len: int = 1024
    sigma: float = 1.0
    max_len: Optional[int] = None
    lengths_file: Optional[str] = None
    num_tokens: int = 1 << 22
    seed: int = 0
    # benchmarks only: every dp rank reads this dp rank's micro-batches, so the ranks hold equal work
    # (disagg's end-to-end "balanced ideal": the mean over r of a run with data.read_as_rank=r)
    read_as_rank: Optional[int] = None


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 8  # sequences of data.seq_len per optimizer step, whatever the layout
    micro_batch_size: int = 4  # sequences per forward/backward on one dp rank
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | fp64 | bf16
    device: str = "auto"  # auto | cpu | cuda
    activation_checkpointing: str = "none"  # none | full | selective (keep attention, recompute norms and MLP)
    offload_activations: bool = False  # checkpointed inputs wait for backward in pinned host memory
    offload_optimizer: bool = False  # AdamW's moments wait in pinned host memory between steps (fsdp2 engine)
    mlp_chunk_tokens: int = 0  # >0: the MLP runs longer sequences in chunks of this many positions
    # CUDA, bf16, softmax layers: build cuDNN's attention plans for every long-document length bucket
    # before step 1 (10-13 s for llama_1b), not inside the steps that first meet each
    # (kernels/flash_attn/split.py). 2 H100, llama_1b 64k tokens per GPU, disagg dp_cp: 1.229x -> 1.169x
    # the balanced ideal, a profiled step's host stalls 546 -> 40 ms (2026-11-26, docs/benchmarks).
    # Also tunes the Triton kernel for each token bucket of a row (flash_attn.triton.tune_buckets)
    cudnn_prebuild: bool = True
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest in run_dir if any) | none | PATH of a checkpoint


@dataclass
class LauncherConfig:
    name: str = "local"
    nproc_per_node: Any = "auto"  # auto: every local GPU, or 2 processes on a CPU-only machine
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port
    partition: Optional[str] = None  # slurm: sbatch --partition (null: the cluster's default)
    time_limit: Optional[str] = None  # slurm: sbatch --time (null: the script's)
    address: str = "auto"  # ray: a running cluster, auto (RAY_ADDRESS or this node's) | HOST:PORT | ray://HOST:PORT
    placement_strategy: str = "PACK"  # ray: how the one-bundle-per-rank placement group spreads over nodes
    cpus_per_worker: int = 1  # ray: CPUs in each rank's bundle (plus one GPU unless train.device=cpu)
    max_restarts: int = 3  # ray: whole-group restarts from the last checkpoint after a worker dies
    placement_timeout_s: float = 120.0  # ray: how long to wait for the placement group to fit


@dataclass
class LoggingConfig:
    console: bool = True
    wandb: bool = False
    wandb_project: str = "seqpar"
    log_every: int = 1
    profile_step: int = 0  # > 0: torch.profiler over that step, every rank's table in run_dir/profile/
    profile_trace: bool = False  # with it, each rank's Chrome trace too (tens to hundreds of MB)
    # false: on CUDA record only kernels, copies and CUDA runtime calls. Recording every CPU op
    # tripled a llama_1b 64k step (2.7 -> 8.9 s, 2 H100): its timeline was the profiler's, not the step's
    profile_cpu_ops: bool = True
    memory_snapshot: bool = False  # CUDA: what is live at step 1's peak, by allocating code (run_dir/memory/)
    memory_snapshot_pickle: bool = False  # with it, the raw snapshot too (for pytorch.org/memory_viz)


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = MISSING
    dry_run: bool = False


def register_configs() -> None:
    ConfigStore.instance().store(name="job_schema", node=JobConfig)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names key, value and rule."""


def resolve_nproc(cfg) -> int:
    n = cfg.launcher.nproc_per_node
    if n == "auto":
        import torch
        return torch.cuda.device_count() if use_cuda(cfg) else 2
    try:
        return int(n)
    except (TypeError, ValueError):
        raise ConfigError(f"launcher.nproc_per_node={n!r}: must be a positive integer or 'auto'") from None


def use_cuda(cfg) -> bool:
    import torch
    if cfg.train.device == "cuda":
        return True
    return cfg.train.device == "auto" and torch.cuda.is_available()


def world_size(cfg) -> int:
    return resolve_nproc(cfg) * cfg.launcher.nnodes


def data_parallel_size(cfg, world: int) -> int:
    p = cfg.parallel
    return world // (p.pp * p.cp * p.tp) if p.dp == -1 else p.dp


def _validate_dp_engine(p) -> None:
    if p.dp_engine not in ("fsdp2", "deepspeed"):
        raise ConfigError(f"parallel.dp_engine={p.dp_engine!r}: choose fsdp2 or deepspeed")
    if p.dp_engine == "fsdp2":
        if p.zero_stage is not None or p.deepspeed:
            key = "parallel.zero_stage" if p.zero_stage is not None else "parallel.deepspeed"
            raise ConfigError(f"{key} only applies to parallel.dp_engine=deepspeed (now fsdp2, which always shards "
                              "parameters, gradients and optimizer state); remove it or set parallel.dp_engine=deepspeed")
        return
    if p.zero_stage is not None and p.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage}: DeepSpeed ZeRO stages are 1, 2 or 3")
    if p.tp > 1:
        raise ConfigError(f"parallel.dp_engine=deepspeed with parallel.tp={p.tp}: seqpar's tensor parallelism shards "
                          "parameters as DTensors, which DeepSpeed cannot take (its initialize fails moving them, and ZeRO "
                          "flattens parameters into plain buffers); use "
                          "parallel.dp_engine=fsdp2 with tp (it shards the tp shards over dp x cp), or parallel.tp=1")
    if p.pp > 1 and (p.zero_stage or 2) == 3:
        raise ConfigError(f"parallel.zero_stage=3 with parallel.pp={p.pp}: ZeRO-3 gathers and frees parameters around "
                          "each forward and backward, while a pipeline stage keeps several micro-batches in flight "
                          "(DeepSpeed's own pipeline refuses it too); use parallel.zero_stage=1 or 2, or "
                          "parallel.dp_engine=fsdp2")
    from seqpar.parallel.engine import OWNED_DEEPSPEED_KEYS

    owned = [k for k in p.deepspeed if k in OWNED_DEEPSPEED_KEYS]
    if p.deepspeed and "stage" in (p.deepspeed.get("zero_optimization") or {}):
        owned.append("zero_optimization.stage")
    if owned:
        source = {**OWNED_DEEPSPEED_KEYS, "zero_optimization.stage": "parallel.zero_stage"}
        raise ConfigError(f"parallel.deepspeed.{owned[0]}: seqpar sets it from {source[owned[0]]}; set that instead")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:  # find_spec: importing it here would cost seconds
        raise ConfigError("parallel.dp_engine=deepspeed: DeepSpeed is not installed; "
                          "install it with DS_BUILD_OPS=0 pip install 'seqpar[deepspeed]'")


def validate(cfg, world: int | None = None) -> None:
    """Raise ConfigError on the first rule the config breaks."""
    from seqpar.attention import LINEAR_SP, SOFTMAX_SP
    from seqpar.attention.disagg import check_group as check_disagg_group, validate as validate_disagg
    from seqpar.attention.state_scan import SCANS
    from seqpar.parallel.sharding import LAYOUTS, check_layout, num_chunks

    def fail(msg):
        raise ConfigError(msg)

    m, p, d, t, l = cfg.model, cfg.parallel, cfg.data, cfg.train, cfg.launcher
    world = world_size(cfg) if world is None else world

    if l.name not in ("local", "slurm", "ray"):
        fail(f"launcher.name={l.name!r}: choose local, slurm or ray")
    if l.name == "ray" and l.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        fail(f"launcher.placement_strategy={l.placement_strategy!r}: choose PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    if l.name == "ray" and (l.max_restarts < 0 or l.cpus_per_worker < 1 or not l.placement_timeout_s > 0):
        fail(f"launcher.max_restarts={l.max_restarts}, launcher.cpus_per_worker={l.cpus_per_worker}, "
             f"launcher.placement_timeout_s={l.placement_timeout_s}: need >= 0, >= 1 and > 0")
    if world < 1:
        fail(f"launcher.nproc_per_node x launcher.nnodes = {world}: need at least one process"
             + (" (no CUDA device found; set train.device=cpu)" if use_cuda(cfg) else ""))
    if use_cuda(cfg) and l.nnodes == 1 and l.name == "local":  # Slurm and Ray place ranks on other machines
        import torch
        if resolve_nproc(cfg) > torch.cuda.device_count():
            fail(f"launcher.nproc_per_node={resolve_nproc(cfg)}: only {torch.cuda.device_count()} CUDA devices here")
    for key in ("tp", "pp", "cp"):
        if getattr(p, key) < 1:
            fail(f"parallel.{key}={getattr(p, key)}: must be >= 1")
    if p.dp == 0 or p.dp < -1:
        fail(f"parallel.dp={p.dp}: must be >= 1, or -1 to fill the world size")
    if p.dp == -1 and world % (p.pp * p.cp * p.tp):
        fail(f"parallel.pp*cp*tp={p.pp * p.cp * p.tp} does not divide the world size {world} "
             f"(launcher.nproc_per_node={l.nproc_per_node} x launcher.nnodes={l.nnodes})")
    if p.dp != -1 and p.dp * p.pp * p.cp * p.tp != world:
        fail(f"parallel.dp*pp*cp*tp={p.dp}*{p.pp}*{p.cp}*{p.tp}={p.dp * p.pp * p.cp * p.tp} must equal the world size {world} "
             f"(launcher.nproc_per_node={l.nproc_per_node} x launcher.nnodes={l.nnodes}); or set parallel.dp=-1")
    if p.pp > m.n_layers:
        fail(f"parallel.pp={p.pp}: more pipeline stages than model.n_layers={m.n_layers}")
    stages = p.pp * p.virtual_stages
    if p.virtual_stages < 1 or (p.virtual_stages > 1 and p.pp == 1):
        fail(f"parallel.virtual_stages={p.virtual_stages}: must be >= 1, and > 1 only with parallel.pp > 1 "
             f"(now {p.pp}): it interleaves pipeline stages")
    if stages > m.n_layers:
        fail(f"parallel.pp x parallel.virtual_stages = {p.pp} x {p.virtual_stages}: more pipeline stages than "
             f"model.n_layers={m.n_layers}")
    if p.pp_layers is not None and (len(p.pp_layers) != stages or sum(p.pp_layers) != m.n_layers
                                    or min(p.pp_layers) < 1):
        fail(f"parallel.pp_layers={list(p.pp_layers)}: needs parallel.pp x parallel.virtual_stages = {stages} "
             f"counts >= 1 summing to model.n_layers={m.n_layers}; or leave it null to balance stages on the cost model")
    if p.pp > 1 and m.tie_embeddings:
        fail("model.tie_embeddings=true with parallel.pp>1: the embedding and the output head live on different "
             "pipeline stages; set model.tie_embeddings=false or parallel.pp=1")
    _validate_dp_engine(p)
    if p.layout not in LAYOUTS:
        fail(f"parallel.layout={p.layout!r}: choose one of {list(LAYOUTS)}")
    try:
        check_layout(p, m.layer_pattern)
    except ValueError as e:
        fail(str(e))
    if p.softmax_sp not in SOFTMAX_SP:
        fail(f"parallel.softmax_sp={p.softmax_sp!r}: implemented methods are {sorted(SOFTMAX_SP)}")
    try:
        validate_disagg(p.disagg)
        check_disagg_group(p, t.micro_batch_size, data_parallel_size(cfg, world))
    except ValueError as e:
        fail(str(e))
    if p.ulysses_degree != 1 and p.softmax_sp != "usp":
        fail(f"parallel.ulysses_degree={p.ulysses_degree} only applies to parallel.softmax_sp=usp "
             f"(now {p.softmax_sp!r}); leave it at 1")
    if p.softmax_sp == "usp" and (p.ulysses_degree < 1 or p.cp % p.ulysses_degree):
        fail(f"parallel.ulysses_degree={p.ulysses_degree} must divide parallel.cp={p.cp} (cp = ring x ulysses)")
    if "S" in m.layer_pattern and p.softmax_sp in ("ulysses", "usp"):
        degree = p.cp if p.softmax_sp == "ulysses" else p.ulysses_degree
        key = "parallel.cp" if p.softmax_sp == "ulysses" else "parallel.ulysses_degree"
        if m.n_heads % degree or (m.n_kv_heads % degree and degree % m.n_kv_heads):
            fail(f"parallel.softmax_sp={p.softmax_sp} splits attention heads over {key}={degree}: it must divide "
                 f"model.n_heads={m.n_heads}, and divide or be a multiple of model.n_kv_heads={m.n_kv_heads}")
    if p.linear_sp not in LINEAR_SP:
        fail(f"parallel.linear_sp={p.linear_sp!r}: implemented methods are {sorted(LINEAR_SP)}")
    if p.linear_scan not in SCANS:
        fail(f"parallel.linear_scan={p.linear_scan!r}: choose one of {list(SCANS)}")
    if p.linear_sp == "lasp1" and p.linear_scan != "allgather":
        fail(f"parallel.linear_scan={p.linear_scan} applies to parallel.linear_sp=lasp2; "
             "lasp1 is a sequential ring of states by definition")

    bad = set(m.layer_pattern) - {"S", "L"}
    if not m.layer_pattern or bad:
        fail(f"model.layer_pattern={m.layer_pattern!r}: unknown layer type {sorted(bad)}; use S (softmax) and L (linear)")
    if m.n_kv_heads < 1 or m.n_heads % m.n_kv_heads:
        fail(f"model.n_kv_heads={m.n_kv_heads}: must divide model.n_heads={m.n_heads} (grouped-query attention)")
    for key in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):  # vocab: the embedding and head split over tp
        if getattr(m, key) % p.tp:
            fail(f"parallel.tp={p.tp} splits model.{key}={getattr(m, key)} over tp ranks: it must divide it")
    if p.tp > 1 and p.tp_sequence_parallel and d.seq_len % (p.cp * p.tp):
        fail(f"parallel.tp_sequence_parallel=true splits each cp rank's data.seq_len/cp tokens over parallel.tp={p.tp}: "
             f"data.seq_len={d.seq_len} must be divisible by cp*tp={p.cp * p.tp}")
    head_dim = m.head_dim or m.d_model // m.n_heads
    if m.head_dim is None and m.d_model % m.n_heads:
        fail(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; set model.head_dim")
    if head_dim % 2:
        fail(f"model.head_dim={head_dim}: rotary embeddings need an even head dimension")
    if d.name in ("embedded", "synthetic") and m.vocab_size < 257:
        fail(f"model.vocab_size={m.vocab_size}: data.name={d.name} uses the byte tokenizer's 257 ids")

    chunks = num_chunks(p.cp, p.layout)
    if d.seq_len < 1 or d.seq_len % chunks:
        fail(f"parallel.cp={p.cp} with parallel.layout={p.layout}: data.seq_len={d.seq_len} must be divisible "
             f"into {chunks} equal chunks" + (" (2*cp)" if p.layout == "zigzag" else ""))
    if d.name not in ("embedded", "token_file", "synthetic"):
        fail(f"data.name={d.name!r}: choose embedded, token_file or synthetic")
    if d.name == "token_file":
        if not d.path:
            fail("data.name=token_file needs data.path=DIR (make one with `seqpar-prepare FILES --out DIR`)")
        if not (Path(d.path) / "tokens.bin").is_file():
            fail(f"data.path={d.path}: no tokens.bin there (make one with `seqpar-prepare FILES --out {d.path}`)")
    if d.name == "synthetic" and d.distribution == "file" and not (d.lengths_file and os.path.isfile(d.lengths_file)):
        fail(f"data.lengths_file={d.lengths_file}: file not found (data.distribution=file needs a JSON list of lengths)")

    dp = data_parallel_size(cfg, world)
    if d.read_as_rank is not None and not 0 <= d.read_as_rank < dp:
        fail(f"data.read_as_rank={d.read_as_rank}: must be a data-parallel rank, 0..{dp - 1} (dp={dp}), or null")
    if t.steps < 1:
        fail(f"train.steps={t.steps}: must be >= 1")
    if t.micro_batch_size < 1 or t.global_batch_size < 1 or t.global_batch_size % (dp * t.micro_batch_size):
        fail(f"train.global_batch_size={t.global_batch_size} must be a positive multiple of dp x train.micro_batch_size "
             f"= {dp} x {t.micro_batch_size}")
    n_micro = t.global_batch_size // (dp * t.micro_batch_size)
    if p.virtual_stages > 1 and n_micro % p.pp:
        fail(f"parallel.virtual_stages={p.virtual_stages}: the interleaved schedule runs micro-batches in groups of "
             f"parallel.pp={p.pp}, but train.global_batch_size / (dp x train.micro_batch_size) = "
             f"{t.global_batch_size} / ({dp} x {t.micro_batch_size}) = {n_micro} micro-batches is not a multiple of it; "
             "change train.global_batch_size or train.micro_batch_size, or set parallel.virtual_stages=1")
    if not t.lr > 0:
        fail(f"train.lr={t.lr}: must be > 0")
    if not 0 <= t.min_lr_ratio <= 1:
        fail(f"train.min_lr_ratio={t.min_lr_ratio}: must be within [0, 1]")
    if t.warmup_steps < 0 or t.warmup_steps > t.steps:
        fail(f"train.warmup_steps={t.warmup_steps}: must be within [0, train.steps={t.steps}]")
    if t.weight_decay < 0:
        fail(f"train.weight_decay={t.weight_decay}: must be >= 0")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
        fail(f"train.beta1={t.beta1}, train.beta2={t.beta2}: must be within [0, 1)")
    if t.grad_clip < 0:
        fail(f"train.grad_clip={t.grad_clip}: must be >= 0 (0 disables clipping)")
    if t.dtype not in ("auto", "fp32", "fp64", "bf16"):
        fail(f"train.dtype={t.dtype!r}: choose auto, fp32, fp64 or bf16")
    if t.dtype == "bf16" and not use_cuda(cfg):
        fail("train.dtype=bf16 needs CUDA (bf16 autocast); on CPU use fp32 or fp64")
    if t.device not in ("auto", "cpu", "cuda"):
        fail(f"train.device={t.device!r}: choose auto, cpu or cuda")
    if t.activation_checkpointing not in ("none", "full", "selective"):
        fail(f"train.activation_checkpointing={t.activation_checkpointing!r}: choose none, full or selective")
    if t.offload_activations and t.activation_checkpointing == "none":
        fail("train.offload_activations=true offloads what activation checkpointing keeps: "
             "set train.activation_checkpointing=full or selective")
    if t.offload_optimizer and p.dp_engine == "deepspeed":
        fail("train.offload_optimizer=true is the fsdp2 engine's; under parallel.dp_engine=deepspeed use DeepSpeed's "
             "own: +deepspeed.zero_optimization.offload_optimizer.device=cpu (and set train.offload_optimizer=false)")
    if t.mlp_chunk_tokens < 0:
        fail(f"train.mlp_chunk_tokens={t.mlp_chunk_tokens}: must be >= 0 (0 disables chunking)")
    if t.mlp_chunk_tokens and p.tp > 1 and p.tp_sequence_parallel:
        # w2's reduce-scatter splits each chunk over tp ranks: concatenated, the pieces would not be
        # this rank's contiguous slice of the sequence
        fail(f"train.mlp_chunk_tokens={t.mlp_chunk_tokens} with parallel.tp={p.tp} and "
             "parallel.tp_sequence_parallel=true: chunk the MLP only with tp=1 or tp_sequence_parallel=false")
    if t.checkpoint_every < 0 or t.keep_checkpoints < 1:
        fail(f"train.checkpoint_every={t.checkpoint_every}, train.keep_checkpoints={t.keep_checkpoints}: "
             "need checkpoint_every >= 0 and keep_checkpoints >= 1")
    if t.resume not in ("auto", "none") and not Path(t.resume).is_dir():
        fail(f"train.resume={t.resume}: no checkpoint folder there (use auto, none, or a run_dir/checkpoints/step_* path)")
    if cfg.logging.log_every < 1:
        fail(f"logging.log_every={cfg.logging.log_every}: must be >= 1")
    if cfg.logging.memory_snapshot and not use_cuda(cfg):
        fail("logging.memory_snapshot=true records CUDA allocations: run on GPUs, or drop it")
    if not 0 <= cfg.logging.profile_step <= t.steps:
        fail(f"logging.profile_step={cfg.logging.profile_step}: choose a step of the run (1..train.steps={t.steps}), "
             "or 0 for none")
