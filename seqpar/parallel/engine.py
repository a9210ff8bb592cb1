"""The data-parallel engine: gradient reduction, clipping, the optimizer step and checkpoints of
model + optimizer, behind one interface so that train.py has one code path for FSDP2 and DeepSpeed.

Both engines reduce gradients over the dp_cp group, averaging: cp ranks hold different tokens of the
same samples, so they reduce like dp ranks, and train_step's loss scaling undoes the mean for both.
The learning-rate schedule stays ours (a torch LambdaLR stepped here) under either engine.

Under pipeline parallelism each stage has its own engine over its own parameters; the schedule
calls `backward(output, grad)` once per micro-batch and virtual stage and `step()` once. DeepSpeed
(ZeRO-1/2) counts those backwards as its gradient accumulation steps and sums the gradient norm
over the stages through the pp group, which the mpu hands it as the model-parallel group.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from seqpar import checkpoint
from seqpar.parallel.dims import ParallelDims

DEFAULT_ZERO_STAGE = 2
# keys of the generated DeepSpeed config that seqpar derives from its own settings: a pass-through
# value would silently disagree with the loop (batch split), train.grad_clip or parallel.zero_stage
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (dp * train.micro_batch_size)",
    "gradient_clipping": "train.grad_clip", "optimizer": "train.lr/beta1/beta2/weight_decay",
    "scheduler": "train.warmup_steps/min_lr_ratio", "fp16": "train.dtype", "bf16": "train.dtype",
    "torch_autocast": "train.dtype",
}


def build_engine(model, optimizer, scheduler, cfg, dims: ParallelDims):
    if cfg.parallel.dp_engine == "deepspeed":
        return DeepSpeedEngine(model, optimizer, scheduler, cfg, dims)
    return FSDP2Engine(model, optimizer, scheduler, cfg, dims)


def allocate_adam_states(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam(W)'s moments now, as its first step would (zeros, step 0): torch allocates them
    lazily, so the first step's forward and backward run without them and a run that does not fit
    would pass step 1 and run out of memory in step 2. Allocated up front, the first step's peak is
    every step's peak (what `seqpar.memory` predicts and `bench maxlen` measures in one step)."""
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for group in optimizer.param_groups:
        if group.get("capturable") or group.get("fused") or group.get("amsgrad"):
            return  # their states differ (device step, max moments): left to torch's own lazy init
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.tensor(0.0, dtype=scalar),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


