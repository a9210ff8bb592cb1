"""attn_merge_ in plain torch: the ground truth of the Triton kernel, and what runs off CUDA."""
from __future__ import annotations

import torch


def attn_merge_reference_(old, o, lse, l, out):
    """`attn_merge_` (kernels/attn_merge/__init__.py) as torch ops, the merge in lse's dtype."""
    new = torch.logaddexp(lse, l.to(lse.dtype))
    # rows that no block has reached yet have -inf on both sides: weight 0, not exp(nan)
    ref = torch.nan_to_num(new, neginf=0.0)
    w_old = (lse - ref).exp_().transpose(1, 2).unsqueeze(-1)
    w_new = (l.to(lse.dtype) - ref).exp_().transpose(1, 2).unsqueeze(-1)
    if out.data_ptr() == old.data_ptr() and out.stride() == old.stride():
        out.mul_(w_old).addcmul_(o, w_new)
    else:  # old * w_old is taken in lse's dtype (fp32 for bf16 blocks), and rounded into out once
        torch.addcmul(old * w_old, o, w_new, out=out)
    lse.copy_(new)
    return out, lse
