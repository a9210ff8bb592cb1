# What machine a device-tool call got, into DIR/device.json and DIR/topology.txt:
#   bash docs/benchmarks/device_info.sh DIR
# The GPUs' name, count, clocks and power limit, and how they connect (`nvidia-smi topo -m`, NVLink
# link states): the same kind of pair ran the 2-rank ring at 32k with 0.2-0.6 ms of its transfers
# exposed on some machines and 1.5 ms on another (2026-11-27 eighteenth session, calls 3-4 vs 7).
# Also the call's start (UTC) as `date`: the simulator dates the call's undated files by it (seqpar/sim/eras.py,
# `_folder_date`), so they take the code era they ran without a COMMITTED_BY entry.
mkdir -p "$1"
nvidia-smi topo -m > "$1/topology.txt" 2>&1
nvidia-smi nvlink --status >> "$1/topology.txt" 2>&1
python3 - "$1" <<'PY'
import datetime, json, subprocess, sys
fields = "name,clocks.max.sm,clocks.max.mem,power.limit,pci.bus_id"
rows = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                      capture_output=True, text=True).stdout.strip().splitlines()
gpus = [dict(zip(fields.split(","), (x.strip() for x in row.split(",")))) for row in rows]
name = gpus[0]["name"] if gpus else "none"
date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
json.dump({"device": f"{name} x{len(gpus)}", "gpus": gpus, "date": date}, open(f"{sys.argv[1]}/device.json", "w"),
          indent=1)
PY
