#!/usr/bin/env bash
# The GPU measurements of issues 3 and 4 on one CUDA GPU with JAX installed (e.g. the project's lent H100: JAX,
# torch and transformers are preinstalled there; vLLM cannot be carried to it, so its rows need another host).
# Name the rows to run; each is capped at 280 s, so two fit in one 10-minute device command. The output also
# goes to $OUT/gpu_suite.log (default benchmarks/out).
#
#   bash benchmarks/gpu_suite.sh cudnn triton          # issue 3: Qwen3-1.7B update, 16k-token micro-batches
#   bash benchmarks/gpu_suite.sh save-dots 0.6b        # remat keeping matmul outputs; the 0.6B shape
#   bash benchmarks/gpu_suite.sh xla-4k rows-8k        # XLA attention (4k tokens: 16k would not fit); 8k rows
#   bash benchmarks/gpu_suite.sh rollout               # issue 4: JAX sampler tokens/s, trainer-side weight push
#   bash benchmarks/gpu_suite.sh rollout-varied        # JAX sampler, RL-like lengths, continuous batching
#
# PEAK_TFLOPS (default 989: H100 SXM / H200 bf16 dense) is the MFU denominator; PYTHON picks the interpreter.
set -uo pipefail
[ $# -gt 0 ] || { sed -n '2,13p' "$0"; exit 2; }
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
py=${PYTHON:-python3}
step=(benchmarks/train_step.py --dtype bfloat16 --param-dtype float32 --peak-tflops "${PEAK_TFLOPS:-989}" --steps 5
      --micro-batches 4)
big=(--shape qwen3-1.7b --tokens-per-micro-batch 16384)

bench() {
  echo "## $*"
  timeout 280 "$py" "$@" || echo "## exit status $?"
}

{
  date -u
  "$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
  for row in "$@"; do
    case "$row" in
      cudnn) bench "${step[@]}" "${big[@]}" --attention cudnn --remat full ;;
      triton) bench "${step[@]}" "${big[@]}" --attention triton --remat full ;;
      save-dots) bench "${step[@]}" "${big[@]}" --attention cudnn --remat save_dots ;;
      0.6b) bench "${step[@]}" --shape qwen3-0.6b --tokens-per-micro-batch 16384 --attention cudnn --remat full ;;
      xla-4k) bench "${step[@]}" --shape qwen3-1.7b --tokens-per-micro-batch 4096 --attention xla --remat full ;;
      rows-8k) bench "${step[@]}" "${big[@]}" --row-length 8192 --attention cudnn --remat full ;;
      rollout) bench benchmarks/rollout.py --shape qwen3-0.6b qwen3-1.7b --dtype bfloat16 --engines jax stream \
                 --prompts 64 --n 8 --max-tokens 1024 --max-batch-rows 256 ;;  # 256 rows: 32 GiB of KV cache
      rollout-varied) bench benchmarks/rollout.py --shape qwen3-1.7b --dtype bfloat16 --engines jax --syncs 1 \
                 --prompts 64 --n 8 --max-tokens 4096 --mean-tokens 1024 --max-batch-rows 256 \
                 --kv-cache-bytes 17179869184 ;;  # the recipe's 16 GiB pool: rows admitted by free blocks
      *) echo "unknown row $row: cudnn triton save-dots 0.6b xla-4k rows-8k rollout rollout-varied" ;;
    esac
  done
} 2>&1 | tee -a "$out/gpu_suite.log"
