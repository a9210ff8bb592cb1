"""Kernels of seqpar (imported as `seqpar.kernels`; the folder sits at the top level).

Layout: one subpackage per op, `kernels/<op>/`, holding `reference.py` (plain torch, the ground
truth every fast kernel is tested against) and, in later issues, `triton.py`. The op's public
function is defined in `kernels/<op>/__init__.py` and re-exported here, so after
`import seqpar.kernels` the NAME `seqpar.kernels.flash_attn` is the function, not the subpackage.
Reach implementations with from-imports, which resolve through the module system:
`from seqpar.kernels.flash_attn.reference import flash_attn_reference` (or
`from seqpar.kernels.flash_attn import reference`). Which implementation runs is decided only in
`kernels/dispatch.py`.
"""
from seqpar.kernels.attn_merge import attn_merge_
from seqpar.kernels.block_sum import block_sum_
from seqpar.kernels.cross_entropy import fused_linear_cross_entropy
from seqpar.kernels.dispatch import backend
from seqpar.kernels.flash_attn import flash_attn
from seqpar.kernels.lightning_attn import lightning_attn
from seqpar.kernels.norm_rope import apply_rotary, rms_norm, rotary_cos_sin

__all__ = ["apply_rotary", "attn_merge_", "backend", "block_sum_", "flash_attn", "fused_linear_cross_entropy", "lightning_attn",
           "rms_norm", "rotary_cos_sin"]
