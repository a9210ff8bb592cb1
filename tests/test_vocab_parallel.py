"""The vocabulary-parallel loss against the single-device fused loss (fp64, 2 gloo ranks)."""
import torch

from tests.distributed import run_distributed


def _loss_and_grads(rank, world, hidden, weight, targets, chunk_size):
    from seqpar.parallel.vocab_parallel import vocab_parallel_cross_entropy

    rows = weight.shape[0] // world
    h = hidden.clone().requires_grad_()
    w = weight[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(h, w, targets, group=None, vocab_start=rank * rows, chunk_size=chunk_size)
    (loss * 0.37).backward()  # a grad_output other than 1: the saved grads must be scaled
    return loss.detach(), h.grad, w.grad


def test_vocab_parallel_loss_matches_single_device():
    from seqpar.kernels.cross_entropy.reference import fused_linear_cross_entropy_reference

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 11, 8, dtype=torch.float64, generator=gen)
    weight = torch.randn(30, 8, dtype=torch.float64, generator=gen) * 3  # sharp logits: max subtraction matters
    targets = torch.randint(0, 30, (2, 11), generator=gen)
    targets[0, :4] = -100
    targets[1, 5] = -100
    targets[1, 6], targets[1, 7] = 14, 15  # the last row of rank 0's slice and the first of rank 1's
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = fused_linear_cross_entropy_reference(h, w, targets)
    (want * 0.37).backward()
    results = run_distributed(_loss_and_grads, 2, hidden, weight, targets, 4)  # 22 rows in chunks of 4
    for rank, (loss, gh, gw) in enumerate(results):
        torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(gh, h.grad, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(gw, w.grad[rank * 15:(rank + 1) * 15], rtol=1e-10, atol=1e-13)
