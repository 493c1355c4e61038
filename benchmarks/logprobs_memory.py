"""Peak temporary memory of per-token log-probs + entropy: chunked lm_head vs full [tokens, vocab] logits.

Nothing is executed: each variant is compiled for abstract inputs and XLA's `memory_analysis()` reports the
temporary buffers it plans (works on CPU, GPU and TPU alike). Forward = log-probs and entropies; forward +
backward = the gradient of their sum with respect to the hidden states and the lm_head.

    python benchmarks/logprobs_memory.py --tokens 4096 16384 32768 --hidden 2048 --vocab 151936
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from kimina_jax.grpo import chunked_logprobs

MIB = 1 << 20


def full_logits(hidden, lm_head, targets, temperature):
    """The naive way: all logits of the batch at once."""
    logits = jnp.dot(hidden, lm_head, preferred_element_type=jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def temp_bytes(fn, *abstract_args) -> int:
    return jax.jit(fn).lower(*abstract_args).compile().memory_analysis().temp_size_in_bytes


def measure(variant, rows, length, hidden, vocab, dtype) -> tuple[float, float]:
    args = (
        jax.ShapeDtypeStruct((rows, length, hidden), dtype),
        jax.ShapeDtypeStruct((hidden, vocab), dtype),
        jax.ShapeDtypeStruct((rows, length), jnp.int32),
    )

    def total(h, w, t):
        logp, entropy = variant(h, w, t, 1.0)
        return jnp.sum(logp) + jnp.sum(entropy)

    forward = temp_bytes(lambda h, w, t: variant(h, w, t, 1.0), *args)
    backward = temp_bytes(jax.grad(total, argnums=(0, 1)), *args)
    return forward / MIB, backward / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="tokens per micro-batch")
    parser.add_argument("--rows", type=int, default=1, help="packed rows the tokens are split into")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per lm_head chunk")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    chunked = lambda h, w, t, temperature: chunked_logprobs(h, w, t, temperature, args.chunk)  # noqa: E731

    print(f"backend {jax.default_backend()}, hidden {args.hidden}, vocab {args.vocab}, {args.dtype} hidden states, "
          f"chunk {args.chunk} tokens; temp = XLA's planned temporary buffers")
    header = (f"| {'tokens':>7} | {'variant':<8} | {'fwd temp MiB':>12} | {'fwd+bwd temp MiB':>16} "
              f"| {'[tokens,vocab] f32 MiB':>22} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for tokens in args.tokens:
        length = tokens // args.rows
        logits_mib = tokens * args.vocab * 4 / MIB
        for name, variant in (("full", full_logits), ("chunked", chunked)):
            forward, backward = measure(variant, args.rows, length, args.hidden, args.vocab, dtype)
            print(f"| {tokens:>7} | {name:<8} | {forward:>12.1f} | {backward:>16.1f} | {logits_mib:>22.1f} |")


if __name__ == "__main__":
    main()
