# The Triage service, CPU image. Its commands are the README's: keep them identical.
# Build: docker build -t triage .   Run: docker run -p 8000:8000 -v triage-var:/app/var triage
FROM python:3.11-slim-bookworm

RUN useradd --create-home --uid 10001 triage
WORKDIR /app
COPY --chown=triage:triage . /app
USER triage

RUN python3.11 -m venv .venv && .venv/bin/pip install -e .

# Inside a container the service must listen beyond loopback; publish the port explicitly.
ENV TRIAGE_HOST=0.0.0.0 \
    TRIAGE_DATA_DIR=/app/var
EXPOSE 8000
VOLUME ["/app/var"]
HEALTHCHECK --interval=30s --timeout=5s CMD .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD [".venv/bin/triage", "serve"]
