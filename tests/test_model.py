"""The decoder on one process: presets, layer patterns, per-document causality, loss, init, FLOPs."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from seqpar.attention import AttnContext
from seqpar.model.flops import count_params, step_flops
from seqpar.model.layers import SoftmaxAttention
from seqpar.model.transformer import Transformer, layer_types

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
PRESETS = ["tiny_hybrid", "llama_1b", "hybrid_1b", "llama_8b"]


def small_cfg(**overrides):
    cfg = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=None, ffn_dim=48,
               layer_pattern="LS", rope_theta=10000.0, norm_eps=1e-5, init_std=0.02, linear_decay="transnormer")
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def build(cfg, seed=0):
    model = Transformer(cfg).double()
    model.init_weights(seed)
    return model


def packed_ctx(lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    return AttnContext(cu_seqlens=cu, position_ids=positions), cu.tolist()


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_and_count(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg.name == name
    with torch.device("meta"):
        model = Transformer(cfg)
    assert len(model.layers) == cfg.n_layers
    assert model.num_params() == count_params(cfg)
    assert model.num_params(exclude_embedding=True) == count_params(cfg, exclude_embedding=True)
    assert model.num_params() - model.num_params(exclude_embedding=True) == cfg.vocab_size * cfg.d_model


def test_llama_1b_matches_anchor_count():
    cfg = OmegaConf.load(CONF / "llama_1b.yaml")
    # anchors_e2e.py's Model: embedding, 16 x (2 RMSNorm, fused qkv, o, fused w13, w2), norm, head
    V, Dm, L, H, KV, FF = 32000, 2048, 16, 32, 8, 8192
    hd = Dm // H
    anchor = V * Dm + L * (2 * Dm + Dm * (H + 2 * KV) * hd + Dm * Dm + Dm * 2 * FF + FF * Dm) + Dm + V * Dm
    assert count_params(cfg) == anchor
    assert layer_types(cfg) == "S" * 16
    assert abs(count_params(OmegaConf.load(CONF / "llama_8b.yaml")) - 8.03e9) < 0.01e9


def test_tiny_hybrid_fits_byte_tokenizer():
    cfg = OmegaConf.load(CONF / "tiny_hybrid.yaml")
    assert cfg.vocab_size >= 257 and layer_types(cfg) == "LLLS"


def test_layer_pattern_tiles_and_rejects_unknown_types():
    model = Transformer(small_cfg(n_layers=8, layer_pattern="LLLS"))
    kinds = "".join("S" if isinstance(b.attention, SoftmaxAttention) else "L" for b in model.layers.values())
    assert kinds == "LLLSLLLS" == model.layer_types
    for bad in ("LLX", "", "s"):
        with pytest.raises(ValueError, match="model.layer_pattern"):
            Transformer(small_cfg(layer_pattern=bad))


def test_linear_decay_is_fixed_negative_and_per_layer():
    model = Transformer(small_cfg(n_layers=4, layer_pattern="L"))
    decays = [b.attention.log_decay for b in model.layers.values()]
    assert all(d.shape == (4,) and (d < 0).all() for d in decays)
    assert torch.all(decays[0] < decays[-1])  # deeper layers remember longer
    # ALiBi slopes 2^(-8h/H), full strength in the first layer (plus the 1e-5 floor)
    want = -torch.tensor([2.0 ** (-2 * h) for h in range(1, 5)]) * (1 + 1e-5)
    torch.testing.assert_close(decays[0], want, rtol=1e-6, atol=0)
    torch.testing.assert_close(decays[-1], want * 1e-5 / (1 + 1e-5), rtol=1e-5, atol=0)
    assert not any("log_decay" in k for k in model.state_dict())
    assert all(not p.requires_grad or "log_decay" not in n for n, p in model.named_parameters())
    model = model.to(torch.bfloat16)
    model.init_weights(0)
    assert all(b.attention.log_decay.dtype == torch.float32 for b in model.layers.values())
    with pytest.raises(ValueError, match="model.linear_decay"):
        Transformer(small_cfg(linear_decay="learned"))


@pytest.mark.parametrize("pattern", ["S", "L", "LS"])
def test_documents_are_isolated_and_causal(pattern):
    torch.manual_seed(0)
    model = build(small_cfg(layer_pattern=pattern))
    lengths = [11, 17, 8]
    ctx, cu = packed_ctx(lengths)
    ids = torch.randint(0, 50, (1, sum(lengths)))
    h = model(ids, ctx)
    assert h.shape == (1, sum(lengths), 32)

    changed = ids.clone()
    changed[0, cu[1]:cu[2]] = torch.randint(0, 50, (lengths[1],))
    h2 = model(changed, ctx)
    for doc in (0, 2):
        torch.testing.assert_close(h2[:, cu[doc]:cu[doc + 1]], h[:, cu[doc]:cu[doc + 1]], rtol=0, atol=1e-12)
    assert not torch.allclose(h2[:, cu[1]:cu[2]], h[:, cu[1]:cu[2]])

    # causality inside a document and inside unpacked rows
    rows = torch.randint(0, 50, (2, 24))
    later = rows.clone()
    later[:, 15] = (later[:, 15] + 1) % 50
    a, b = model(rows), model(later)
    torch.testing.assert_close(b[:, :15], a[:, :15], rtol=0, atol=1e-12)
    assert not torch.allclose(b[:, 15:], a[:, 15:])


def test_positions_restart_per_document():
    torch.manual_seed(0)
    model = build(small_cfg(layer_pattern="S"))
    doc = torch.randint(0, 50, (1, 9))
    ctx, _ = packed_ctx([5, 9])
    h = model(torch.cat([torch.randint(0, 50, (1, 5)), doc], dim=1), ctx)
    torch.testing.assert_close(h[:, 5:], model(doc), rtol=0, atol=1e-12)


def test_loss_sum_matches_materialised_cross_entropy():
    torch.manual_seed(0)
    model = build(small_cfg())
    ids = torch.randint(0, 50, (2, 20))
    targets = torch.randint(0, 50, (2, 20))
    targets[0, :3] = -100
    h = model(ids)
    want = F.cross_entropy(model.output(h).reshape(-1, 50), targets.reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(model.loss_sum(h, targets), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(ids, targets=targets), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tie", [False, True])
def test_gradients_reach_every_parameter(tie):
    torch.manual_seed(0)
    model = build(small_cfg(n_layers=4, layer_pattern="LLLS", tie_embeddings=tie))
    ctx, _ = packed_ctx([7, 13])
    ids = torch.randint(0, 50, (1, 20))
    model(ids, ctx, targets=torch.roll(ids, -1, 1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    if tie:
        assert model.output.weight is model.tok_embeddings.weight
        assert model.num_params(exclude_embedding=True) == model.num_params() == count_params(model.cfg)


def test_init_weights_is_deterministic_and_scaled():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    cfg = small_cfg(n_layers=8, d_model=64, ffn_dim=256)
    a, b, c = Transformer(cfg), Transformer(cfg), Transformer(cfg).double()
    a.init_weights(7)
    b.layers["0"] = checkpoint_wrapper(b.layers["0"])  # wrappers must not change the draw
    b.init_weights(7)
    c.init_weights(7)
    sa = a.state_dict()
    for name, p in b.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        assert torch.equal(p, sa[name]), name
        assert torch.equal(c.get_parameter(name).float(), p), name
    b.init_weights(8)
    assert not torch.equal(a.layers["0"].attention.wq.weight, b.layers["0"].attention.wq.weight)

    for model in (a, b):
        torch.manual_seed(3)
        model.init_weights()
    assert torch.equal(a.output.weight, b.output.weight)

    std = cfg.init_std
    assert abs(a.tok_embeddings.weight.std().item() - std) < 0.1 * std
    assert abs(a.layers["1"].feed_forward.w1.weight.std().item() - std) < 0.1 * std
    assert abs(a.layers["1"].feed_forward.w2.weight.std().item() - std / math.sqrt(16)) < 0.1 * std / 4
    assert abs(a.layers["1"].attention.wo.weight.std().item() - std / math.sqrt(16)) < 0.1 * std / 4
    assert torch.equal(a.layers["0"].attention.out_norm.weight, torch.ones(16))
    assert torch.equal(a.norm.weight, torch.ones(64))


def test_step_flops_hand_computed():
    cfg = small_cfg(vocab_size=10, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16, layer_pattern="SL")
    # params doing matmuls: S block 8*8 + 2*8*4 + 8*8 + norms 16 + mlp 3*8*16 = 592;
    # L block 4*8*8 + 8*8 + out norm 4 + 16 + 384 = 724; final norm 8; head 80 -> 1404
    assert count_params(cfg, exclude_embedding=True) == 1404
    matmuls = 6 * 1404 * 8
    softmax = 3 * 2 * 2 * 2 * 4 * (3 * 3 + 5 * 5) / 2  # one S layer, documents of 3 and 5 tokens
    linear = 3 * 2 * 2 * 2 * 4 * 4 * 8  # one L layer, 8 tokens
    assert matmuls + softmax + linear == 72096
    assert step_flops(cfg, [3, 5]) == 72096
    assert step_flops(cfg, torch.tensor([3, 5], dtype=torch.int32)) == 72096
    assert step_flops(cfg, [3, 5], include_embedding=True) == 72096 + 6 * 80 * 8


def test_step_flops_reproduces_anchor_convention():
    cfg = OmegaConf.load(CONF / "llama_1b.yaml")
    S, Dm, L = 16384, 2048, 16
    N = count_params(cfg)
    assert step_flops(cfg, [S], include_embedding=True) == 6 * N * S + 3 * (2 * S * S * Dm) * L
