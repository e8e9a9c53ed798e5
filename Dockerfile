# The spendgate server. Alone it runs the embedded mode (in-process Redis, SQLite ledger in the data volume)
# and prints a root token, an admin token per account and an agent token per wallet at start:
#   docker build -t spendgate .
#   docker run --rm -p 127.0.0.1:50051:50051 -v spendgate-data:/var/lib/spendgate \
#     spendgate serve --host 0.0.0.0 --plan examples/fleet.yaml
# docker-compose.yml runs it next to Redis and PostgreSQL. Auth is on; set SPENDGATE_ADMIN_TOKEN (the root
# token) for a deployment, and TLS (SPENDGATE_TLS_*) before publishing the port beyond localhost.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    SPENDGATE_DATA_DIR=/var/lib/spendgate

WORKDIR /app

# pyproject.toml names README.md as the package's long description, so both are needed to build.
# The generated gRPC code is committed under src/, so the install needs no protoc.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . \
    && rm -rf build src/*.egg-info

COPY examples ./examples

# Run as an unprivileged user; the data directory (the embedded mode's SQLite ledger) is the only place it
# may write. Mount a volume there to keep the embedded ledger across containers.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin spendgate \
    && mkdir -p /var/lib/spendgate \
    && chown spendgate /var/lib/spendgate
USER spendgate

# gRPC; Prometheus /metrics when SPENDGATE_METRICS_PORT=9464 (and SPENDGATE_METRICS_HOST=0.0.0.0) are set.
EXPOSE 50051 9464

# Healthy only while the server answers the standard gRPC health check with SERVING, which it stops doing
# when Redis is unreachable. The health service needs no token; with TLS on, replace this check.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; channel = grpc.insecure_channel('127.0.0.1:' + os.environ.get('SPENDGATE_PORT', '50051')); reply = g.HealthStub(channel).Check(h.HealthCheckRequest(service='spendgate.v1.SpendService'), timeout=3); sys.exit(reply.status != h.HealthCheckResponse.SERVING)"]

ENTRYPOINT ["spendgate"]
CMD ["serve", "--host", "0.0.0.0"]
