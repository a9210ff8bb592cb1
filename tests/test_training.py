"""End to end: the parallel runs reproduce the single-process run; resume is exact."""
import gc
import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_distributed

# lr 3e-4: Adam turns sign flips of near-zero fp32 gradient entries (summed in another order by
# each layout) into lr-sized steps; at 1e-3 that alone moved the 5th loss by ~1e-5 relative, while
# the one-step fp64 gradients below agree to 1e-15
COMMON = ["train.device=cpu", "train.dtype=fp32", "data.seq_len=64", "train.global_batch_size=4",
          "train.micro_batch_size=1", "train.warmup_steps=2", "train.lr=3e-4", "logging.console=false"]
LAYOUTS = {  # name: (processes, overrides)
    "single": (1, ["parallel.cp=1"]),
    "cp2": (2, ["parallel.cp=2"]),
    "dp2": (2, ["parallel.cp=1"]),
    "cp2_dp2": (4, ["parallel.cp=2", "parallel.dp=2"]),
    "cp2_contiguous": (2, ["parallel.cp=2", "parallel.layout=contiguous"]),
    "cp2_lasp1": (2, ["parallel.cp=2", "parallel.linear_sp=lasp1"]),
    "tp2": (2, ["parallel.cp=1", "parallel.tp=2"]),
    "tp2_no_sp": (2, ["parallel.cp=1", "parallel.tp=2", "parallel.tp_sequence_parallel=false"]),
    "cp2_tp2": (4, ["parallel.cp=2", "parallel.tp=2"]),
    "dp2_tp2": (4, ["parallel.cp=1", "parallel.dp=2", "parallel.tp=2"]),
    "pp2": (2, ["parallel.cp=1", "parallel.pp=2"]),
    "pp2_cp2": (4, ["parallel.cp=2", "parallel.pp=2"]),
    # interleaved 1F1B: 4 virtual stages of one layer each, micro-batches crossing each rank twice
    "pp2_v2": (2, ["parallel.cp=1", "parallel.pp=2", "parallel.virtual_stages=2"]),
    "pp2_v2_cp2": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.virtual_stages=2"]),
    # as many micro-batches as stages: the schedule's all-warm-up branch
    "pp2_v2_mb2": (2, ["parallel.cp=1", "parallel.pp=2", "parallel.virtual_stages=2", "train.micro_batch_size=2"]),
    # the vocabulary-parallel embedding and loss on different stages, with interleaving
    "pp2_v2_tp2": (4, ["parallel.cp=1", "parallel.pp=2", "parallel.virtual_stages=2", "parallel.tp=2"]),
    "cp2_ring": (2, ["parallel.cp=2", "parallel.softmax_sp=ring"]),
    "cp2_ulysses": (2, ["parallel.cp=2", "parallel.softmax_sp=ulysses"]),
    "cp2_disagg": (2, ["parallel.cp=2", "parallel.softmax_sp=disagg"]),
    # the two dp ranks' rows joined into one row whose attention work disagg balances across them
    "dp2_disagg": (2, ["parallel.cp=1", "parallel.softmax_sp=disagg", "parallel.disagg.group=dp_cp"]),
    "cp2_dp2_disagg": (4, ["parallel.cp=2", "parallel.dp=2", "parallel.layout=contiguous", "parallel.softmax_sp=disagg",
                           "parallel.disagg.group=dp_cp"]),
    # a tp group serves as one server holding its heads; each pipeline stage balances its own layers
    "cp2_tp2_disagg": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.softmax_sp=disagg"]),
    "dp2_tp2_disagg": (4, ["parallel.cp=1", "parallel.dp=2", "parallel.tp=2", "parallel.softmax_sp=disagg",
                           "parallel.disagg.group=dp_cp"]),
    "pp2_cp2_disagg": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.softmax_sp=disagg"]),
    # memory modes: recomputation and chunking must not change a number
    "cp2_selective_mlp_chunks": (2, ["parallel.cp=2", "train.activation_checkpointing=selective",
                                     "train.mlp_chunk_tokens=12"]),
    "dp2_full_offload": (2, ["parallel.cp=1", "train.activation_checkpointing=full", "train.offload_activations=true"]),
    # AdamW's moments in host memory: DTensors over host-memory shards under FSDP2
    "cp2_offload_optimizer": (2, ["parallel.cp=2", "train.offload_optimizer=true"]),
    "cp2_tp2_selective": (4, ["parallel.cp=2", "parallel.tp=2", "train.activation_checkpointing=selective"]),
    # DeepSpeed ZeRO as the dp engine, over dp x cp like FSDP2
    "dp2_zero1": (2, ["parallel.cp=1", "parallel.dp_engine=deepspeed", "parallel.zero_stage=1"]),
    "dp2_zero2": (2, ["parallel.cp=1", "parallel.dp_engine=deepspeed", "parallel.zero_stage=2"]),
    "dp2_zero3": (2, ["parallel.cp=1", "parallel.dp_engine=deepspeed", "parallel.zero_stage=3"]),
    "cp2_zero2": (2, ["parallel.cp=2", "parallel.dp_engine=deepspeed", "parallel.zero_stage=2"]),
    # DeepSpeed under our 1F1B: one engine per stage, a backward per micro-batch (and virtual stage)
    "pp2_zero1": (2, ["parallel.cp=1", "parallel.pp=2", "parallel.dp_engine=deepspeed", "parallel.zero_stage=1"]),
    "pp2_dp2_zero2": (4, ["parallel.cp=1", "parallel.dp=2", "parallel.pp=2", "parallel.dp_engine=deepspeed",
                          "parallel.zero_stage=2"]),
    "pp2_v2_cp2_zero2": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.virtual_stages=2",
                             "parallel.dp_engine=deepspeed", "parallel.zero_stage=2"]),
}


