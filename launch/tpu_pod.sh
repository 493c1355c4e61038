#!/usr/bin/env bash
# The same command on every worker of a TPU pod slice. JAX reads the pod's metadata itself
# (jax.distributed.initialize() with no arguments), so no coordinator flags are needed.
#   TPU_NAME, ZONE, PROJECT  the pod slice (gcloud)
#   RECIPE                   recipe path inside the checkout on the workers
#   RUN_DIR                  a gs:// or shared path every worker can write (orbax writes from all processes)
#   LEAN_SERVER_API_URL      reachable from worker 0 (only process 0 talks to the Lean server)
# Usage: launch/tpu_pod.sh [dotted.key=value ...]
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}" "${LEAN_SERVER_API_URL:?}" "${RUN_DIR:?}"
recipe=${RECIPE:-configs/kimina_prover_1.7B.yaml}
overrides=$(printf ' %q' "$@")
cmd="cd ~/kimina-jax && LEAN_SERVER_API_URL=$(printf %q "$LEAN_SERVER_API_URL") \
LEAN_SERVER_API_KEY=$(printf %q "${LEAN_SERVER_API_KEY:-}") \
python -m kimina_jax.train --config $recipe --run-dir $(printf %q "$RUN_DIR") rollout.engine=jax$overrides"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all --command "$cmd"
