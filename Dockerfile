# Two images from one Dockerfile, one per kind of service. Build from the repository root:
#
#   docker build --target router -t llamagrid-router .        # router, `llamagrid keys`: no torch, no transformers
#   docker build --target worker -t llamagrid-worker .        # supervised workers, the tiny-model one-shot (CPU torch)
#   docker build --target worker -t llamagrid-worker:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# The router never imports the model code, so its image installs `.[router]` and stays small (tens of MB of
# packages beside the ~1.2 GB that torch and transformers add to the worker; a CUDA torch adds gigabytes more), and a
# router fleet scales out without pulling them. The CUDA worker differs only in which torch wheel is installed (pick
# the wheel index matching the host's driver); there is no image per GPU type. compose/README.md has the whole stack.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fresh named volume mounted on /models takes this owner, so the one-shot service can write the tiny model there.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin llamagrid \
    && mkdir -p /models \
    && chown llamagrid:llamagrid /models
WORKDIR /src


FROM base AS router

# .dockerignore lets in only the packaging files, the Python packages and the health probe.
COPY . ./
RUN pip install ".[router]" \
    && install -m 0755 compose/healthcheck.py /usr/local/bin/llamagrid-healthcheck \
    && python -m router --help > /dev/null \
    && llamagrid keys --help > /dev/null

USER llamagrid
WORKDIR /home/llamagrid
EXPOSE 50051
CMD ["python", "-m", "router", "--help"]


# Last, so a plain `docker build .` still builds the image that runs every command.
FROM base AS worker

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LLAMAGRID_HOME=/models

# torch first and pinned, from the chosen index (a layer of its own, kept across source changes): `pip install
# .[server]` then finds torch>=2.4 satisfied and pulls no other.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY . ./
RUN pip install ".[server]" \
    && install -m 0755 compose/healthcheck.py /usr/local/bin/llamagrid-healthcheck \
    && llamagrid --help > /dev/null

USER llamagrid
WORKDIR /home/llamagrid
EXPOSE 50061
CMD ["llamagrid", "--help"]
