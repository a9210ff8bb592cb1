"""seqpar-train: Hydra entry point. Validate -> start workers -> in each worker:
build mesh -> model -> data -> optimizer -> loop (shard -> forward -> loss -> backward -> step)."""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from seqpar import checkpoint, memory, memtrace
from seqpar.attention import AttnContext, disagg
from seqpar.config import ConfigError, register_configs, resolve_nproc, use_cuda, validate, world_size
from seqpar.data import PackedLoader, build_dataset
from seqpar.kernels import dispatch, jit_stats
from seqpar.kernels.flash_attn import split_tasks
from seqpar.kernels.flash_attn.cudnn_graph import build_stats as graph_build_stats
from seqpar.kernels.flash_attn.split import prebuild_plans
from seqpar.kernels.flash_attn.triton import tune_buckets
from seqpar.launch import ray as ray_launcher, slurm, stop_signal
from seqpar.launch.local import is_worker, launch_workers
from seqpar.metrics import MetricsLogger, alloc_retries, max_memory_gb, peak_flops, profiled
from seqpar.model.flops import step_flops
from seqpar.model.transformer import Transformer, head_dim
from seqpar.parallel.dims import ParallelDims, init_world
from seqpar.parallel.engine import build_engine
from seqpar.parallel.optim_offload import HostOffloadedAdamW, check_host_memory
from seqpar.parallel.parallelize import gradient_replicas, parallelize
from seqpar.parallel.pipeline import InterleavedOneFOneB, OneFOneB, pipeline_stage
from seqpar.parallel.sharding import document_positions, shard_sequence


def launch(cfg) -> int:
    """In the launching process: fail on a bad config before any worker starts, then start them."""
    if cfg.launcher.name == "slurm" and slurm.in_job_step():
        return slurm.run_task(cfg, run_worker)  # this process is one rank, placed by srun
    try:
        validate(cfg)
    except ConfigError as e:
        print(f"seqpar: invalid configuration: {e}", file=sys.stderr)
        return 2
    if cfg.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        print(f"world size {world_size(cfg)}: {ParallelDims.from_config(cfg.parallel, world_size(cfg))}")
        print(memory.estimate(cfg, world_size(cfg)).table())
        return 0
    # workers must agree on run_dir, whose default contains the launch time; absolute, as Ray workers run elsewhere
    argv = list(HydraConfig.get().overrides.task) + [f"run_dir={os.path.abspath(cfg.run_dir)}"]
    if cfg.launcher.name == "slurm":
        return slurm.submit(cfg, argv)
    if cfg.launcher.name == "ray":
        return ray_launcher.launch(cfg, argv)
    nproc = resolve_nproc(cfg)
    if nproc * cfg.launcher.nnodes == 1:
        return run_worker(cfg)
    return launch_workers(argv, nproc_per_node=nproc, nnodes=cfg.launcher.nnodes,
                          master_addr=cfg.launcher.master_addr, master_port=cfg.launcher.master_port)


def init_distributed(cfg) -> torch.device:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return init_world(use_cuda(cfg))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def param_dtype(cfg, device) -> torch.dtype:
    return torch.float64 if cfg.train.dtype == "fp64" else torch.float32


def activation_dtype(cfg, device) -> torch.dtype:
    """The residual stream's dtype between blocks (and pipeline stages): see `residual_dtype`."""
    if device.type == "cuda" and cfg.train.dtype in ("auto", "bf16") and not cfg.model.fp32_residual:
        return torch.bfloat16
    return param_dtype(cfg, device)


def autocast(cfg, device):
    if device.type == "cuda" and cfg.train.dtype in ("auto", "bf16"):
        # No cast cache: it would keep a bf16 copy of every weight the forward touches until the
        # region ends (16 GB for llama_8b, on top of the checkpointed activations); each linear
        # still keeps the cast its backward needs, and a checkpointed block only while it runs.
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return nullcontext()


