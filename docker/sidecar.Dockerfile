# syntax=docker/dockerfile:1
# The routing sidecar: `modelplane serve`. Core dependencies only (no kopf), non-root, read-only
# root filesystem friendly (bytecode compiled at build time).
#
#   docker build -f docker/sidecar.Dockerfile -t ghcr.io/modelplane/sidecar:0.1.0 .
#
# The base is pinned to an exact Python release; pin its digest too when publishing
# (`docker buildx imagetools inspect python:3.11.11-slim-bookworm`).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar sidecar
COPY operator operator
COPY cli cli
RUN python -m venv /opt/modelplane \
 && /opt/modelplane/bin/pip install . \
 && /opt/modelplane/bin/modelplane serve --help >/dev/null

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/modelplane /opt/modelplane
ENV PATH=/opt/modelplane/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A numeric user, so the kubelet can enforce runAsNonRoot.
USER 65532:65532
EXPOSE 15000 15021
ENTRYPOINT ["modelplane"]
CMD ["serve", "--help"]
