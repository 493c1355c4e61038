#!/usr/bin/env bash
# Starts one vLLM OpenAI-compatible server for rollout.engine 'vllm-server' (one per GPU or host; list their URLs
# in rollout.servers.urls). The trainer writes new weights to rollout.servers.weights_dir after every step and
# asks each server to reload them, so that folder must be readable here at the same path.
#   MODEL_DIR (1st argument)  HF folder to start from: the trainer's starting checkpoint, or a config.json-only
#                             folder with ROLLOUT_LOAD_FORMAT=dummy (the trainer pushes its weights at start)
#   ROLLOUT_HOST              address to listen on (default 0.0.0.0)
#   ROLLOUT_PORT              port (default 8000)
#   ROLLOUT_DTYPE             bfloat16 (default), float16 or float32; the trainer writes weights in this dtype
#   ROLLOUT_MAX_MODEL_LEN     prompt + response tokens (default: the model's)
#   ROLLOUT_GPU_MEMORY_UTILIZATION  share of the GPU for vLLM (default 0.9)
#   ROLLOUT_TENSOR_PARALLEL_SIZE    GPUs per server (default 1)
#   ROLLOUT_LOAD_FORMAT       auto (default) or dummy (random weights, for a config.json-only folder)
#   ROLLOUT_SEED              sampling seed of requests without one (default 0)
#   PYTHON                    the interpreter of the venv with vLLM (default python)
# Further arguments go to vLLM as they are (on CPU: --enforce-eager --kv-cache-memory-bytes 268435456).
# Fixed here, because the engine relies on them:
#   VLLM_SERVER_DEV_MODE=1   serves /server_info, /collective_rpc (weight reload) and /reset_prefix_cache. They let
#                            whoever reaches the port run worker methods: keep the port on a private network.
#   --logprobs-mode processed_logprobs   log-probs of log_softmax(logits / temperature), the trainer's definition
#   --skip-tokenizer-init    token ids in and out; the trainer decodes text itself
#   --generation-config vllm the folder's generation_config.json does not change sampling; the trainer sends all
#                            sampling parameters and EOS ids with every request
# Usage: launch/vllm_server.sh MODEL_DIR [vllm args ...]
set -euo pipefail
model_dir=${1:?usage: launch/vllm_server.sh MODEL_DIR [vllm args ...]}
shift
args=(
  --model "$model_dir"
  --host "${ROLLOUT_HOST:-0.0.0.0}" --port "${ROLLOUT_PORT:-8000}"
  --dtype "${ROLLOUT_DTYPE:-bfloat16}"
  --gpu-memory-utilization "${ROLLOUT_GPU_MEMORY_UTILIZATION:-0.9}"
  --tensor-parallel-size "${ROLLOUT_TENSOR_PARALLEL_SIZE:-1}"
  --load-format "${ROLLOUT_LOAD_FORMAT:-auto}"
  --seed "${ROLLOUT_SEED:-0}"
  --logprobs-mode processed_logprobs
  --skip-tokenizer-init
  --generation-config vllm
  --enable-prefix-caching
)
if [ -n "${ROLLOUT_MAX_MODEL_LEN:-}" ]; then args+=(--max-model-len "$ROLLOUT_MAX_MODEL_LEN"); fi
export VLLM_SERVER_DEV_MODE=1 VLLM_NO_USAGE_STATS=1
exec "${PYTHON:-python}" -m vllm.entrypoints.openai.api_server "${args[@]}" "$@"
