# The learner image: CUDA torch (PyPI's Linux wheel of torch 2.13.0 carries its CUDA libraries),
# Ray head, TensorBoard. Built from the repository root: docker compose build learner
#
# Python: the same image, to the patch, as the actor image's (PYTHON_IMAGE there too, and
# docker-compose.yml passes one value to both builds). Ray refuses a node whose Python differs from
# the head's at the patch level (RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=patch, Ray's default, kept).
ARG PYTHON_IMAGE=python:3.11.13-slim-bullseye
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 1000 avtd3
WORKDIR /app

# Dependencies first, so a code change does not reinstall torch.
COPY pyproject.toml README.md ./
RUN mkdir common actors learner replay_server \
    && pip install . && pip uninstall -y av-td3
COPY common ./common
COPY actors ./actors
COPY learner ./learner
COPY replay_server ./replay_server
COPY deploy ./deploy
RUN pip install --no-deps . && chmod +x deploy/docker/*.sh

USER avtd3
ENTRYPOINT ["deploy/docker/learner-entrypoint.sh"]
