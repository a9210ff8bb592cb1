#!/usr/bin/env bash
# A Ray cluster of seqpar containers (docker/Dockerfile), one container per GPU host, all GPUs each.
# Host networking: Ray's and NCCL's ports must be reachable between hosts; host IPC: NCCL's
# shared-memory transport between ranks of one host. RUNS must be storage that every host mounts:
# every rank writes its checkpoint shards there, and a group restarted after a lost worker resumes from it.
#   head host:         docker/ray-cluster.sh head
#   each other host:   docker/ray-cluster.sh worker HEAD_IP
#   head host:         docker/ray-cluster.sh submit launcher.nproc_per_node=8 launcher.nnodes=2 run_dir=/runs/demo
#   stop (each host):  docker rm -f seqpar-ray
set -euo pipefail
IMAGE=${IMAGE:-seqpar}
RUNS=${RUNS:-/shared/runs}

start() {
  docker run -d --name seqpar-ray --gpus all --network host --ipc host -v "$RUNS:/runs" \
    --entrypoint ray "$IMAGE" start --block "$@"
}

case "${1:-}" in
  head) start --head --port=6379 --dashboard-host=0.0.0.0 ;;
  worker) start --address="${2:?usage: $0 worker HEAD_IP}:6379" ;;
  submit) shift; docker exec seqpar-ray ray job submit --address http://127.0.0.1:8265 -- seqpar-train launcher=ray "$@" ;;
  *) echo "usage: $0 head | worker HEAD_IP | submit [hydra overrides]" >&2; exit 2 ;;
esac
