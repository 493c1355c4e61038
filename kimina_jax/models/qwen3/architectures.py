"""The published Qwen3 dense architectures (their config.json numbers), so that a recipe naming a Hub model can be
planned (`kimina_jax.plan`) without downloading it. Kimina-Prover-Distill models are fine-tunes of these."""
from __future__ import annotations

from kimina_jax.models.config import Qwen3Config

_QWEN3_COMMON = dict(vocab_size=151936, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
                     rms_norm_eps=1e-6, max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645)
QWEN3_ARCHITECTURES: dict[str, dict] = {
    "Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       tie_word_embeddings=True),
    "Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       tie_word_embeddings=True),
    "Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     tie_word_embeddings=True),
    "Qwen3-8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     tie_word_embeddings=False),
}
# Hub names -> the architecture they share.
KNOWN_MODELS: dict[str, str] = {
    **{f"Qwen/{name}": name for name in QWEN3_ARCHITECTURES},
    **{f"Qwen/{name}-Base": name for name in QWEN3_ARCHITECTURES},
    "AI-MO/Kimina-Prover-Distill-0.6B": "Qwen3-0.6B",
    "AI-MO/Kimina-Prover-Distill-1.7B": "Qwen3-1.7B",
    "AI-MO/Kimina-Prover-Distill-8B": "Qwen3-8B",
}


def known_architecture(hub_name: str) -> Qwen3Config | None:
    """The architecture of a known Hub model name, or None."""
    name = KNOWN_MODELS.get(hub_name)
    return None if name is None else Qwen3Config(**_QWEN3_COMMON, **QWEN3_ARCHITECTURES[name])
