# The ltexp image for the team service (docker-compose.yml): tuning workers, the model server and
# the Optuna dashboard. It installs this repository with `pip install .`, the package the tests
# install, plus the `team` extra (psycopg for PostgreSQL, optuna-dashboard).
#
# CPU PyTorch by default (the CPU wheel index keeps the image small). For NVIDIA GPUs, build with
# the CUDA wheels that match your driver, e.g.
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (or set TORCH_INDEX_URL in .env) and give the worker a GPU (README, "Team setup").
FROM python:3.11.14-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg

# PyTorch first, from the chosen wheel index; `pip install .` then finds it satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch torchvision

WORKDIR /work
COPY pyproject.toml README.md ./
COPY ltexp ./ltexp
RUN pip install ".[team]" \
    && useradd --create-home --uid 1000 ltexp \
    && mkdir -p /work/data \
    && chown ltexp /work /work/data
USER ltexp

# No secret is baked in: the tracking URL, logins and storage URL come from the environment.
CMD ["ltexp", "--help"]
