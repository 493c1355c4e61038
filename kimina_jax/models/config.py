"""Qwen3 architecture numbers, read from (and written back to) a Hugging Face `config.json`."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from kimina_jax.errors import KiminaError

_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """The dense Qwen3 architecture (SPEC 2). `extra` keeps the rest of config.json for a faithful export."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: tuple[tuple[str, str], ...] = ()  # (key, JSON text): hashable, so the config can be static under jit

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "max_position_embeddings")
        bad = [f"{name} = {getattr(self, name)}" for name in sizes if not 0 < getattr(self, name) < math.inf]
        if bad:
            raise KiminaError(f"config: {', '.join(bad)}: must be positive and finite")
        if self.num_attention_heads % self.num_key_value_heads:
            raise KiminaError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + 2 * d
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * per_layer + h + head

    def training_flops(self, sequence_lengths) -> float:
        """Model FLOPs of a forward + backward pass over sequences of these lengths (the MFU numerator):
        6 x matmul parameters per token (the input embedding is a lookup, not a matmul; a tied head is one)
        plus causal attention, 6 x layers x heads x head_dim x length^2 per sequence. Remat is not counted."""
        lengths = np.asarray(sequence_lengths, dtype=np.float64)
        matmul_params = self.num_params - (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)
        attention = 6 * self.num_hidden_layers * self.num_attention_heads * self.head_dim
        return 6.0 * matmul_params * float(lengths.sum()) + attention * float(np.sum(lengths**2))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "Qwen3Config":
        """Validates an HF config dict; anything this implementation does not compute is rejected."""
        _reject_unsupported(raw, source)
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise KiminaError(f"{source}: missing required key(s) {missing}")
        heads = int(raw["num_attention_heads"])
        known = {f.name for f in dataclasses.fields(cls)} | {"rope_parameters"}
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
            rope_theta=float(_rope_theta(raw)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 40960)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            extra=tuple(sorted((k, json.dumps(v)) for k, v in raw.items() if k not in known)),
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Qwen3Config":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise KiminaError(f"{folder}: no config.json (not a Hugging Face model folder)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise KiminaError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(raw, source=str(path))

    def to_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """The HF config.json content for this architecture (Qwen3ForCausalLM)."""
        raw = {k: json.loads(v) for k, v in self.extra}
        raw.update(
            architectures=["Qwen3ForCausalLM"],
            model_type="qwen3",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            hidden_act="silu",
            attention_bias=False,
            rope_scaling=None,
            use_sliding_window=False,
            dtype=dtype,
            torch_dtype=dtype,  # the key transformers < 5 reads
        )
        return raw


def _rope_theta(raw: dict[str, Any]) -> float:
    # transformers >= 5 writes `rope_parameters`; older versions a top-level `rope_theta`.
    params = raw.get("rope_parameters") or {}
    return params.get("rope_theta", raw.get("rope_theta", 1_000_000.0))


def _reject_unsupported(raw: dict[str, Any], source: str) -> None:
    model_type = raw.get("model_type")
    if model_type != "qwen3":
        raise KiminaError(f"{source}: model_type {model_type!r} is not supported (only dense 'qwen3')")
    archs = raw.get("architectures") or ["Qwen3ForCausalLM"]
    if archs != ["Qwen3ForCausalLM"]:
        raise KiminaError(f"{source}: architectures {archs} not supported (only ['Qwen3ForCausalLM'])")
    if raw.get("num_experts") or raw.get("num_local_experts"):
        raise KiminaError(f"{source}: mixture-of-experts configs are not supported")
    rope_scaling = raw.get("rope_scaling")
    rope_type = (raw.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_scaling or rope_type != "default":
        raise KiminaError(
            f"{source}: rope scaling {rope_scaling or rope_type!r} is not implemented (only default RoPE)"
        )
    if raw.get("use_sliding_window"):
        raise KiminaError(f"{source}: use_sliding_window=true is not implemented")
    if raw.get("attention_bias"):
        raise KiminaError(f"{source}: attention_bias=true is not implemented")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise KiminaError(f"{source}: hidden_act {act!r} not supported (only 'silu')")