def train(run_dir, nproc, *overrides, steps=5):
    cmd = [sys.executable, "-m", "seqpar.train", *COMMON, f"train.steps={steps}", f"launcher.nproc_per_node={nproc}",
           f"run_dir={run_dir}", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("single")


@pytest.fixture(scope="module")
def single_run(single_dir):
    # step 3 profiled: the profiler observes, so the losses stay the reference of every layout
    return train(single_dir, *LAYOUTS["single"][:1], *LAYOUTS["single"][1], "logging.profile_step=3")


def test_profile_step_writes_the_ops_of_that_step(single_run, single_dir):
    tables = sorted(p.name for p in (single_dir / "profile").iterdir())
    assert tables == ["step3_rank0.txt"]
    table = (single_dir / "profile" / tables[0]).read_text()
    assert "Self CPU" in table and "aten::mm" in table  # the step's matmuls, by op


def test_metrics_file_has_one_object_per_step(single_run):
    assert [m["step"] for m in single_run] == [1, 2, 3, 4, 5]
    for m in single_run:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "step_time_s"} <= m.keys()
    assert single_run[-1]["tokens"] == 5 * 4 * 64
    # the first step also says how long the run took to get there (model, optimizer states, resume)
    assert single_run[0]["startup_s"] > 0 and not any("startup_s" in m for m in single_run[1:])


LOSS_LAYOUTS = ["cp2", "dp2", "cp2_dp2", "cp2_contiguous", "cp2_lasp1", "tp2", "cp2_tp2", "dp2_tp2", "pp2", "pp2_v2",
                "pp2_v2_mb2", "cp2_ring", "cp2_ulysses", "cp2_disagg", "dp2_disagg", "cp2_dp2_disagg",
                "cp2_tp2_disagg", "dp2_tp2_disagg", "pp2_cp2_disagg",
                "cp2_selective_mlp_chunks", "dp2_full_offload", "cp2_offload_optimizer", "dp2_zero1", "dp2_zero2", "dp2_zero3", "cp2_zero2", "pp2_zero1", "pp2_dp2_zero2"]
GRAD_LAYOUTS = ["cp2", "dp2", "cp2_dp2", "tp2", "tp2_no_sp", "cp2_tp2", "dp2_tp2", "pp2", "pp2_cp2", "pp2_v2", "pp2_v2_cp2", "pp2_v2_tp2",
                "cp2_selective_mlp_chunks", "dp2_full_offload", "cp2_tp2_selective", "dp2_disagg",
                "dp2_zero1", "dp2_zero2", "dp2_zero3", "cp2_zero2", "pp2_zero1", "pp2_v2_cp2_zero2"]


def _compose(*overrides):
    from hydra import compose, initialize_config_module
    from seqpar.config import register_configs

    register_configs()
    with initialize_config_module(config_module="seqpar.conf", version_base=None):
        return compose(config_name="train", overrides=[*COMMON, *overrides])


