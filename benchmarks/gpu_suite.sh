#!/usr/bin/env bash
# The GPU measurements of issues 3 and 4, for one CUDA GPU with JAX installed (e.g. the project's lent H100: JAX,
# torch and transformers are preinstalled there; vLLM cannot be carried to it, so its rows need another host).
# Each part fits in one 10-minute device command; the tables also go to $OUT/<part>.log (default benchmarks/out).
#
#   bash benchmarks/gpu_suite.sh train      # Qwen3-1.7B GRPO update, 16k-token micro-batches: cudnn, triton
#   bash benchmarks/gpu_suite.sh variants   # xla attention at 4k tokens, the 0.6B shape, 8k rows
#   bash benchmarks/gpu_suite.sh rollout    # JAX sampler tokens/s and the trainer's half of the weight push
#
# PEAK_TFLOPS (default 989: H100 SXM / H200 bf16 dense) is the MFU denominator; PYTHON picks the interpreter.
set -uo pipefail
part=${1:?usage: gpu_suite.sh train|variants|rollout}
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
py=${PYTHON:-python3}
peak=${PEAK_TFLOPS:-989}
step=(benchmarks/train_step.py --dtype bfloat16 --param-dtype float32 --peak-tflops "$peak" --steps 5)

bench() {
  echo "## $*"
  timeout 420 "$py" "$@" || echo "## exit status $?"
}

{
  date -u
  "$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
  case "$part" in
    train)
      bench "${step[@]}" --shape qwen3-1.7b --tokens-per-micro-batch 16384 --micro-batches 4 --attention cudnn
      bench "${step[@]}" --shape qwen3-1.7b --tokens-per-micro-batch 16384 --micro-batches 4 --attention cudnn \
        --remat save_dots
      bench "${step[@]}" --shape qwen3-1.7b --tokens-per-micro-batch 16384 --micro-batches 4 --attention triton ;;
    variants)
      bench "${step[@]}" --shape qwen3-1.7b --tokens-per-micro-batch 4096 --micro-batches 4 --attention xla
      bench "${step[@]}" --shape qwen3-0.6b --tokens-per-micro-batch 16384 --micro-batches 4 --attention cudnn
      bench "${step[@]}" --shape qwen3-1.7b --tokens-per-micro-batch 16384 --row-length 8192 --micro-batches 4 \
        --attention cudnn ;;
    rollout)
      bench benchmarks/rollout.py --shape qwen3-0.6b qwen3-1.7b --dtype bfloat16 --engines jax stream \
        --prompts 64 --n 8 --max-tokens 1024 ;;
    *) echo "unknown part $part: train, variants or rollout"; exit 2 ;;
  esac
} 2>&1 | tee "$out/$part.log"
