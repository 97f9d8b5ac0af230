# syntax=docker/dockerfile:1
# roomcast node image: `docker build -t roomcast .` (k8s/README.md says how to push and deploy it).
#
# Two stages on the same slim Python base: `build` installs the project into a virtualenv at
# /opt/roomcast (compilers there only, for a platform without binary wheels); the final stage
# copies that virtualenv, a static tini and nothing else, and runs as an unprivileged user.
# tests/test_k8s_image.py runs this file's install steps into a fresh virtualenv and starts the
# node the way ENTRYPOINT does; keep the RUN lines it knows about (see that test) in this form.

# The Python the suite runs on (requires-python >= 3.11). Pin it by digest in your registry.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# tini (its static build is copied below) and a C toolchain for dependencies without a wheel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini build-essential \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY node /src/node
# A virtualenv without pip of its own (the base image's pip installs into it), so the final image
# carries no installer. pip compiles the bytecode now: the root filesystem is read-only at run time.
RUN python -m venv --without-pip /opt/roomcast \
    && python -m pip --python /opt/roomcast/bin/python install --no-cache-dir /src

FROM ${PYTHON_IMAGE}
COPY --from=build /usr/bin/tini-static /usr/bin/tini
COPY --from=build /opt/roomcast /opt/roomcast
RUN groupadd --system --gid 10001 roomcast \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin roomcast
# In a container both ports must be reachable from outside it: the node's defaults bind
# loopback. Kubernetes sets the same values again through the ConfigMap (k8s/base/config.env).
ENV PATH=/opt/roomcast/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ROOMCAST_HOST=0.0.0.0 \
    ROOMCAST_API_HOST=0.0.0.0 \
    ROOMCAST_LOG_FORMAT=json
# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
# 8000: clients (WebSocket /ws, /ws/chat/{room}, /, /healthz, /readyz).
# 9000: internal (/livez, /readyz, /metrics, /admin/drain, the server API). Never publish it.
EXPOSE 8000 9000
# tini is PID 1: it forwards SIGTERM to the node (which drains on it) and reaps the processes
# that exec probes and the preStop hook leave behind. Exec form: no shell in between.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/roomcast/bin/roomcast", "node"]
CMD []
