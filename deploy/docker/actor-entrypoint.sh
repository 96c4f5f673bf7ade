#!/bin/sh
# A Ray worker on this CARLA node: one `carla` resource per server it can run (CARLA_SLOTS,
# default 1: one server per GPU). The rollout actor Ray places here launches CarlaUE4.sh itself.
set -eu
exec ray start --address="${RAY_HEAD:-learner:6380}" --block --disable-usage-stats \
    --num-cpus="${WORKER_CPUS:-2}" --resources="{\"carla\": ${CARLA_SLOTS:-1}}"
