# The Triage service image. One image, three roles (compose.yaml and k8s/ use all three):
#   API:       triage serve            (the default command)
#   worker:    triage worker           (scoring; CUDA when the host passes a GPU through)
#   one-shot:  triage migrate          (schema, before a rollout)
# Build:  docker build -t triage .
# Run:    docker run -p 8000:8000 -v triage-data:/var/lib/triage/data triage
# A CPU-only image (no nvidia-* wheels): --build-arg TORCH_INDEX_URL=<PyTorch CPU wheel index URL>
# (PyPI's torch for Linux is the CUDA build; docs/operations.md lists what each image weighs.)
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TORCH_INDEX_URL=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY pyproject.toml README.md ./
COPY audit ./audit
COPY models ./models
COPY triage_api ./triage_api
# torch (and torchvision) first when another index is given, at the versions pyproject.toml pins;
# `pip install .` then finds them satisfied.
RUN python -m venv /opt/triage \
    && if [ -n "$TORCH_INDEX_URL" ]; then \
         mapfile -t pins < <(grep -oE '"torch(vision)?==[^"]+"' pyproject.toml | tr -d '"') \
         && /opt/triage/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "${pins[@]}"; \
       fi \
    && /opt/triage/bin/pip install --no-cache-dir .

FROM python:${PYTHON_VERSION}-slim-bookworm
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="triage" \
      org.opencontainers.image.description="On-premise AI triage for medical imaging: risk-ranked worklist, audit trail, appeals" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Triage"

# The data directory (and compose's checkpoint-copy directory) exist, owned by the service
# user, before VOLUME: a new volume is initialised from them (a VOLUME path the image lacks
# is created root-owned, and the service could not write it).
RUN groupadd --system --gid 10001 triage \
    && useradd --system --uid 10001 --gid triage --home-dir /var/lib/triage --shell /usr/sbin/nologin triage \
    && install -d -o triage -g triage -m 0700 /var/lib/triage /var/lib/triage/data /var/lib/triage/audit
COPY --from=build /opt/triage /opt/triage

# Inside a container the service must listen beyond loopback; publish the port explicitly.
ENV PATH=/opt/triage/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TRIAGE_HOST=0.0.0.0 \
    TRIAGE_DATA_DIR=/var/lib/triage/data
USER 10001:10001
WORKDIR /var/lib/triage
VOLUME ["/var/lib/triage/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["triage", "serve"]
