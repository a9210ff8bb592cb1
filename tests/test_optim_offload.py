"""HostOffloadedAdamW: the steps of torch's AdamW, bit for bit, with the moments in host memory."""
import copy
import re

import pytest
import torch

from seqpar.parallel.optim_offload import HostOffloadedAdamW, check_host_memory


def _model():
    torch.manual_seed(0)
    # a frozen layer (no grad, no step) between two that train; 37 x 11 does not divide the bucket
    model = torch.nn.Sequential(torch.nn.Linear(11, 37), torch.nn.Linear(37, 5), torch.nn.Linear(5, 3))
    model[1].requires_grad_(False)
    return model


def _steps(model, opt, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(6, 11, generator=gen)).square().sum().backward()
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bucket_numel", [16, 1 << 20])  # slices of every tensor / one bucket for all
def test_steps_equal_torch_adamw(foreach, bucket_numel):
    ref, off = _model(), _model()
    groups = lambda m: [{"params": [p for p in m.parameters() if p.ndim == 2], "weight_decay": 0.1},
                        {"params": [p for p in m.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), foreach=foreach)
    opt_ref = torch.optim.AdamW(groups(ref), **kwargs)
    opt_off = HostOffloadedAdamW(groups(off), bucket_numel=bucket_numel, **kwargs)
    _steps(ref, opt_ref, 4)
    _steps(off, opt_off, 4)
    for p, q in zip(ref.parameters(), off.parameters()):
        assert torch.equal(p, q)
        if p.requires_grad:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(opt_ref.state[p][key], opt_off.state[q][key]), key
        else:  # allocated up front, never stepped
            assert float(opt_off.state[q]["step"]) == 0 and not opt_off.state[q]["exp_avg"].any()


def test_state_dict_round_trip_continues_exactly():
    straight, resumed = _model(), _model()
    opt = HostOffloadedAdamW(straight.parameters(), lr=1e-2, bucket_numel=16)
    _steps(straight, opt, 2)
    saved_model, saved_opt = copy.deepcopy(straight.state_dict()), copy.deepcopy(opt.state_dict())
    _steps(straight, opt, 2, seed=2)

    resumed.load_state_dict(saved_model)
    opt2 = HostOffloadedAdamW(resumed.parameters(), lr=1e-2, bucket_numel=16)
    held = [opt2.state[p]["exp_avg"] for p in resumed.parameters()]
    opt2.load_state_dict(saved_opt)
    # the loaded moments land in the optimizer's own (host) tensors, not in copies on another device
    assert all(opt2.state[p]["exp_avg"] is t for p, t in zip(resumed.parameters(), held))
    _steps(resumed, opt2, 2, seed=2)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_unsupported_options_and_host_memory_are_clear():
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        HostOffloadedAdamW(_model().parameters(), amsgrad=True)
    from seqpar.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape("shard them over more ranks (parallel.dp or parallel.cp) or "
                                                    "set train.offload_optimizer=false")):
        check_host_memory(_model().parameters(), local_ranks=1 << 40)
    check_host_memory(_model().parameters(), local_ranks=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_streamed_steps_on_gpu_equal_torch_adamw():
    """The CUDA path: moments copied in and out on side streams, slices of every tensor."""
    ref, off = _model().cuda(), _model().cuda()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=True)
    opt_off = HostOffloadedAdamW(off.parameters(), lr=1e-2, foreach=True, bucket_numel=16)
    assert all(opt_off.state[p]["exp_avg"].is_pinned() for p in off.parameters())
    for model, opt in ((ref, opt_ref), (off, opt_off)):
        gen = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(6, 11, device="cuda", generator=gen)).square().sum().backward()
            opt.step()
    for p, q in zip(ref.parameters(), off.parameters()):
        assert torch.equal(p, q)
        if p.requires_grad:
            assert torch.equal(opt_ref.state[p]["exp_avg_sq"].cpu(), opt_off.state[q]["exp_avg_sq"])


def _dtensor_moments_stay_on_host(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cuda", (world,))
    weight = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4, device="cuda"), mesh, [Shard(0)]))
    opt = HostOffloadedAdamW([weight], lr=1e-2, foreach=True, bucket_numel=16)
    local = opt.state[weight]["exp_avg"].to_local()
    weight.grad = distribute_tensor(torch.ones(8, 4, device="cuda"), mesh, [Shard(0)])
    opt.step()
    return local.device.type, local.is_pinned(), float(opt.state[weight]["exp_avg"].to_local().abs().sum())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_dtensor_moments_stay_in_host_memory():
    """FSDP2's parameters are DTensors on a CUDA mesh: their moments must stay host-side DTensors
    (DTensor.from_local would have moved them to the GPU)."""
    from tests.distributed import run_distributed

    (device, pinned, total), = run_distributed(_dtensor_moments_stay_on_host, 1, backend="nccl")
    assert device == "cpu" and pinned and total > 0  # and the step wrote into them
