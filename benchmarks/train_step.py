"""Throughput, model FLOPs utilisation, peak memory and compile count of the GRPO update (`TrainStep.update`).

A random-weight Qwen3 of a given shape (no download) is updated on synthetic packed mini-batches: rows of
`--row-length` tokens, each holding `--segments-per-row` equal prompt+response sequences, `--micro-batches`
gradient-accumulation micro-batches of `--tokens-per-micro-batch` tokens per data-parallel device.

FLOPs counted per update (model FLOPs: the recomputation of remat is not counted):
    6 * N * tokens + 6 * layers * heads * head_dim * sum over sequences of s^2
N = parameters used in matmuls (everything but the input embedding lookup; a tied embedding counts once, as the
lm_head). The second term is causal self-attention (QK^T and PV, forward + backward): the non-causal
12 * layers * heads * head_dim * s per token of PaLM's appendix B, halved for the causal mask and summed per
packed sequence. MFU = FLOPs / (step time * devices * --peak-tflops).

    python benchmarks/train_step.py --shape tiny --steps 5                            # CPU smoke run
    python benchmarks/train_step.py --shape qwen3-1.7b --tokens-per-micro-batch 16384 \\
        --micro-batches 4 --dtype bfloat16 --remat full --peak-tflops 989             # one H100
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimina_jax.config import AlgorithmConfig, OptimConfig
from kimina_jax.grpo import PackItem, TrainStep, pack_samples
from kimina_jax.models import Qwen3Config, Qwen3ForCausalLM
from kimina_jax.models.attention import ATTENTION_IMPLS, resolve_attention_impl
from kimina_jax.models.qwen3 import REMAT_POLICIES
from kimina_jax.parallel import make_mesh

# SPEC 2's table (the two models the recipe trains) and a CPU-sized one.
SHAPES = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
}
GIB = 1 << 30


def synthetic_minibatch(step: TrainStep, rows: int, row_length: int, segments: int, vocab: int, seed: int = 0):
    """`rows` rows of `segments` equal sequences (1/8 prompt), random tokens, advantages and old log-probs."""
    rng = np.random.default_rng(seed)
    length = row_length // segments
    prompt = max(1, length // 8)
    items = [
        PackItem(rng.integers(0, vocab, prompt).tolist(), rng.integers(0, vocab, length - prompt).tolist(),
                 float(rng.choice([-0.5, 0.5])), -rng.random(length - prompt).astype(np.float32))
        for _ in range(rows * segments)
    ]
    batch = pack_samples(items, (row_length,), loss_agg_mode="seq-mean-token-sum-norm",
                         max_response_len=row_length, rows_multiple=step.rows_multiple)
    assert batch.num_rows == rows, (batch.num_rows, rows)
    return batch


def peak_memory_gib(step: TrainStep, state, batch) -> tuple[float, str]:
    """Peak bytes in use on the busiest device where the runtime reports it (GPU, TPU), else XLA's plan."""
    stats = [device.memory_stats() for device in jax.local_devices()]
    if all(stats) and all("peak_bytes_in_use" in s for s in stats):
        return max(s["peak_bytes_in_use"] for s in stats) / GIB, "device peak"
    plan = step.lower_update(state, batch).compile().memory_analysis()
    planned = (plan.argument_size_in_bytes + plan.output_size_in_bytes + plan.temp_size_in_bytes
               - plan.alias_size_in_bytes)
    # The gradient pass's plan leaves out the optimizer state, resident all along (one device's shard of it).
    optimizer = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state.opt_state))
    return (planned + optimizer) / GIB, "XLA plan"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--tokens-per-micro-batch", type=int, default=None,
                        help="per data-parallel device (default: 16384, tiny: 1024)")
    parser.add_argument("--row-length", type=int, default=None, help="packed row length (default: a micro-batch)")
    parser.add_argument("--segments-per-row", type=int, default=2, help="sequences packed into one row")
    parser.add_argument("--micro-batches", type=int, default=4, help="gradient-accumulation steps per update")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="compute dtype")
    parser.add_argument("--param-dtype", choices=["bfloat16", "float32"], default="float32")
    parser.add_argument("--remat", choices=REMAT_POLICIES, default="full",
                        help="save_dots: keep the weight matmuls' outputs (more memory, less recomputation)")
    parser.add_argument("--attention", choices=ATTENTION_IMPLS, default="auto",
                        help="auto: cudnn on GPU, splash on TPU, xla elsewhere")
    parser.add_argument("--logits-chunk-tokens", type=int, default=1024)
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1: the rest of the devices)")
    parser.add_argument("--steps", type=int, default=5, help="timed updates (after one untimed compile+run)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-device peak TFLOP/s of --dtype (H100 SXM bf16 dense: 989); MFU needs it")
    args = parser.parse_args()

    config = Qwen3Config(**SHAPES[args.shape], tie_word_embeddings=True)
    tokens_per_micro = args.tokens_per_micro_batch or (1024 if args.shape == "tiny" else 16384)
    row_length = args.row_length or tokens_per_micro
    if tokens_per_micro % row_length or row_length % args.segments_per_row:
        parser.error("--tokens-per-micro-batch must be a multiple of --row-length, itself a multiple of "
                     "--segments-per-row")
    mesh = make_mesh(*(int(size) for size in args.mesh.split(",")))
    algorithm = AlgorithmConfig(micro_batch_rows=tokens_per_micro // row_length,
                                logits_chunk_tokens=args.logits_chunk_tokens, loss_norm_length=row_length)
    dtype, param_dtype = jnp.dtype(args.dtype), jnp.dtype(args.param_dtype)
    model = Qwen3ForCausalLM(config, dtype=dtype, param_dtype=param_dtype, attention_impl=args.attention,
                             remat=args.remat, rngs=nnx.Rngs(0))
    step = TrainStep(model, algorithm, OptimConfig(lr=1e-6), mesh=mesh)
    state = step.init_state(model)
    del model
    batch = synthetic_minibatch(step, step.rows_multiple * args.micro_batches, row_length, args.segments_per_row,
                                config.vocab_size)

    started = time.perf_counter()
    state, metrics = step.update(state, batch, 0)
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - started
    times = []
    for train_step in range(1, args.steps + 1):
        started = time.perf_counter()
        state, metrics = step.update(state, batch, train_step)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    step_s = float(np.median(times))
    memory, memory_source = peak_memory_gib(step, state, batch)

    devices = mesh.devices.size
    tokens = batch.tokens.size
    sequences = batch.item_length
    tflops_per_device = config.training_flops(sequences) / step_s / devices / 1e12
    mfu = f"{100 * tflops_per_device / args.peak_tflops:.1f}%" if args.peak_tflops else "n/a"
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), mesh {dict(mesh.shape)}, "
          f"{config.num_params / 1e6:.1f}M params, {args.dtype} compute / {args.param_dtype} params, "
          f"remat {args.remat}, attention {resolve_attention_impl(args.attention, dtype)}, "
          f"{batch.num_rows} rows x {row_length} tokens "
          f"({args.segments_per_row} sequences per row), {args.micro_batches} micro-batches per update, "
          f"step time = median of {args.steps}, grad_norm {float(metrics['actor/grad_norm']):.3g}")
    row = {
        "shape": args.shape,
        "tokens/update": f"{tokens}",
        "first call s": f"{first_s:.1f}",
        "step s": f"{step_s:.3f}",
        "tokens/s": f"{tokens / step_s:,.0f}",
        "TFLOP/s/device": f"{tflops_per_device:.3g}",
        "MFU": mfu,
        f"peak GiB ({memory_source})": f"{memory:.2f}",
        "compilations": str(step.compilations["update"]),
    }
    widths = [max(len(name), len(value)) for name, value in row.items()]
    print("| " + " | ".join(name.rjust(width) for name, width in zip(row, widths)) + " |")
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    print("| " + " | ".join(value.rjust(width) for value, width in zip(row.values(), widths)) + " |")


if __name__ == "__main__":
    main()
