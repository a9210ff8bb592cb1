"""Bad configurations stop before any worker starts, with a message naming key, value and rule."""
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module

from seqpar.config import ConfigError, register_configs, validate


def make_cfg(*overrides):
    register_configs()
    with initialize_config_module(config_module="seqpar.conf", version_base=None):
        return compose(config_name="train", overrides=["train.device=cpu", *overrides])


def test_default_config_is_valid_for_two_processes():
    cfg = make_cfg()
    validate(cfg, world=2)
    assert cfg.parallel.cp == 2 and cfg.model.name == "tiny_hybrid"


BAD = [
    (["parallel.cp=3"], 2, "parallel.pp*cp*tp=3 does not divide the world size 2"),
    (["parallel.dp=2", "parallel.cp=2"], 2, "must equal the world size 2"),
    (["parallel.cp=4", "parallel.dp=1", "data.seq_len=1004"], 4, "data.seq_len=1004 must be divisible into 8"),
    (["parallel.cp=3", "parallel.dp=1", "parallel.layout=contiguous", "data.seq_len=100"], 3, "data.seq_len=100"),
    (["model.n_heads=6", "model.n_kv_heads=4"], 2, "model.n_kv_heads=4: must divide model.n_heads=6"),
    (["model.layer_pattern=LLXS"], 2, "model.layer_pattern='LLXS': unknown layer type ['X']"),
    (["data=token_file", "data.path=/nonexistent/ds"], 2, "data.path=/nonexistent/ds: no tokens.bin"),
    (["train.lr=-0.001"], 2, "train.lr=-0.001: must be > 0"),
    (["train.device=cpu", "logging.memory_snapshot=true"], 2, "logging.memory_snapshot=true records CUDA allocations"),
    (["train.steps=30", "logging.profile_step=31"], 2, "logging.profile_step=31: choose a step of the run (1..train.steps=30)"),
    (["train.global_batch_size=6"], 2, "train.global_batch_size=6 must be a positive multiple"),
    (["parallel.softmax_sp=warp"], 2, "parallel.softmax_sp='warp'"),
    (["parallel.ulysses_degree=2"], 2, "parallel.ulysses_degree=2 only applies to parallel.softmax_sp=usp"),
    (["parallel.softmax_sp=usp", "parallel.ulysses_degree=3"], 2, "parallel.ulysses_degree=3 must divide parallel.cp=2"),
    (["parallel.softmax_sp=ulysses", "parallel.cp=8", "parallel.dp=1"], 8,
     "splits attention heads over parallel.cp=8: it must divide model.n_heads=4"),
    (["parallel.linear_sp=lasp9"], 2, "parallel.linear_sp='lasp9'"),
    (["parallel.linear_scan=telepathy"], 2, "parallel.linear_scan='telepathy'"),
    (["parallel.linear_sp=lasp1", "parallel.linear_scan=pipelined"], 2, "applies to parallel.linear_sp=lasp2"),
    (["parallel.layout=spiral"], 2, "parallel.layout='spiral'"),
    (["parallel.pp=2", "parallel.cp=1", "parallel.pp_layers=[1,2]"], 2, "parallel.pp_layers=[1, 2]: needs parallel.pp x parallel.virtual_stages = 2"),
    (["parallel.pp=2", "parallel.cp=1", "parallel.virtual_stages=2", "train.global_batch_size=6",
      "train.micro_batch_size=2"], 2,
     "3 micro-batches is not a multiple of it"),
    (["parallel.virtual_stages=2"], 2, "parallel.virtual_stages=2: must be >= 1, and > 1 only with parallel.pp > 1"),
    (["parallel.pp=2", "parallel.cp=1", "parallel.virtual_stages=3"], 2, "parallel.pp x parallel.virtual_stages = 2 x 3"),
    (["parallel.pp=8", "parallel.cp=1"], 8, "parallel.pp=8: more pipeline stages than model.n_layers=4"),
    (["parallel.pp=2", "parallel.cp=1", "model.tie_embeddings=true"], 2, "model.tie_embeddings=true with parallel.pp>1"),
    (["parallel.tp=4", "parallel.cp=1", "model.n_kv_heads=2"], 4, "parallel.tp=4 splits model.n_kv_heads=2"),
    (["parallel.tp=4", "parallel.cp=1", "model.n_kv_heads=4", "data.seq_len=66"], 4,
     "data.seq_len=66 must be divisible by cp*tp=4"),
    (["model.d_model=130"], 2, "model.d_model=130 is not divisible by model.n_heads=4"),
    (["model.vocab_size=200"], 2, "model.vocab_size=200"),
    (["train.warmup_steps=500"], 2, "train.warmup_steps=500"),
    (["train.dtype=bf16"], 2, "train.dtype=bf16 needs CUDA"),
    (["train.resume=/nonexistent/ckpt"], 2, "train.resume=/nonexistent/ckpt"),
    (["train.grad_clip=-1"], 2, "train.grad_clip=-1"),
    (["launcher.nproc_per_node=many"], None, "launcher.nproc_per_node='many'"),
    (["data=synthetic", "data.distribution=file", "data.lengths_file=/nope.json"], 2, "data.lengths_file=/nope.json"),
    (["parallel.cp=1", "data.read_as_rank=2"], 2, "data.read_as_rank=2: must be a data-parallel rank, 0..1"),
    (["parallel.dp_engine=megatron"], 2, "parallel.dp_engine='megatron': choose fsdp2 or deepspeed"),
    (["parallel.dp_engine=deepspeed", "parallel.zero_stage=4"], 2, "parallel.zero_stage=4: DeepSpeed ZeRO stages are 1, 2 or 3"),
    (["parallel.zero_stage=2"], 2, "parallel.zero_stage only applies to parallel.dp_engine=deepspeed"),
    (["+parallel.deepspeed.wall_clock_breakdown=true"], 2, "parallel.deepspeed only applies to parallel.dp_engine=deepspeed"),
    (["parallel.dp_engine=deepspeed", "parallel.tp=2", "parallel.cp=1"], 2,
     "parallel.dp_engine=deepspeed with parallel.tp=2: seqpar's tensor parallelism shards parameters as DTensors"),
    (["parallel.dp_engine=deepspeed", "parallel.pp=2", "parallel.cp=1", "parallel.zero_stage=3"], 2,
     "parallel.zero_stage=3 with parallel.pp=2"),
    (["parallel.dp_engine=deepspeed", "+parallel.deepspeed.gradient_clipping=0.5"], 2,
     "parallel.deepspeed.gradient_clipping: seqpar sets it from train.grad_clip"),
    (["parallel.dp_engine=deepspeed", "+parallel.deepspeed.zero_optimization.stage=3"], 2,
     "parallel.deepspeed.zero_optimization.stage: seqpar sets it from parallel.zero_stage"),
]