def _train_each(rank, world, runs):
    """Train every (run_dir, overrides) of `runs` in turn on the same ranks: one process start for
    many layouts (the CLI's multi-process launch is covered by the resume test)."""
    from seqpar.config import validate
    from seqpar.train import train

    for run_dir, overrides in runs:
        cfg = _compose("train.steps=5", f"run_dir={run_dir}", *overrides)
        validate(cfg, world)
        train(cfg, torch.device("cpu"))
        # one layout's FSDP modules (reference cycles) and their hooks go before the next builds its
        # groups, as run_worker's gc.collect does before its group goes (a CI run once aborted here in
        # malloc, "unaligned tcache chunk", in the middle of the 2-process layouts)
        gc.collect()


@pytest.mark.parametrize("nproc", [2, 4])
def test_parallel_losses_match_single_process(nproc, single_run, tmp_path):
    names = [name for name in LOSS_LAYOUTS if LAYOUTS[name][0] == nproc]
    run_distributed(_train_each, nproc, [(tmp_path / name, LAYOUTS[name][1]) for name in names])
    expected = [m["loss"] for m in single_run]
    for name in names:
        logged = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in logged]
        for got, want in zip(losses, expected, strict=True):
            assert abs(got - want) <= 1e-5 * abs(want), (name, losses, expected)
        if "disagg" in name and "pp" not in name:  # rank 0's waits and their spread (under pp rank 0's
            # stage holds tiny_hybrid's linear layers only: no disagg call, no sp/ keys)
            assert all(m["sp/exposed_comm_ms_min"] <= m["sp/exposed_comm_ms"] <= m["sp/exposed_comm_ms_max"]
                       for m in logged), (name, logged)


def _one_step_grads(rank, world, variants):
    """(loss, {name: full gradient}) after one fp64 step, for each list of overrides in `variants`."""
    from seqpar.data import PackedLoader, build_dataset
    from seqpar.model.transformer import canonical_name
    from seqpar.parallel.dims import ParallelDims
    from seqpar.parallel.engine import build_engine
    from seqpar.train import build_model, build_optimizer, train_step

    results = []
    for overrides in variants:
        cfg = _compose("train.dtype=fp64", "run_dir=unused", *overrides)
        dims = ParallelDims.from_config(cfg.parallel, world)
        dims.build_mesh("cpu")
        model = build_model(cfg, dims, torch.device("cpu"))
        engine = build_engine(model, *build_optimizer(model, cfg, torch.device("cpu")), cfg, dims)
        loader = PackedLoader(build_dataset(cfg.data, cfg.data.seq_len), global_batch_size=4, micro_batch_size=1,
                              dp_rank=dims.rank_in("dp"), dp_size=dims.dp, seed=0)
        stats = train_step(engine.model, loader.next_batch(), cfg, dims, torch.device("cpu"), backward=engine.backward)
        if cfg.parallel.dp_engine == "deepspeed":
            from deepspeed.utils import safe_get_full_grad  # ZeRO 2/3 partition gradients; this gathers them

            grads = {canonical_name(n): safe_get_full_grad(p) for n, p in model.named_parameters()}
        else:
            grads = {canonical_name(n): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                     for n, p in model.named_parameters()}
        results.append((stats["loss"], grads))
    return results


def _attention_groups(rank, world):
    import os

    import torch.distributed as dist

    from seqpar.parallel.dims import ParallelDims

    out = []
    # cp2_dp2 with disagg over cp: the same four ranks, disagg balancing inside each cp pair
    over_cp = [*LAYOUTS["cp2_dp2_disagg"][1][:-1], "parallel.disagg.group=cp"]
    for shared in ("0", "1"):
        os.environ["SEQPAR_DISAGG_SHARED_GROUP"] = shared
        for overrides in (LAYOUTS["cp2_dp2_disagg"][1], LAYOUTS["cp2_ring"][1], over_cp):
            dims = ParallelDims.from_config(_compose("run_dir=unused", *overrides).parallel, world)
            dims.build_mesh("cpu")
            attn, balanced = dims.group("attn"), dims.group("dp_cp" if dims.attention_dp_cp else "cp")
            out.append((shared, dims.attention_dp_cp, attn is balanced, dist.get_process_group_ranks(attn),
                        dist.get_process_group_ranks(balanced)))
    from seqpar.parallel.dims import attention_comm_options
    return out, attention_comm_options()


