#!/usr/bin/env bash
# Starts the Kimina Lean Server (docker image of the original recipe) on port ${LEAN_SERVER_PORT:-80}.
#   LEAN_SERVER_PORT     host port to publish (default 80; the container listens on 8000)
#   LEAN_SERVER_API_KEY  optional: the server then requires `Authorization: Bearer <key>`
#   LEAN_SERVER_IMAGE    image (default projectnumina/kimina-lean-server:2.0.0)
# Then, for training:  export LEAN_SERVER_API_URL=http://localhost:${LEAN_SERVER_PORT:-80}
set -euo pipefail
port=${LEAN_SERVER_PORT:-80}
image=${LEAN_SERVER_IMAGE:-projectnumina/kimina-lean-server:2.0.0}
key_args=()
if [ -n "${LEAN_SERVER_API_KEY:-}" ]; then key_args=(-e LEAN_SERVER_API_KEY); fi
docker run -d --name kimina-lean-server --restart unless-stopped -p "${port}:8000" "${key_args[@]}" "$image"
for _ in $(seq 1 120); do
  if curl -fsS "http://localhost:${port}/health" >/dev/null 2>&1; then
    echo "Lean server healthy on http://localhost:${port}"; exit 0
  fi
  sleep 2
done
echo "Lean server did not become healthy; see: docker logs kimina-lean-server" >&2
exit 1