def build_optimizer(model, cfg, device):
    t = cfg.train
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no decay on norms' gains
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=t.lr, betas=(t.beta1, t.beta2), foreach=device.type == "cuda")
    if t.offload_optimizer:
        # ranks sharing this host's RAM: torchrun says; under Slurm/Ray, at most one per local GPU
        world = dist.get_world_size() if dist.is_initialized() else 1
        local = os.environ.get("LOCAL_WORLD_SIZE") or min(world, max(1, torch.cuda.device_count()))
        check_host_memory(model.parameters(), int(local))
        opt = HostOffloadedAdamW(groups, **kwargs)
    else:
        opt = torch.optim.AdamW(groups, **kwargs)

    def lr_factor(step):  # linear warmup, then cosine down to min_lr_ratio
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def run_worker(cfg) -> int:
    validate(cfg, world=int(os.environ.get("WORLD_SIZE", 1)))
    # Before the first CUDA allocation (the allocator reads it then), unless the user chose: long
    # sequences allocate blocks of many sizes, and segments that grow in place keep the freed
    # space usable (torchtitan's launch script sets the same)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = init_distributed(cfg)
    try:
        train(cfg, device)
    finally:
        gc.collect()  # FSDP2 hooks must go before the gloo group does, or gloo aborts at exit
        dist.destroy_process_group()
    return 0


def train(cfg, device) -> None:
    started = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    disagg.configure(cfg.parallel.disagg)  # the model's attention calls carry no disagg options
    dims = ParallelDims.from_config(cfg.parallel, world)
    dims.build_mesh(device.type)
    memory.check_before_start(cfg, world, device, rank)  # a run that will not fit stops before allocating
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracing = cfg.logging.memory_snapshot and memtrace.start(device)  # until step 1's end, its peak

    jit_timed = device.type == "cuda" and jit_stats.install()
    model = build_model(cfg, dims, device)
    if cfg.train.cudnn_prebuild:
        prebuild_attention_plans(cfg, dims, device, rank)
    jit_stats.take()  # step 1's numbers start here
    optimizer, scheduler = build_optimizer(model, cfg, device)
    engine = build_engine(model, optimizer, scheduler, cfg, dims)  # FSDP2 or DeepSpeed: reduction, step, checkpoints

    loader = PackedLoader(build_dataset(cfg.data, cfg.data.seq_len), global_batch_size=cfg.train.global_batch_size,
                          micro_batch_size=cfg.train.micro_batch_size, dp_rank=dims.rank_in("dp"),
                          dp_size=dims.dp, seed=cfg.train.seed, read_as_rank=cfg.data.read_as_rank)

    start_step = 0
    ckpt_root = run_dir / "checkpoints"
    resume_from = checkpoint.latest(ckpt_root) if cfg.train.resume == "auto" else (
        None if cfg.train.resume == "none" else Path(cfg.train.resume))
    if resume_from is not None:
        extra = engine.load(resume_from)
        scheduler.load_state_dict(extra["scheduler"])
        loader.load_state_dict(extra["data"])
        checkpoint.restore_rng(extra["rng"])
        start_step = extra["step"]

    peak = peak_flops(device)
    disagg_spread = cfg.parallel.softmax_sp == "disagg" and dist.is_initialized()
    logger = MetricsLogger(run_dir, total_steps=cfg.train.steps, rank=rank, console=cfg.logging.console,
                           wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                           config=OmegaConf.to_container(cfg, resolve=True), start_step=start_step)
    with logger:
        for step in range(start_step + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            micro_batches = loader.next_batch()
            with profiled(step, cfg.logging, run_dir, rank, device):  # its step time includes the profiler's
                stats = train_step(engine.model, micro_batches, cfg, dims, device, backward=engine.backward)
                grad_norm = engine.step()  # clip, optimizer and schedule step, clear gradients
            loss = stats["loss"]
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at step {step}; the last checkpoint is kept. Lower train.lr (now {cfg.train.lr}), "
                    "raise train.warmup_steps, or set train.grad_clip")
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            tokens = cfg.train.global_batch_size * cfg.data.seq_len
            metrics = {"loss": loss, "lr": scheduler.get_last_lr()[0], "tokens": tokens * step,
                       "tokens_per_s": tokens / dt, "step_time_s": dt, "grad_norm": grad_norm}
            # sp/ keys; empty unless softmax_sp=disagg ran; with it every rank joins the spread's all-reduce
            metrics.update(disagg.step_metrics(group=dist.group.WORLD if disagg_spread else None))
            if step == start_step + 1:  # model build and init, optimizer states, resume: minutes for 8B
                metrics["startup_s"] = t0 - started
            if peak is not None:
                metrics["mfu"] = stats["flops"] / dt / (peak * world)
                metrics["max_mem_gb"] = max_memory_gb(device)
                metrics["alloc_retries"] = alloc_retries(device)
                metrics.update(graph_build_stats())
            if jit_timed:
                jit, slow = jit_stats.take(dist.group.WORLD if world > 1 else None, device)
                metrics.update(jit)
                for what, detail, seconds in slow if step > start_step + 1 else ():
                    print(f"seqpar: rank {rank}, step {step}: {what} {seconds:.2f} s: {detail}", file=sys.stderr,
                          flush=True)
            if tracing:
                memtrace.dump(run_dir, rank, keep_pickle=cfg.logging.memory_snapshot_pickle)
                tracing = False
            if step % cfg.logging.log_every == 0 or step == cfg.train.steps:
                logger.log(step, metrics)
            stop = stop_signal.agreed(device)  # Slurm's USR1: every rank checkpoints this step, then stops
            if stop or step == cfg.train.steps or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
                extra = {"step": step, "scheduler": scheduler.state_dict(), "data": loader.state_dict(),
                         "rng": checkpoint.capture_rng()}
                engine.save(ckpt_root, step, extra, keep=cfg.train.keep_checkpoints)
            if stop:
                break


