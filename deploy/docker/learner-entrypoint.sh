#!/bin/sh
# Ray head + the learner. Resumes the newest run under runs/ when one has a checkpoint, so
# `docker compose restart learner` (or a crash with restart: on-failure) continues the run.
set -eu
# Missing secrets are refused here, with the reason, not later as a failed join or dying actors.
SECRETS_USER="the learner" . "$(dirname "$0")/require-secrets.sh"
ray start --head --port="${RAY_PORT:-6380}" --dashboard-host=0.0.0.0 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
    --num-cpus="${LEARNER_CPUS:-4}" --disable-usage-stats
resume=""
if ls runs/*/checkpoints/latest >/dev/null 2>&1; then
    resume="--resume latest"
fi
# CARLA_GPUS (Vulkan adapter indices, e.g. 1,2,3) becomes carla.gpus: the actors' servers render
# on those GPUs by slot. Empty: on a node with 2+ GPUs the servers take every GPU but the
# learner's, LEARNER_GPU (nvidia-smi's numbering) passed on as carla.learner_gpu.
if [ -n "${CARLA_GPUS:-}" ]; then
    set -- --set "carla.gpus=[$CARLA_GPUS]" "$@"
fi
if [ -n "${LEARNER_GPU:-}" ]; then
    set -- --set "carla.learner_gpu=$LEARNER_GPU" "$@"
fi
# The password reaches the replay client through REDIS_PASSWORD, never the command line; REDIS_URL
# (default: compose's `redis` service) is for a Redis elsewhere, and for `make rehearse`.
# shellcheck disable=SC2086
exec python -m learner --config "${LEARNER_CONFIG:-deploy/configs/carla.yaml}" \
    --ray-address auto --redis-url "${REDIS_URL:-redis://redis:6379/0}" --num-actors "${NUM_ACTORS:-2}" --quiet $resume "$@"
