# The learner image: CUDA torch (PyPI's Linux wheel of torch 2.13.0 carries its CUDA libraries),
# Ray head, TensorBoard. Built from the repository root: docker compose build learner
FROM python:3.11-slim

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