def prebuild_attention_plans(cfg, dims: ParallelDims, device, rank: int) -> None:
    """`train.cudnn_prebuild`: where softmax attention runs on CUDA in bf16, the split's cuDNN plans
    for this rank's heads (a tensor-parallel rank holds n_heads / tp of them) built now, its
    Triton kernel tuned for every length bucket of the rank's rows (`tune_buckets`, up to
    `attention_rows`), and the pieces-over-a-prefix path run once (`split_tasks.warm_up`)."""
    m = cfg.model
    if (device.type != "cuda" or "S" not in m.layer_pattern or cfg.train.dtype not in ("auto", "bf16")
            or not dispatch.split_may_run()):
        return
    t0 = time.perf_counter()
    heads = m.n_heads // dims.tp
    prefix = split_tasks.cudnn_prefix()
    built = prebuild_plans(heads, head_dim(m), dtype=torch.bfloat16, device=device, prefix=prefix)
    t1 = time.perf_counter()
    kv_heads = max(1, m.n_kv_heads // dims.tp)
    tuned = tune_buckets(heads, kv_heads, head_dim(m), attention_rows(cfg, dims), device=device)
    if prefix:
        split_tasks.warm_up(heads, kv_heads, head_dim(m), device=device)
    torch.cuda.empty_cache()  # the tuning's inputs (GBs at long rows) back to the device, not the cache
    if rank == 0:
        print(f"seqpar: cuDNN attention plans of {len(built)} length buckets built in {t1 - t0:.1f} s, the Triton "
              f"kernel tuned for {tuned} tokens in {time.perf_counter() - t1:.1f} s (train.cudnn_prebuild)",
              flush=True)


def attention_rows(cfg, dims: ParallelDims) -> int:
    """The most query rows one attention call of this rank can hold: a micro-batch's sequence, or
    under disagg a server's, which may take work from every rank of its group (llama_1b dp=2 at
    64k tokens per GPU of DistCA's mixes: up to 25% past its own rows; a bucket not tuned here is
    tuned inside the step that first meets it, while the other ranks wait)."""
    rows = cfg.data.seq_len * cfg.train.micro_batch_size
    return rows * dims.dp if dims.disagg and dims.attention_dp_cp else rows


def build_model(cfg, dims: ParallelDims, device):
    """This rank's part of the model: its pipeline stage, initialised (the same weights under
    every layout), then tensor parallel, activation checkpointing and FSDP applied."""
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):  # init_weights writes every weight: torch's own init would be wasted (~1 min for 8B)
        model = pipeline_stage(Transformer(cfg.model), dims, cfg)
    model = model.to_empty(device=device).to(dtype=param_dtype(cfg, device))
    model.init_weights(cfg.train.seed)
    return parallelize(model, dims, cfg)


