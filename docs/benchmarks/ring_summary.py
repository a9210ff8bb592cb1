"""One line per case of a ring bench log (the JSON rows it prints): ms, efficiency, torch CP's beside.

    python3 docs/benchmarks/ring_summary.py LOG
"""
import json
import sys


def main(path):
    for line in open(path):
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        print("   ", d["S"], d["kernel"], "single", round(d["single_ms"], 2), "ring", round(d["ring_ms"], 2),
              "compute-only", round(d.get("compute_only_ms", 0), 2), "exposed", d.get("exposed_comm_ms"),
              "eff", d.get("efficiency"), "all-gather", d.get("allgather_efficiency"), "torch CP",
              d.get("torch_cp_allgather_efficiency"), d.get("torch_cp_alltoall_efficiency"), d.get("error", ""))


if __name__ == "__main__":
    main(sys.argv[1])
