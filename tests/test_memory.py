"""The memory estimate against hand-computed cases, and the "will not fit" message."""
import json
import math
import re

import pytest

from seqpar import memory
from seqpar.memory import GiB, estimate, fit_error

# tiny_hybrid (LLLS, d 128, 4 heads / 2 kv heads of 32, ffn 384, vocab 288), counted by hand:
#   norms 2*128; MLP 3*128*384 = 147456; softmax attention 128*(128+64+64) + 128*128 = 49152;
#   lightning attention 5*128*128 + out_norm 32 = 81952; embedding = output = 288*128 = 36864
L_LAYER, S_LAYER = 256 + 147456 + 81952, 256 + 147456 + 49152
TINY_PARAMS = 3 * L_LAYER + S_LAYER + 2 * 36864 + 128  # 959712


def _cfg(*overrides):
    from hydra import compose, initialize_config_module
    from seqpar.config import register_configs

    register_configs()
    with initialize_config_module(config_module="seqpar.conf", version_base=None):
        return compose(config_name="train", overrides=["train.device=cpu", "train.dtype=fp32", "run_dir=unused",
                                                       "train.global_batch_size=4", "train.micro_batch_size=1",
                                                       *overrides])


def test_tiny_params_match_the_model():
    from seqpar.model.transformer import Transformer

    assert TINY_PARAMS == 959712 == Transformer(_cfg("parallel.cp=1").model).num_params()


def test_params_grads_optimizer_sharded_over_dp_times_cp():
    est = estimate(_cfg("parallel.cp=2", "parallel.dp=2"), world=4)
    # every dim 0 (128, 64, 32, 384, 288) divides by dp*cp = 4: an exact quarter, fp32, two Adam moments
    assert est.params == est.grads == TINY_PARAMS // 4 * 4
    assert est.optimizer == 2 * TINY_PARAMS // 4 * 4
    fp64 = estimate(_cfg("parallel.cp=2", "parallel.dp=2", "train.dtype=fp64"), world=4)
    assert fp64.params == TINY_PARAMS // 4 * 8 and fp64.optimizer == 2 * TINY_PARAMS // 4 * 8


