#!/bin/sh
# A Ray worker on this CARLA node: one `carla` resource per server it can run (CARLA_SLOTS,
# default 1). The rollout actor Ray places here launches the CARLA server itself, on the GPU
# carla.gpus gives its env slot. --num-gpus=0: the GPUs this container sees are the servers',
# so Ray must not hand them to GPU work of its own.
# The node's own ports are fixed from RAY_WORKER_PORT_BASE (default 6381; a container has its own
# network): the healthcheck finds this node in the cluster by its node-manager port, and workers
# sharing one host (`make rehearse`) each take another base.
set -eu
# Missing secrets are refused here, with the reason, not later as a failed join or dying actors.
SECRETS_USER="this worker's actors" . "$(dirname "$0")/require-secrets.sh"
base="${RAY_WORKER_PORT_BASE:-6381}"
exec ray start --address="${RAY_HEAD:-learner:6380}" --block --disable-usage-stats \
    --num-cpus="${WORKER_CPUS:-2}" --num-gpus=0 --resources="{\"carla\": ${CARLA_SLOTS:-1}}" \
    --node-manager-port="$base" --object-manager-port=$((base + 1)) --metrics-export-port=$((base + 2)) \
    --dashboard-agent-grpc-port=$((base + 3)) --dashboard-agent-listen-port=$((base + 4)) \
    --runtime-env-agent-port=$((base + 5))
