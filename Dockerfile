# One image for every llamagrid service (router, supervised workers, the tiny-model one-shot, `llamagrid keys`):
# each compose service picks its command. Build from the repository root:
#
#   docker build -t llamagrid .                                           # CPU torch (laptops, CI, routers)
#   docker build -t llamagrid:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# The CUDA build differs only in which torch wheel is installed (pick the wheel index matching the host's
# driver); there is no image per GPU type. compose/README.md has the whole stack.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LLAMAGRID_HOME=/models

# torch first and pinned, from the chosen index: `pip install .[server]` then finds torch>=2.4 satisfied and pulls
# no other.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# .dockerignore lets in only the packaging files, the Python packages and the health probe.
COPY . ./
RUN pip install ".[server]" \
    && install -m 0755 compose/healthcheck.py /usr/local/bin/llamagrid-healthcheck \
    && llamagrid --help > /dev/null \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin llamagrid \
    && mkdir -p /models \
    && chown llamagrid:llamagrid /models

# A fresh named volume mounted on /models takes this owner, so the one-shot service can write the tiny model there.
USER llamagrid
WORKDIR /home/llamagrid
EXPOSE 50051 50061
CMD ["llamagrid", "--help"]