class FSDP2Engine:
    """`model` already went through `parallelize` (fully_shard over dp_cp when it has > 1 rank)."""

    def __init__(self, model, optimizer, scheduler, cfg, dims: ParallelDims):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip, self.dims = cfg.train.grad_clip, dims
        allocate_adam_states(optimizer)

    def backward(self, loss: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """`loss.backward()`; on a pipeline stage before the last, `grad` is d(loss)/d(output)."""
        torch.autograd.backward(loss, grad)

    def step(self) -> float:
        """Clip, step the optimizer and the schedule, clear gradients; returns the global grad norm."""
        norm = clip_gradients(self.model, self.grad_clip, self.dims)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, root: Path, step: int, extra: dict, *, keep: int) -> Path:
        return checkpoint.save(root, step, self.model, self.optimizer, extra, keep=keep)

    def load(self, path: Path) -> dict:
        return checkpoint.load(path, self.model, self.optimizer)


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stage `parallel.zero_stage`) over our dp_cp group, handed over as an `mpu`."""

    def __init__(self, model, optimizer, scheduler, cfg, dims: ParallelDims):
        import deepspeed

        # on CPU, DeepSpeed's first init JIT-compiles a shared-memory all-reduce (100 s on a fresh machine)
        # that only its inference_all_reduce uses; ZeRO's collectives go through torch.distributed groups
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.scheduler = scheduler
        # the scheduler is not given to DeepSpeed: it is stepped in step() and saved with the extra
        # state, like under FSDP2, so both engines resume it the same way
        self.model, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, dims),
                                              mpu=_DataParallelUnit(dims))

    def backward(self, loss: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        if grad is not None:
            # a pipeline stage's output and its gradient from the next stage: DeepSpeed's backward
            # takes a scalar, and d/dy sum(y * dy) is exactly dy
            loss = (loss * grad).sum()
        # train_step already scaled the loss to a mean over the global batch's tokens
        self.model.backward(loss, scale_wrt_gas=False)
        if not self.model.is_gradient_accumulation_boundary():
            # DeepSpeed counts micro-batches in step(): off the boundary it only advances that count,
            # so that the last micro-batch's backward reduces the gradients and step() updates
            self.model.step()

    def step(self) -> float:
        if not self.model.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed is not at its gradient accumulation boundary: train_step ran a different "
                               "number of micro-batches than the generated gradient_accumulation_steps")
        self.model.step()  # clip to gradient_clipping, optimizer step, zero grads
        self.scheduler.step()
        return float(self.model.get_global_grad_norm())

    def save(self, root: Path, step: int, extra: dict, *, keep: int) -> Path:
        def write(tmp: Path) -> None:
            self.model.save_checkpoint(str(tmp), tag=checkpoint.DEEPSPEED, save_latest=False)
            checkpoint.fsync_tree(tmp / checkpoint.DEEPSPEED)

        return checkpoint.save_state(root, step, write, extra, keep=keep)

    def load(self, path: Path) -> dict:
        def read(path: Path) -> None:
            loaded, _ = self.model.load_checkpoint(str(path), tag=checkpoint.DEEPSPEED, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
            if loaded is None:
                raise RuntimeError(f"DeepSpeed found no loadable state under {path / checkpoint.DEEPSPEED}")

        return checkpoint.load_state(path, read, engine="deepspeed")


def deepspeed_config(cfg, dims: ParallelDims) -> dict:
    """The DeepSpeed config for this job: derived from seqpar's settings, then `parallel.deepspeed`
    merged over it (validation keeps that block off the keys seqpar owns)."""
    from omegaconf import OmegaConf

    from seqpar.config import use_cuda

    t = cfg.train
    # one backward per micro-batch and per virtual pipeline stage: an interleaved stage runs V of them
    micro_steps = t.global_batch_size // (dims.dp * t.micro_batch_size) * (cfg.parallel.virtual_stages if dims.pp > 1 else 1)
    generated = {
        # DeepSpeed counts the dp_cp group as data parallel, so its "batch" counts each sample cp times
        "train_batch_size": t.micro_batch_size * micro_steps * dims.dp * dims.cp,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": micro_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage or DEFAULT_ZERO_STAGE},
        "zero_allow_untested_optimizer": True,  # our torch AdamW, so that both engines run the same update
        "steps_per_print": 1 << 30,  # metrics.py logs; DeepSpeed's own step lines would interleave
    }
    if use_cuda(cfg) and t.dtype in ("auto", "bf16"):
        # the engine turns an outer autocast off inside its forward: without this the model runs in
        # fp32 there (and attention on fp32 falls back to the S x S reference). No module is marked
        # lower-precision-safe, so gradients are still reduced in fp32, as under FSDP2.
        generated["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return _merge(generated, OmegaConf.to_container(cfg.parallel.deepspeed, resolve=True) or {})


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _DataParallelUnit:
    """The `mpu` DeepSpeed asks for its groups: data parallel = our dp_cp group; model parallel =
    the pipeline stages (validation keeps tp at 1). DeepSpeed sums the gradient norm over the model
    parallel group (stages hold different parameters) and names checkpoint files by its rank, so
    that every stage writes its own."""

    def __init__(self, dims: ParallelDims):
        self._dp, self._pp, self._tp = dims.group("dp_cp"), dims.group("pp"), dims.group("tp")  # tp: size 1

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self._dp)

    def get_data_parallel_rank(self):
        return dist.get_rank(self._dp)

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self._dp)

    def get_model_parallel_group(self):
        return self._pp

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self._pp)

    def get_model_parallel_rank(self):
        return dist.get_rank(self._pp)

    get_pipeline_model_parallel_group = get_model_parallel_group
    get_pipeline_model_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_group(self):
        return self._tp

    def get_tensor_model_parallel_world_size(self):
        return 1

    def get_tensor_model_parallel_rank(self):
        return 0

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_rank()


def clip_gradients(model, max_norm: float, dims: ParallelDims) -> float:
    """Clip to `max_norm` (0: only measure) and return the global gradient norm.

    Parameters may be DTensors on different meshes (FSDP's dp x cp, and dp x cp x tp under tensor
    parallelism), which one foreach norm cannot mix: each mesh's norm is made whole, then combined,
    then summed over pipeline stages, which hold different parameters."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    by_mesh = defaultdict(list)
    for g in grads:
        by_mesh[getattr(g, "device_mesh", None)].append(g)
    norms = [torch.nn.utils.get_total_norm(group) for group in by_mesh.values()]
    local = torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms])
    square = (local.double() ** 2).sum()
    if dims.pp > 1:
        dist.all_reduce(square, group=dims.group("pp"))
    total = float(square.sqrt())
    if max_norm > 0 and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(coef)
    return total
