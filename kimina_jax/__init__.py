"""kimina-jax: GRPO training of Qwen3 Lean 4 provers (Kimina-Prover-RL) in JAX."""

__version__ = "0.1.0"
