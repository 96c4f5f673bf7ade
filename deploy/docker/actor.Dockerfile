# The actor image: a CARLA 0.9.16 server plus our package and a Ray worker that advertises the
# `carla` resource, so rollout actors (actors.resources: {carla: 1}) land here and launch the
# server beside them. Built from the repository root: docker compose build carla-worker
#
# carlasim/carla:0.9.16 is Ubuntu 20.04, whose python3 is 3.8: neither the carla 0.9.16 wheel
# nor our pinned packages exist for it. Python comes from the official image built on Debian 11
# (glibc 2.31, as Ubuntu 20.04), copied in whole: no download beyond the registries. It is the
# learner image's Python to the patch (Ray compares them when this node joins): one PYTHON_IMAGE,
# pinned to a patch release, for both. 3.11.13 is the last 3.11 built on bullseye (the official
# images dropped Debian 11 in August 2025), so the tag no longer moves.
ARG PYTHON_IMAGE=python:3.11.13-slim-bullseye
FROM ${PYTHON_IMAGE} AS python

FROM carlasim/carla:0.9.16

USER root
# CARLA lives under /workspace in the 0.9.16 image (0.9.15 and earlier: /home/carla); the
# default carla.server_command launches the server binary there directly (CarlaUE4.sh would run
# it as a child, which outlives a killed actor), so a different layout fails here, not at run time.
# CARLA's own CarlaUE4.sh makes the binary executable before running it; we launch it directly.
RUN test -f /workspace/CarlaUE4/Binaries/Linux/CarlaUE4-Linux-Shipping \
    && chmod +x /workspace/CarlaUE4/Binaries/Linux/CarlaUE4-Linux-Shipping
COPY --from=python /usr/local/bin/ /usr/local/bin/
COPY --from=python /usr/local/lib/ /usr/local/lib/
COPY --from=python /usr/local/include/ /usr/local/include/
# The shared libraries that Python build links against, under the same names on Ubuntu 20.04.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl1.1 libffi7 libsqlite3-0 zlib1g \
       libbz2-1.0 liblzma5 libreadline8 libncursesw6 libuuid1 libexpat1 libgdbm6 \
    && rm -rf /var/lib/apt/lists/* \
    && ldconfig && /usr/local/bin/python3 -c "import ssl, sqlite3, ctypes, lzma, bz2, zlib"
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN /usr/local/bin/python3 -m venv /opt/venv \
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

# The image's own unprivileged user; CARLA refuses to run as root anyway.
USER carla
ENTRYPOINT ["deploy/docker/actor-entrypoint.sh"]
