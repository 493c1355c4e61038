"""Tiny random Hugging Face Qwen3 folders, built with transformers (the reference implementation)."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # != hidden/heads (16); vLLM's CPU attention needs head_dim >= 32
    max_position_embeddings=512,
    rope_theta=10000.0,
    eos_token_id=2,
    bos_token_id=1,
)


def make_hf_model(tie: bool, seed: int = 0, **overrides) -> transformers.Qwen3ForCausalLM:
    """A random fp32 Qwen3ForCausalLM whose every weight (norms included) is non-trivial."""
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**{**TINY, "tie_word_embeddings": tie, **overrides})
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    return model


def save_hf_model(model: transformers.Qwen3ForCausalLM, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder
