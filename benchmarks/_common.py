"""What the GRPO-update rows of `paired.py` and `torch_update.py` share: the model shapes and the packed batch.

Import after putting the repository root on `sys.path` (the scripts here do), so that a worktree's own
`kimina_jax` is the one imported.
"""
from __future__ import annotations

import types

from kimina_jax.grpo.packing import PackedBatch
from kimina_jax.models import Qwen3Config
from train_step import SHAPES, synthetic_minibatch

# train_step.py's CPU shape, and issue 17's "29M-parameter shape, vocab 32k": a 32000-token tied embedding
# (16.4M) and 4 Qwen3 layers of hidden 512 (3.1M each), 29.0M parameters in all.
UPDATE_SHAPES = {
    "tiny": SHAPES["tiny"],
    "29m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64),
}


def update_batch(shape: str, tokens: int, row_length: int) -> tuple[Qwen3Config, PackedBatch]:
    """The shape's config (tied embedding) and `tokens // row_length` packed rows of two sequences each."""
    config = Qwen3Config(**UPDATE_SHAPES[shape], tie_word_embeddings=True)
    # One row per micro-batch on one device: the packing needs no row multiple beyond 1.
    batch = synthetic_minibatch(types.SimpleNamespace(rows_multiple=1), tokens // row_length, row_length, 2,
                                config.vocab_size)
    return config, batch