def test_disagg_gets_its_own_communicator():
    """Disagg's all-to-alls do not queue behind FSDP's collectives (over dp_cp) or LASP-2's (over cp)
    on one communicator (unless SEQPAR_DISAGG_SHARED_GROUP=1); other layouts build no extra group."""
    for rank, (rank_results, options) in enumerate(run_distributed(_attention_groups, 4)):
        assert options is None  # gloo: no stream priority to set (NCCL's: test_disagg's GPU test)
        (_, joined, same, attn, dp_cp), (_, ring_joined, ring_same, _, _), \
            (_, cp_joined, cp_same, cp_attn, cp), *shared_runs = rank_results
        assert joined and not same and attn == dp_cp == [0, 1, 2, 3]
        assert not ring_joined and ring_same
        assert not cp_joined and not cp_same and cp_attn == cp == ([0, 1] if rank < 2 else [2, 3])
        assert shared_runs[0][2] and shared_runs[2][2]  # the A/B switch: dp_cp's (cp's) group itself


@pytest.mark.parametrize("nproc", [2, 4])
def test_parallel_gradients_match_single_process(nproc):
    (ref_loss, ref_grads), = run_distributed(_one_step_grads, 1, [LAYOUTS["single"][1]])[0]
    names = [name for name in GRAD_LAYOUTS if LAYOUTS[name][0] == nproc]
    per_rank = run_distributed(_one_step_grads, nproc, [LAYOUTS[name][1] for name in names])
    for i, name in enumerate(names):
        seen = set()
        for rank_results in per_rank:
            loss, grads = rank_results[i]
            assert abs(loss - ref_loss) < 1e-12, name
            seen |= grads.keys()  # a pipeline stage holds only its own parameters
            for param, g in grads.items():
                if "zero" in name:
                    # ZeRO reduces and keeps gradients in fp32 flat buffers whatever the parameters' dtype:
                    # measured error 1.5e-7 of the tensor's largest entry; a wrong reduction is off by far more
                    err = (g.double() - ref_grads[param]).abs().max() / ref_grads[param].abs().max()
                    assert err < 1e-6, (name, param, float(err))
                else:
                    assert torch.allclose(g, ref_grads[param], rtol=1e-9, atol=1e-12), (name, param)
        assert seen == ref_grads.keys(), name


# cp2_tp2: FSDP over cp and 2D DTensors over tp in one checkpoint; dp2_zero3: DeepSpeed's own
# checkpoint of partitioned parameters and optimizer state, inside our atomic folder;
# cp2_offload_optimizer: moments as DTensors over host-memory shards, loaded into those same tensors
@pytest.mark.parametrize("layout", ["cp2_tp2", "dp2_zero3", "cp2_offload_optimizer"])
def test_resume_continues_bitwise(tmp_path, layout):
    nproc, overrides = LAYOUTS[layout]
    straight = tmp_path / "straight"
    full = train(straight, nproc, *overrides, "train.checkpoint_every=3", steps=6)
    # the same run stopped after step 3: its step-3 checkpoint and first 3 metric lines
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    assert (resumed / "checkpoints" / "step_00000003" / "deepspeed").is_dir() == ("zero" in layout)
    lines = (resumed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (resumed / "metrics.jsonl").write_text("".join(lines[:3]))
    again = train(resumed, nproc, *overrides, "train.checkpoint_every=3", steps=6)
    assert [m["step"] for m in again] == list(range(1, 7))
    assert [m["loss"] for m in again[3:]] == [m["loss"] for m in full[3:]]
    assert [m["grad_norm"] for m in again[3:]] == [m["grad_norm"] for m in full[3:]]


def test_attention_rows_bound_a_disagg_servers_rows():
    """train.cudnn_prebuild tunes the Triton kernel up to `attention_rows`: a micro-batch's sequence,
    or under disagg over dp_cp the whole group's (a server may take every rank's work)."""
    from seqpar.parallel.dims import ParallelDims
    from seqpar.train import attention_rows

    got = {}
    for name in ("dp2", "cp2_ring", "cp2_disagg", "dp2_disagg", "cp2_dp2_disagg"):
        world, overrides = LAYOUTS[name]
        cfg = _compose("run_dir=unused", "train.micro_batch_size=2", *overrides)
        got[name] = attention_rows(cfg, ParallelDims.from_config(cfg.parallel, world)) / cfg.data.seq_len
    assert got == {"dp2": 2, "cp2_ring": 2, "cp2_disagg": 2, "dp2_disagg": 4, "cp2_dp2_disagg": 4}
