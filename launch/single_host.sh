#!/usr/bin/env bash
# One host, all its accelerators: python -m kimina_jax.train with a recipe and dotted overrides.
#   RECIPE                 configs/<name>.yaml (default configs/kimina_prover_1.7B.yaml)
#   LEAN_SERVER_API_URL    the Lean server (see launch/lean_server.sh); LEAN_SERVER_API_KEY if it has one
#   RUN_DIR                run folder (default runs/<experiment name>); rerunning resumes from it
#   XLA_PYTHON_CLIENT_MEM_FRACTION  JAX's share of a GPU it shares with vLLM (recipe: rollout.vllm.jax_memory_fraction)
# Usage: launch/single_host.sh [dotted.key=value ...]
set -euo pipefail
recipe=${RECIPE:-configs/kimina_prover_1.7B.yaml}
: "${LEAN_SERVER_API_URL:?set LEAN_SERVER_API_URL (e.g. http://localhost after launch/lean_server.sh)}"
args=(--config "$recipe")
if [ -n "${RUN_DIR:-}" ]; then args+=(--run-dir "$RUN_DIR"); fi
exec python -m kimina_jax.train "${args[@]}" "$@"
