# syntax=docker/dockerfile:1
#
# Lethe server image: multi-stage, non-root, data in the /data volume, HEALTHCHECK through the
# gRPC health service (readiness of lethe.v1.Lethe).
#
#   docker build -t lethe:cpu .                                # CPU-only torch (small)
#   docker build -t lethe:cuda --build-arg VARIANT=cuda .      # CUDA torch (run with --gpus all)
#   docker build -t lethe:cu128 --build-arg VARIANT=cuda \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # a specific CUDA build
#
# See docs/operations.md ("Container image") for running it.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

# cpu: torch from PyTorch's CPU wheel index; cuda: torch from PyPI (its Linux wheels bundle CUDA).
ARG VARIANT=cpu
# Overrides the wheel index torch and torchvision come from (e.g. .../whl/cu128).
ARG TORCH_INDEX=""
ARG UV_VERSION=0.13.8

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1

RUN pip install "uv==${UV_VERSION}" \
    && uv venv /opt/lethe

# torch first, in its own layer: it is by far the largest and changes least often.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN case "${VARIANT}" in \
      cpu)  index="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX:-https://pypi.org/simple}" ;; \
      *)    echo "VARIANT must be cpu or cuda, got '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && uv pip install --python /opt/lethe/bin/python --index-url "${index}" "torch>=2.4" "torchvision>=0.19"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY server ./server
COPY client ./client
# A regular (not editable) install: the image needs no source tree, only migrations/ (below).
RUN uv pip install --python /opt/lethe/bin/python ".[server]"

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ARG VARIANT=cpu
LABEL org.opencontainers.image.title="lethe" \
      org.opencontainers.image.description="gRPC model server for continual learning and machine unlearning" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.lethe.variant="${VARIANT}"

RUN groupadd --system --gid 10001 lethe \
    && useradd --system --uid 10001 --gid lethe --home-dir /data --no-create-home --shell /usr/sbin/nologin lethe \
    && mkdir -p /data \
    && chown lethe:lethe /data

COPY --from=builder /opt/lethe /opt/lethe
COPY migrations /opt/lethe/migrations

# Containers listen on all interfaces; SQLite and every data file live in /data.
ENV PATH=/opt/lethe/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LETHE_MIGRATIONS_DIR=/opt/lethe/migrations \
    LETHE_DATA_DIR=/data \
    LETHE_SERVER_HOST=0.0.0.0 \
    LETHE_SERVER_PORT=50051 \
    LETHE_SERVER_METRICS_HOST=0.0.0.0 \
    LETHE_SERVER_METRICS_PORT=9464

VOLUME ["/data"]
EXPOSE 50051 9464
WORKDIR /data
USER 10001:10001

# Readiness through grpc.health.v1 (service lethe.v1.Lethe): healthy once the schema is checked and
# the model loaded, unhealthy while shutting down. Plaintext only: with server.tls_cert set, override it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os,sys,grpc;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;c=grpc.insecure_channel('127.0.0.1:'+os.environ.get('LETHE_SERVER_PORT','50051'));r=g.HealthStub(c).Check(h.HealthCheckRequest(service='lethe.v1.Lethe'),timeout=4);sys.exit(0 if r.status==h.HealthCheckResponse.SERVING else 1)"]

# SIGTERM drains: readiness NOT_SERVING, in-flight RPCs finish, the running job gets server.grace_seconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["lethe"]
CMD ["serve"]