def test_uneven_shards_round_up_like_fsdp2():
    from seqpar.model.transformer import Transformer

    cfg = _cfg("parallel.cp=1", "parallel.dp=3", "train.global_batch_size=3")
    # FSDP2 splits dim 0 into ceil(rows/3)-row pieces; rank 0 holds a full piece of every parameter
    want = sum(math.ceil(p.shape[0] / 3) * (p.numel() // p.shape[0])
               for p in Transformer(cfg.model).parameters())
    assert estimate(cfg, world=3).params == 4 * want


def test_tp_splits_block_weights_and_pp_keeps_a_stage():
    linears = 3 * (147456 + 81920) + (147456 + 49152)  # every block weight but the norms (and out_norm)
    assert estimate(_cfg("parallel.cp=1", "parallel.tp=2"), world=2).params == 4 * (TINY_PARAMS - linears // 2)
    est = estimate(_cfg("parallel.cp=1", "parallel.pp=2", "parallel.pp_layers=[1,3]"), world=2)
    # the busiest stage is the last: layers 1-3, final norm and output head
    assert est.stage == 1 and est.params == 4 * (2 * L_LAYER + S_LAYER + 128 + 36864)


# a softmax-only model: d 64, 4 heads / 2 kv heads of 16, ffn 96; per token and layer, by hand (fp32):
#   attention half: norm input + rstd 4*65 = 260, the linears' shared input 4*64 = 256,
#                   flash q, o (4*64 each), k, v (4*32 each), lse 4*4: 784          -> 1300
#   MLP half:       norm 260, input 256, w1 x, silu, w3 x, product 4*4*96 = 1536    -> 2052
SMALL = ["model.layer_pattern=S", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=96",
         "model.n_layers=2", "parallel.cp=2", "parallel.softmax_sp=ring", "data.seq_len=256", "train.micro_batch_size=2"]
TOKENS = 2 * 256 // 2  # rows x seq_len / cp


@pytest.mark.parametrize("overrides,per_token", [
    ([], 1300 + 2052),
    (["train.activation_checkpointing=full"], 4 * 64),  # the block input only
    (["train.activation_checkpointing=full", "train.offload_activations=true"], 0),
    # attention without its norm, plus the inputs of three checkpoints (norm, norm, MLP)
    (["train.activation_checkpointing=selective"], 1300 - 260 + 3 * 256),
    (["train.activation_checkpointing=selective", "train.offload_activations=true"], 1300 - 260),
    # chunked MLP keeps its norm and its input; one chunk's 256 + 1536 per token is transient
    (["train.mlp_chunk_tokens=32"], 1300 + 260 + 256),
    # all-gather attention saves the key rows its queries see: with zigzag rank 0 sees the whole row
    (["parallel.softmax_sp=allgather"], 1300 + 2052 + 4 * 2 * 32 * (2 - 1)),
    (["parallel.softmax_sp=allgather", "parallel.layout=contiguous"], 1300 + 2052 + 4 * 2 * 32 * (2 - 1)),
])
def test_activations_per_layer(overrides, per_token):
    est = estimate(_cfg(*SMALL, *overrides), world=2)
    assert est.tokens == TOKENS
    assert est.per_layer == {"S": per_token * TOKENS}
    assert est.activations == 2 * per_token * TOKENS


def test_transients():
    chunked = estimate(_cfg(*SMALL, "train.mlp_chunk_tokens=32"), world=2)
    full = estimate(_cfg(*SMALL, "train.activation_checkpointing=full", "train.mlp_chunk_tokens=64"), world=2)
    fsdp = 4 * (288 * 64 * 2 + 2 * (2 * 64 + 64 * 192 + 3 * 64 * 96))  # root and two blocks unsharded
    ring = 2 * 2 * 32 * 4 * TOKENS  # the K/V block in use and the one arriving
    ce_chunk = TOKENS * 288 * (4 + 4)  # fp32 logits and their gradient
    mlp_chunk = (256 + 1536) * 2 * 32  # rows x chunk
    stream = 3 * 4 * 64 * TOKENS  # residual stream and its gradients in flight
    assert chunked.transient == max(ce_chunk, mlp_chunk) + stream + ring + fsdp
    # full: one block's none-level saves, recomputed in backward, plus its MLP chunk (here above ce_chunk)
    assert full.transient == (1300 + 260 + 256) * TOKENS + 2 * mlp_chunk + stream + ring + fsdp


def test_autocast_saves_bf16_copies(monkeypatch):
    import seqpar.config

    monkeypatch.setattr(seqpar.config, "use_cuda", lambda cfg: True)
    est = estimate(_cfg(*SMALL, "train.dtype=auto", "model.fp32_residual=true"), world=2)
    # fp32 residual: each linear keeps its own bf16 copy of its input (3 in attention, 2 in the MLP);
    # norms and the residual stream stay fp32
    attention = 260 + 3 * 2 * 64 + 2 * (2 * 64 + 2 * 32) + 4 * 4
    mlp = 260 + 2 * 2 * 64 + 2 * 4 * 96
    # and each linear saves the bf16 cast of its weight (no cast cache: every call casts anew):
    # wq, wo 64 x 64, wk, wv 32 x 64, w1, w3, w2 96 x 64, per layer whatever the tokens
    weights = 2 * ((2 * 64 + 2 * 32) * 64 + 3 * 96 * 64)
    assert est.per_layer == {"S": (attention + mlp) * TOKENS + weights}
    # bf16 residual (the default): a norm keeps its bf16 input and fp32 rstd, the linears after it
    # share its bf16 output
    est = estimate(_cfg(*SMALL, "train.dtype=auto"), world=2)
    attention = 2 * 64 + 4 + 2 * 64 + 2 * (2 * 64 + 2 * 32) + 4 * 4
    mlp = 2 * 64 + 4 + 2 * 64 + 2 * 4 * 96
    assert est.per_layer == {"S": (attention + mlp) * TOKENS + weights}


def test_fixed_allocations_on_cuda_only(monkeypatch):
    import seqpar.config

    cpu = estimate(_cfg(*SMALL), world=2)
    assert cpu.fixed == 0
    monkeypatch.setattr(seqpar.config, "use_cuda", lambda cfg: True)
    cuda = estimate(_cfg(*SMALL), world=2)
    # Triton's autotuner flushes L2 with a 256 MiB buffer; cuBLAS's Hopper workspace is 32 MiB
    assert cuda.fixed == (256 + 32) * 2**20
    assert cuda.total - cuda.fixed == cpu.total and cuda.fixed == (256 + 32) * 2**20
    assert re.search(r"fixed \(Triton autotune buffer, cuBLAS workspace\) +0\.281 GiB", cuda.table())
    assert f"fixed {cuda.fixed / GiB:.2f})" in fit_error(_cfg(*SMALL), 2, cuda, device_bytes=1000)


def test_deepspeed_reduce_bucket_is_fixed_memory(monkeypatch):
    import seqpar.config

    monkeypatch.setattr(seqpar.config, "use_cuda", lambda cfg: True)
    base = estimate(_cfg(*SMALL), world=2).fixed
    ds = ["parallel.dp_engine=deepspeed", "parallel.cp=1"]
    # DeepSpeed allocates reduce_bucket_size elements (default 5e8) whatever the model: fp32 params here
    for extra, bucket in ((["parallel.zero_stage=2"], 5 * 10**8 * 4), (["parallel.zero_stage=1"], 5 * 10**8 * 4),
                          (["parallel.zero_stage=3"], 0),
                          (["+parallel.deepspeed.zero_optimization.reduce_bucket_size=1000"], 1000 * 4),
                          (["+parallel.deepspeed.zero_optimization.overlap_comm=true"], 2 * 5 * 10**8 * 4),
                          (["+parallel.deepspeed.zero_optimization.contiguous_gradients=false"], 0)):
        est = estimate(_cfg(*SMALL, *ds, *extra), world=2)
        assert est.fixed - base == bucket, extra
        assert ("DeepSpeed reduce bucket" in est.table()) == (bucket > 0)


def test_will_not_fit_names_the_numbers_and_the_knobs():
    cfg = _cfg(*SMALL)
    est = estimate(cfg, world=2)
    assert fit_error(cfg, 2, est, device_bytes=10 * GiB) is None
    full = estimate(_cfg(*SMALL, "train.activation_checkpointing=full"), world=2).total
    # a device with room for full checkpointing but not for none
    device = int((full + est.total) / 2 / memory.MARGIN)
    msg = fit_error(cfg, 2, est, device_bytes=device)
    assert f"predicted {est.total_gb:.1f} GiB per GPU" in msg
    assert f"activations {est.activations / GiB:.1f}" in msg and f"{device / GiB:.1f} GiB" in msg
    assert "data.seq_len=256" in msg and "train.activation_checkpointing=none" in msg
    assert f"train.activation_checkpointing=full -> {full / GiB:.1f} GiB" in msg
    assert "parallel.cp=4 on 4 GPUs" in msg
    assert "no single knob" in fit_error(cfg, 2, est, device_bytes=1000)


@pytest.mark.parametrize("limit,start", [(40, 8), (40, 64), (40, 40), (8, 8), (7, 16), (1000, 24), (0, 16)])
def test_maxlen_search_finds_the_limit(limit, start):
    from seqpar.bench.maxlen import search

    tried = []
    fits = lambda n: tried.append(n) or n <= limit
    assert search(fits, start, step=8, max_len=64) == min(limit // 8 * 8, 64)
    assert all(n % 8 == 0 and 8 <= n <= 64 for n in tried)
    assert len(tried) == len(set(tried)) <= 7  # galloping and bisection never repeat a trial


def test_maxlen_smoke_writes_the_answer(tmp_path):
    from seqpar.bench.maxlen import main

    out = tmp_path / "maxlen.json"
    # one mode, one trial: the pretend capacity makes the estimate start at max_len, which fits
    assert main(["--smoke", "--modes", "selective_chunked", "--step", "64", "--max-len", "128", "--steps", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    row, = result["results"]
    assert row["mode"] == "selective_chunked" and row["max_seq_len"] == 128
    assert row["trials"][-1]["fits"] and row["trials"][-1]["tokens_per_s"] > 0
    assert row["tokens_per_s"] == row["trials"][-1]["tokens_per_s"]
    trial = row["trials"][-1]
    assert trial["wall_s"] >= trial["step_time_s"] + trial["startup_s"] and trial["startup_s"] > 0


def test_maxlen_keeps_each_trial_when_killed(tmp_path, monkeypatch):
    from seqpar.bench import maxlen

    out, seen = tmp_path / "maxlen.json", []

    def fake(base, mode, length, steps, timeout, log, world):  # the second trial never returns (killed)
        if seen:
            raise KeyboardInterrupt
        seen.append(length)
        log.append({"seq_len": length, "fits": False, "error": "out of memory"})

    monkeypatch.setattr(maxlen, "trial", fake)
    with pytest.raises(KeyboardInterrupt):
        maxlen.main(["--smoke", "--modes", "full", "--step", "64", "--max-len", "128", "--out", str(out)])
    row, = json.loads(out.read_text())["results"]
    assert row["unfinished"] and row["mode"] == "full" and row["trials"] == [
        {"seq_len": seen[0], "fits": False, "error": "out of memory"}]


def test_maxlen_timed_out_trial_says_where_it_was(monkeypatch, capsys):
    import subprocess

    from seqpar.bench import maxlen

    def slow(cmd, **kw):  # what run() raises after the kill: the output read so far, as bytes
        raise subprocess.TimeoutExpired(cmd, kw["timeout"], output=b"", stderr=b"memory: 55.3 GiB\nstep 1 started\n")

    monkeypatch.setattr(maxlen.subprocess, "run", slow)
    log = []
    assert maxlen.trial(maxlen.base_overrides("tiny_hybrid", 1), [], 256, 1, 5.0, log, 1) is None
    assert not log[0]["fits"] and log[0]["error"].startswith("timeout after 5 s; last output:")
    assert "step 1 started" in log[0]["error"] and json.loads(capsys.readouterr().out)["seq_len"] == 256


@pytest.mark.parametrize("overrides,message", [
    (["train.activation_checkpointing=some"], "train.activation_checkpointing='some': choose none, full or selective"),
    (["train.offload_activations=true"], "set train.activation_checkpointing=full or selective"),
    (["train.mlp_chunk_tokens=-1"], "train.mlp_chunk_tokens=-1: must be >= 0"),
    (["train.mlp_chunk_tokens=64", "parallel.tp=2", "parallel.cp=1"], "tp=1 or tp_sequence_parallel=false"),
    (["train.offload_optimizer=true", "parallel.dp_engine=deepspeed"],
     "+deepspeed.zero_optimization.offload_optimizer.device=cpu (and set train.offload_optimizer=false)"),
])
def test_memory_knobs_are_validated(overrides, message):
    from seqpar.config import ConfigError, validate

    validate(_cfg("parallel.cp=1", "train.activation_checkpointing=selective", "train.offload_activations=true",
                  "train.mlp_chunk_tokens=64"), world=2)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(_cfg("parallel.cp=2", *overrides), world=2)


def test_peak_is_the_larger_of_backward_and_optimizer_step():
    """Activations are consumed while gradients are made; the step's foreach temporaries come on
    top of all the states (what ran llama_8b out of memory on one H200 at any length)."""
    one = estimate(_cfg(*SMALL, "train.global_batch_size=2"), world=2)  # dp 1 x 2 rows: one micro-batch
    acc = estimate(_cfg(*SMALL), world=2)  # 8 rows: four micro-batches, gradients held from the first
    assert not one.accumulating and acc.accumulating
    held = one.params + one.optimizer + one.fixed
    assert 0 < one.head_grad < one.loss
    assert one.backward_peak == held + max(one.activations + one.loss,  # the backward's start
                                           one.activations + one.head_grad + one.transient,  # its first layer
                                           one.grads + one.transient)  # its end
    assert acc.backward_peak == acc.params + acc.optimizer + acc.fixed + acc.grads + max(
        acc.activations + acc.loss, acc.activations + acc.head_grad + acc.transient, acc.transient)
    # the sqrt of exp_avg_sq, one moment's size, at the step
    assert one.step_temporaries == one.params and one.step_peak == 5 * one.params + one.fixed
    big = estimate(_cfg("model=llama_8b", "parallel.cp=1", "data.seq_len=8192", "train.micro_batch_size=1",
                        "train.global_batch_size=1", "train.activation_checkpointing=full"), world=1)
    assert big.total == big.step_peak == 5 * big.params + big.fixed  # params, grads, 2 moments, 1 temporary
    assert "peak (optimizer step)" in big.table()


def test_offloaded_optimizer_leaves_buckets_in_flight():
    from seqpar.memory import OFFLOAD_BUCKETS_IN_FLIGHT, knobs_that_fit
    from seqpar.parallel.optim_offload import DEFAULT_BUCKET_NUMEL

    on_device = estimate(_cfg(*SMALL), world=2)
    offloaded = estimate(_cfg(*SMALL, "train.offload_optimizer=true"), world=2)
    assert on_device.optimizer == 2 * on_device.params  # fp32: two moments per parameter
    # a model smaller than three buckets: all its moments are in flight at the step's peak
    assert offloaded.optimizer == on_device.optimizer and OFFLOAD_BUCKETS_IN_FLIGHT * DEFAULT_BUCKET_NUMEL > 1e6
    big = estimate(_cfg("model=llama_8b", "parallel.cp=1", "data.seq_len=8192", "train.micro_batch_size=1",
                        "train.offload_optimizer=true"), world=1)
    assert big.optimizer == OFFLOAD_BUCKETS_IN_FLIGHT * 2 * 4 * DEFAULT_BUCKET_NUMEL
    assert "in flight from host" in big.table()
    # the knob is offered where the moments decide
    cfg = _cfg("model=llama_8b", "parallel.cp=1", "data.seq_len=8192", "train.micro_batch_size=1",
               "train.activation_checkpointing=full")
    est = estimate(cfg, world=1)
    capacity = est.total - est.optimizer // 2
    assert any(k.startswith("train.offload_optimizer=true ->") for k in knobs_that_fit(cfg, 1, capacity))


@pytest.mark.parametrize("foreach", [False, True])
def test_adam_states_allocated_up_front_change_nothing(foreach):
    """The FSDP2 engine creates AdamW's moments before step 1 (so step 1's peak is every step's);
    the steps that follow are bitwise those of torch's lazy initialisation."""
    import torch
    from seqpar.parallel.engine import allocate_adam_states

    def run(eager):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
        if eager:
            allocate_adam_states(opt)
            assert all(opt.state[p]["exp_avg"].shape == p.shape for p in model.parameters())
        for i in range(3):
            model(torch.randn(5, 8, generator=torch.Generator().manual_seed(i))).square().sum().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach() for p in model.parameters()], opt.state_dict()["state"]

    (lazy, lazy_state), (eager, eager_state) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(lazy, eager))
    assert all(torch.equal(lazy_state[i][k], eager_state[i][k]) for i in lazy_state for k in lazy_state[i])


def test_offered_knobs_pass_config_validation():
    """Under sequence-parallel TP the MLP may not be chunked (config validation refuses it), so the
    fit error must not offer it; every knob it offers starts."""
    from seqpar.config import validate
    from seqpar.memory import knobs_that_fit

    cfg = _cfg(*SMALL, "parallel.cp=1", "parallel.tp=2", "data.seq_len=65536", "train.mlp_chunk_tokens=0")
    est = estimate(cfg, world=2)
    knobs = knobs_that_fit(cfg, 2, est.total - 1)
    assert knobs and not any("mlp_chunk_tokens" in k for k in knobs)
    plain = _cfg(*SMALL, "parallel.cp=1", "parallel.tp=1", "data.seq_len=65536", "train.mlp_chunk_tokens=0")
    assert any("mlp_chunk_tokens" in k for k in knobs_that_fit(plain, 1, estimate(plain, world=1).total - 1))
    for knob in knobs:
        world = int(knob.split(" on ")[1].split()[0]) if " on " in knob else 2
        overrides = [kv for kv in knob.split(" -> ")[0].split(" on ")[0].split() if "=" in kv]
        validate(_cfg(*SMALL, "parallel.cp=1", "parallel.tp=2", "data.seq_len=65536", *overrides), world)


def test_split_attention_scratch_is_counted_where_attention_sees_whole_documents(monkeypatch):
    import seqpar.config
    from seqpar.kernels.flash_attn.split import max_doc_len, scratch_per_token
    from seqpar.memory import split_scratch

    monkeypatch.setattr(seqpar.config, "use_cuda", lambda cfg: True)
    monkeypatch.delenv("SEQPAR_CUDNN_DOC_MIN", raising=False)
    one = _cfg(*SMALL, "parallel.cp=1", "data.seq_len=8192", "train.dtype=auto")  # bf16 under autocast
    assert split_scratch(one) == 0  # 4 heads: only documents of 16k tokens or more would go to cuDNN
    monkeypatch.setenv("SEQPAR_CUDNN_DOC_MIN", "4096")  # the floor alone, as from 16 heads on
    assert split_scratch(one) == 8192 * scratch_per_token(4, 16, 2) == 8192 * 10 * 4 * 16 * 2
    monkeypatch.setenv("SEQPAR_CUDNN_SCRATCH_MB", "6")  # a document beyond the bound stays in the Triton call
    assert split_scratch(one) == max_doc_len(4, 16, 2) * scratch_per_token(4, 16, 2) == 4915 * 1280
    monkeypatch.setenv("SEQPAR_CUDNN_SCRATCH_MB", "3")  # the bound below the split's shortest document: none
    assert split_scratch(one) == 0
    monkeypatch.delenv("SEQPAR_CUDNN_SCRATCH_MB")
    with_split, ring = estimate(one, world=1), estimate(_cfg(*SMALL, "data.seq_len=8192", "train.dtype=auto"), 2)
    assert "split attention's cuDNN scratch" in with_split.transient_what
    assert split_scratch(_cfg(*SMALL, "data.seq_len=8192")) == 0  # the ring's calls return lse: no split
    assert split_scratch(_cfg(*SMALL, "parallel.cp=1", "data.seq_len=2048")) == 0  # no document that long
    assert "split" not in ring.transient_what
    # rows of one document each (the maxlen benchmark's) are dense attention: no split
    dense = _cfg(*SMALL, "parallel.cp=1", "data.seq_len=8192", "train.dtype=auto", "data.name=synthetic",
                 "data.distribution=fixed", "data.mean_len=8192")
    assert split_scratch(dense) == 0
    assert split_scratch(_cfg(*SMALL, "parallel.cp=1", "data.seq_len=8192", "train.dtype=auto", "data.name=synthetic",
                              "data.distribution=fixed", "data.mean_len=4096")) > 0  # two documents a row
