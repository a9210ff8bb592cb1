"""Activation offload (seqpar/parallel/offload.py) on the CPU: the same bookkeeping as on CUDA
(host copy, storage released when the block returns, brought back before recomputation, the one
before prefetched), without the streams."""
import weakref

import pytest
import torch
from omegaconf import OmegaConf

from seqpar.model.transformer import Transformer
from seqpar.parallel.parallelize import apply_activation_checkpointing
from tests.test_memory import _cfg


def _loss_and_grads(mode, offload, inputs_seen=None, device="cpu", dtype=torch.float64):
    cfg = _cfg("parallel.cp=1")
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device, dtype)
    model.init_weights(seed=1)
    train = OmegaConf.create({"activation_checkpointing": mode, "offload_activations": offload,
                              "mlp_chunk_tokens": 0})
    apply_activation_checkpointing(model, train)
    if inputs_seen is not None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
        for i, layer in enumerate(model.layers.values()):
            for module in layer.modules():
                if isinstance(module, CheckpointWrapper):
                    module.register_forward_pre_hook(lambda _, args, i=i: inputs_seen.append((i, args[0])))
    ids = torch.randint(0, cfg.model.vocab_size, (1, 37), generator=torch.Generator().manual_seed(2)).to(device)
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    if inputs_seen is not None:
        # what every checkpoint kept was released when its block returned
        assert len(inputs_seen) == len(model.layers) * (1 if mode == "full" else 3)
        assert all(x.untyped_storage().nbytes() == 0 for _, x in inputs_seen)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_offload_gives_the_same_loss_and_gradients(mode):
    ref_loss, ref_grads = _loss_and_grads("none", False)
    seen = []
    loss, grads = _loss_and_grads(mode, True, seen)
    assert torch.equal(loss, ref_loss) or abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    for name, g in ref_grads.items():
        other = next(v for k, v in grads.items() if k.replace("._checkpoint_wrapped_module", "") == name)
        torch.testing.assert_close(other, g, rtol=1e-10, atol=1e-12)
    assert all(x.untyped_storage().nbytes() > 0 for _, x in seen)  # all back after backward


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_offload_on_cuda_streams(mode):
    ref_loss, ref_grads = _loss_and_grads("none", False, device="cuda", dtype=torch.float32)
    loss, grads = _loss_and_grads(mode, True, [], device="cuda", dtype=torch.float32)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in ref_grads.items():
        other = next(v for k, v in grads.items() if k.replace("._checkpoint_wrapped_module", "") == name)
        torch.testing.assert_close(other, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_backward_frees_each_restored_input_after_its_block(mode):
    """The restored inputs must die block by block as backward goes, as without offload (a
    reference held until the whole backward ends took the offload's savings back on an H100)."""
    cfg = _cfg("parallel.cp=1")
    model = Transformer(cfg.model)
    model.init_weights(seed=1)
    apply_activation_checkpointing(model, OmegaConf.create(
        {"activation_checkpointing": mode, "offload_activations": True, "mlp_chunk_tokens": 0}))
    inputs = []
    for layer in model.layers.values():
        layer.register_forward_pre_hook(lambda _, args: inputs.append(weakref.ref(args[0])))
    alive_at_the_end = []  # the embedding's gradient is the last of the backward
    model.tok_embeddings.weight.register_hook(lambda g: alive_at_the_end.append([r() is not None for r in inputs]))
    ids = torch.randint(0, cfg.model.vocab_size, (1, 37), generator=torch.Generator().manual_seed(3))
    model(ids[:, :-1], targets=ids[:, 1:]).backward()
    assert alive_at_the_end == [[False] * len(model.layers)]