def train_step(model, micro_batches, cfg, dims: ParallelDims, device, *, backward=torch.autograd.backward) -> dict:
    """Forward and backward of one optimizer step's micro-batches on this rank; `backward(loss)`,
    or `backward(output, grad)` on a pipeline stage before the last, is the dp engine's (DeepSpeed
    must see every backward).

    The loss is the mean over every target token of the global batch, so it does not depend on
    how the batch is split over dp, cp and micro-batches."""
    layout = cfg.parallel.layout
    cp_group = dims.group("cp")  # size 1 when cp=1; never None, which would mean the whole world
    counts = torch.tensor([sum(int((mb.targets != -100).sum()) for mb in micro_batches),
                           sum(step_flops(cfg.model, torch.diff(mb.cu_seqlens).tolist()) for mb in micro_batches)],
                          dtype=torch.float64, device=device)
    dist.all_reduce(counts, group=dims.group("dp"))  # every cp rank holds the same whole sequences
    n_tokens, flops = counts.tolist()
    pp_rank, virtual = dims.rank_in("pp"), cfg.parallel.virtual_stages
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def forward(i, hidden=None, chunk=0):
        """This rank's chunk `chunk` of micro-batch i; on the last stage, the loss to backpropagate."""
        nonlocal loss_sum
        first, last = pp_rank == 0 and chunk == 0, pp_rank == dims.pp - 1 and chunk == virtual - 1
        mb = micro_batches[i]
        cu_seqlens = mb.cu_seqlens.to(device)
        # doc_zigzag pads every document to a multiple of 2*cp: pad targets are the loss's ignore_index
        shard = lambda x, pad=0: shard_sequence(x.to(device), cp_group, layout=layout, cu_seqlens=cu_seqlens,
                                                pad_value=pad)
        positions = document_positions(cu_seqlens, mb.input_ids.shape[1])
        ctx = AttnContext(group=cp_group, cu_seqlens=cu_seqlens, position_ids=shard(positions[None])[0],
                          layout=layout, softmax_sp=cfg.parallel.softmax_sp, linear_sp=cfg.parallel.linear_sp,
                          linear_scan=cfg.parallel.linear_scan)
        if dims.attention_dp_cp:
            # the dp rows joined, each cut in cp contiguous pieces (validated): the dp_cp shards of one row
            ctx.softmax_view = dataclasses.replace(ctx, group=dims.group("attn"), layout="contiguous",
                                                   cu_seqlens=disagg.join_row_bounds(cu_seqlens, dims.group("dp")))
        elif dims.disagg:  # the same ranks as cp, on disagg's own communicator
            ctx.softmax_view = dataclasses.replace(ctx, group=dims.group("attn"))
        with autocast(cfg, device):
            out = model(shard(mb.input_ids) if first else hidden, ctx, targets=shard(mb.targets, -100) if last else None,
                        chunk=chunk)
        if not last:
            return out
        loss_sum += out.detach().to(torch.float64)
        return out * (gradient_replicas(dims) / n_tokens)

    if dims.pp == 1:
        for i in range(len(micro_batches)):
            backward(forward(i))
    else:
        rows, seq_len = micro_batches[0].input_ids.shape
        shape = (rows, seq_len // dims.cp // (dims.tp if cfg.parallel.tp_sequence_parallel else 1), cfg.model.d_model)
        args = (dims.group("pp"), shape, activation_dtype(cfg, device), device, backward)
        schedule = InterleavedOneFOneB(*args, virtual=virtual) if virtual > 1 else OneFOneB(*args)
        schedule.run(forward, len(micro_batches))
    dist.all_reduce(loss_sum, group=dims.group("dp_cp"))
    if dims.pp > 1:  # only the last stage computed a loss
        dist.all_reduce(loss_sum, group=dims.group("pp"))
    return {"loss": loss_sum.item() / n_tokens, "flops": flops}


@hydra.main(version_base=None, config_path="pkg://seqpar.conf", config_name="train")
def _hydra_main(cfg) -> None:
    code = run_worker(cfg) if is_worker() else launch(cfg)
    if code:
        sys.exit(code)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
