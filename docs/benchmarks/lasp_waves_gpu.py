"""`seqpar.bench lasp` with the lightning kernels' segment length chosen to fill whole waves (issue 4).

    torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_waves_gpu.py [bench lasp args]

With SEG_RULE=waves the segment count n is one whose programs (n x heads, per column block) fill
whole waves of the SMs, the length within a factor 2 of `segment_length`'s and nearest it (a
multiple of 64; the rest of the tokens a last short segment); otherwise `segment_length` as it is.
lightning_waves_gpu.py measured one H100 at 512k tokens: 8192-token segments 39.72 ms fwd+bwd,
7936 38.19 (n = 66: 2112 programs per column block, 16 waves of 132 SMs).
"""
import os
import sys

from seqpar.bench.lasp import main
from seqpar.kernels.lightning_attn import triton as lt

heuristic = lt.segment_length


def waves(tokens, heads, device):
    base = heuristic(tokens, heads, device)
    sms = lt._sm_count(device.index if device.index is not None else 0)
    picks = [tokens // n // 64 * 64 for n in range(1, tokens // 1024 + 1) if n * heads % sms == 0]
    picks = [s for s in picks if base // 2 <= s <= 2 * base]
    return min(picks, key=lambda s: abs(s - base)) if picks else base


if os.environ.get("SEG_RULE") == "waves":
    lt.segment_length = waves
sys.exit(main(sys.argv[1:]))