@pytest.mark.parametrize("overrides,world,message", BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_bad_config_is_rejected_with_key_value_rule(overrides, world, message):
    cfg = make_cfg(*overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world=world)
    assert message in str(e.value)


def test_unknown_key_is_rejected_by_the_schema():
    with pytest.raises(Exception, match="parallel.cpp"):
        make_cfg("parallel.cpp=2")


def test_wrong_type_is_rejected_by_the_schema():
    with pytest.raises(Exception, match="parallel.cp"):
        make_cfg("parallel.cp=two")


def test_cli_fails_before_starting_workers(tmp_path):
    r = subprocess.run([sys.executable, "-m", "seqpar.train", "train.device=cpu", "parallel.cp=3", f"run_dir={tmp_path}/r"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "parallel.pp*cp*tp=3 does not divide the world size 2" in r.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_dry_run_prints_resolved_config(tmp_path):
    r = subprocess.run([sys.executable, "-m", "seqpar.train", "train.device=cpu", "dry_run=true", f"run_dir={tmp_path}/r"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "layer_pattern: LLLS" in r.stdout and "ParallelDims(dp=1, cp=2, tp=1, pp=1, world_size=2" in r.stdout


def test_deepspeed_block_is_merged_over_the_generated_config():
    from seqpar.parallel.dims import ParallelDims
    from seqpar.parallel.engine import deepspeed_config

    cfg = make_cfg("parallel.dp_engine=deepspeed", "parallel.zero_stage=3", "train.grad_clip=0.5",
                   "train.global_batch_size=8", "train.micro_batch_size=2",
                   "+parallel.deepspeed.zero_optimization.overlap_comm=false", "+parallel.deepspeed.wall_clock_breakdown=true")
    validate(cfg, world=4)
    ds = deepspeed_config(cfg, ParallelDims(dp=2, cp=2, tp=1, pp=1, world_size=4))
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": False}  # merged, not replaced
    assert ds["wall_clock_breakdown"] is True and ds["gradient_clipping"] == 0.5
    # 8 sequences over dp=2 in micro-batches of 2: 2 accumulation steps; DeepSpeed counts cp ranks as dp
    assert (ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (2, 2, 16)
    assert "torch_autocast" not in ds  # fp32 on the CPU
    # on CUDA in bf16 the engine's forward runs under torch's autocast, gradients reduced in fp32
    cuda = deepspeed_config(make_cfg("parallel.dp_engine=deepspeed", "train.device=cuda"),
                            ParallelDims(dp=2, cp=1, tp=1, pp=1, world_size=2))
    assert cuda["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
