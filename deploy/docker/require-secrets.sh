# Sourced by the entrypoints (SECRETS_USER names who needs the Redis password): exits 2 with the
# reason when a secret that docker-compose.yml passes from .env is missing.
if [ "${RAY_AUTH_MODE:-}" = token ] && [ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ]; then
    echo "error: RAY_AUTH_TOKEN is not set: the Ray cluster admits only nodes with its token (set it in .env)" >&2
    exit 2
fi
if [ -z "${REDIS_PASSWORD:-}" ]; then
    echo "error: REDIS_PASSWORD is not set: ${SECRETS_USER:-this container} cannot use the replay's Redis without it (set it in .env)" >&2
    exit 2
fi
