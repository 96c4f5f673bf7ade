#!/bin/sh
# A Ray worker on this CARLA node: one `carla` resource per server it can run (CARLA_SLOTS,
# default 1). The rollout actor Ray places here launches the CARLA server itself, on the GPU
# carla.gpus gives its env slot. --num-gpus=0: the GPUs this container sees are the servers',
# so Ray must not hand them to GPU work of its own.
set -eu
exec ray start --address="${RAY_HEAD:-learner:6380}" --block --disable-usage-stats \
    --num-cpus="${WORKER_CPUS:-2}" --num-gpus=0 --resources="{\"carla\": ${CARLA_SLOTS:-1}}"
