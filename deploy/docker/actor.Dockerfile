# The actor image: a CARLA 0.9.16 server plus our package and a Ray worker that advertises the
# `carla` resource, so rollout actors (actors.resources: {carla: 1}) land here and launch the
# server beside them. Built from the repository root: docker compose build carla-worker
FROM carlasim/carla:0.9.16

USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv \
    # Actors run the policy on the CPU: torch's CPU build (2.13.0+cpu satisfies torch==2.13.0).
    && pip install --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
RUN mkdir common actors learner replay_server \
    && pip install . && pip uninstall -y av-td3
COPY common ./common
COPY actors ./actors
COPY learner ./learner
COPY replay_server ./replay_server
COPY deploy ./deploy
RUN pip install --no-deps . && chmod +x deploy/docker/*.sh && chown -R carla /app

# The image's own unprivileged user; CarlaUE4.sh refuses to run as root anyway.
USER carla
ENTRYPOINT ["deploy/docker/actor-entrypoint.sh"]
