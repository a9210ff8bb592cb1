"""Do the lightning kernel's memory-bound state pass and its latency-bound output pass overlap on one GPU?

The state pass streams k, v at the HBM roofline (3.37 TB/s on H100, twenty-fifth session); the output
pass runs at ~64% of it, bound by each program's serial walk. A kernel that interleaves both kinds of
work (a persistent work queue: state items, then the scan, then output items that wait for the
states they read) would pay max(...) instead of the sum, if the two mix on the SMs. This probe asks
the hardware with the existing kernels: the forward output pass of row A and the forward state pass
of row B (independent data) on two streams, against each alone. ms per pair, 20 pairs.

    python3 docs/benchmarks/lightning_overlap_probe_gpu.py OUT.json 65536:65536 16384:65536
"""
import json
import sys

import torch

from lightning_rows_gpu import _time  # (this folder: the script's own directory is on sys.path)
from seqpar.kernels.lightning_attn import triton as lt


def _row(S, H, D, dev, lam):
    q, k, v = (torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    tab = lt.segment_table(None, 1, S, lt.segment_length(S, H, dev), dev)
    qt, kt, vt = lt._tokens(q), lt._tokens(k), lt._tokens(v)
    bound = lt._boundary_states(kt, vt, tab, lam, 1.0, False)

    def out():
        lt._output(qt, kt, vt, bound, bound.stride(), None, None, None, tab, lam, (D ** -0.5, D ** -0.5, 1.0), False,
                   q.dtype)

    def state():
        lt._segment_locals(kt, vt, tab, lam, 1.0, False)
    return out, state


def main(out_path, pairs):
    H, D, dev = 32, 128, torch.device("cuda")
    lam = -torch.linspace(1, 8, H, device=dev).exp2().reciprocal()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    result = {}
    for pair in pairs:
        sa, sb = (int(x) for x in pair.split(":"))
        out_a, _ = _row(sa, H, D, dev, lam)
        _, state_b = _row(sb, H, D, dev, lam)

        def both():
            main_stream = torch.cuda.current_stream()
            s1.wait_stream(main_stream)
            s2.wait_stream(main_stream)
            with torch.cuda.stream(s1):
                out_a()
            with torch.cuda.stream(s2):
                state_b()
            main_stream.wait_stream(s1)
            main_stream.wait_stream(s2)

        def serial():
            out_a()
            state_b()
        row = {}
        for _ in range(2):  # two rounds, in turn
            for name, fn in (("output_alone", out_a), ("state_alone", state_b), ("serial", serial),
                             ("two_streams", both)):
                row.setdefault(name, []).append(round(_time(fn, iters=20, warmup=1), 4))
        best = {k: min(v) for k, v in row.items()}
        row["two_streams_over_serial"] = round(best["two_streams"] / best["serial"], 3)
        row["two_streams_over_max"] = round(best["two_streams"] / max(best["output_alone"], best["state_alone"]), 3)
        result[pair] = row
        print(pair, row, flush=True)
    with open(out_path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=result), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
