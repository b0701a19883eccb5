#!/usr/bin/env bash
# Build the image and start it the way a site would, without a container daemon:
#   podman build --isolation=chroot, then the image's own command under
#   buildah run --isolation=chroot, as the image's non-root user, against a writable
#   data volume, until /healthz answers; then the HEALTHCHECK probe from inside the image.
# Prints the image size, build time and cold start to /healthz (docs/operations.md).
# Costs several minutes of CPU and downloads torch (GBs): not part of tests/run.sh.
# Usage: deploy/check.sh [extra podman build args, e.g. --build-arg TORCH_INDEX_URL=...]
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in podman buildah python3; do
  command -v "$tool" >/dev/null || { echo "deploy/check.sh needs $tool (apt-get install -y podman buildah)" >&2; exit 2; }
done
tag=${TRIAGE_CHECK_TAG:-localhost/triage:check}

started=$(date +%s)
podman build --isolation=chroot --layers --tag "$tag" "$@" .
built=$(date +%s)
size=$(podman image inspect --format '{{.Size}}' "$tag")
user=$(podman image inspect --format '{{.Config.User}}' "$tag")
read -r -a command <<<"$(podman image inspect --format '{{range .Config.Cmd}}{{.}} {{end}}' "$tag")"
[ "${user%%:*}" != 0 ] && [ -n "$user" ] || { echo "FAIL: the image runs as root ($user)" >&2; exit 1; }

data=$(mktemp -d /tmp/triage-check.XXXXXX)
chown "$user" "$data" && chmod 700 "$data"  # a site's volume belongs to the service user
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
container=$(buildah from "$tag")
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  buildah rm "$container" >/dev/null 2>&1 || true
  rm -rf "$data"
}
trap cleanup EXIT

# chroot isolation shares the host's network: the service binds the host's loopback.
launched=$(date +%s)
buildah run --isolation=chroot --volume "$data:/var/lib/triage/data" \
  --env TRIAGE_HOST=127.0.0.1 --env TRIAGE_PORT="$port" "$container" -- "${command[@]}" \
  >"$data.log" 2>&1 &
pid=$!
ready=""
for _ in $(seq 1 300); do
  if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/healthz', timeout=2)" 2>/dev/null; then
    ready=$(date +%s); break
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 1
done
if [ -z "$ready" ]; then
  echo "FAIL: /healthz never answered; the service's output:" >&2; tail -n 40 "$data.log" >&2; exit 1
fi
[ -f "$data/triage.db" ] || { echo "FAIL: nothing written to the data volume" >&2; exit 1; }
buildah run --isolation=chroot --env TRIAGE_PORT="$port" "$container" -- \
  python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/healthz', timeout=4)"
echo "ok: image $tag, $((size / 1000000)) MB; build $((built - started)) s; cold start to /healthz $((ready - launched)) s"
