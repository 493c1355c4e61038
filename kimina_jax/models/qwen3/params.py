"""Qwen3's parameter table: for every tensor its HF name, its path in `Qwen3ForCausalLM`, the transform between
the two layouts and its logical axes. Load, export and the vLLM weight push (models/hf.py) and the sharding rules
(parallel/) read it; nothing else knows parameter names.
"""
from __future__ import annotations

import dataclasses

from kimina_jax.models.config import Qwen3Config
from kimina_jax.models.params import ParamSpec

HEADS, KV_HEADS = ("heads", "head_dim"), ("kv_heads", "head_dim")  # attention projections' flattened columns
_LAYER = "model.layers.{layer}."

EMBEDDING = ParamSpec("model.embed_tokens.weight", "model.embed_tokens.embedding", ("vocab", "embed"))
# Per decoder layer: (HF tensor, our path: both after model.layers.{layer}.; our logical axes; HF is [out, in])
LAYER = tuple(ParamSpec(_LAYER + hf, _LAYER + ours, axes, transpose) for hf, ours, axes, transpose in (
    ("input_layernorm.weight",           "input_layernorm.weight",           ("norm",),               False),
    ("self_attn.q_proj.weight",          "self_attn.q_proj.kernel",          ("embed", HEADS),        True),
    ("self_attn.k_proj.weight",          "self_attn.k_proj.kernel",          ("embed", KV_HEADS),     True),
    ("self_attn.v_proj.weight",          "self_attn.v_proj.kernel",          ("embed", KV_HEADS),     True),
    ("self_attn.o_proj.weight",          "self_attn.o_proj.kernel",          (HEADS, "embed"),        True),
    ("self_attn.q_norm.weight",          "self_attn.q_norm.weight",          ("head_dim",),           False),
    ("self_attn.k_norm.weight",          "self_attn.k_norm.weight",          ("head_dim",),           False),
    ("post_attention_layernorm.weight",  "post_attention_layernorm.weight",  ("norm",),               False),
    ("mlp.gate_proj.weight",             "mlp.gate_proj.kernel",             ("embed", "mlp"),        True),
    ("mlp.up_proj.weight",               "mlp.up_proj.kernel",               ("embed", "mlp"),        True),
    ("mlp.down_proj.weight",             "mlp.down_proj.kernel",             ("mlp", "embed"),        True),
))
NORM = ParamSpec("model.norm.weight", "model.norm.weight", ("norm",))
LM_HEAD = ParamSpec("lm_head.weight", "lm_head.kernel", ("embed", "vocab"), transpose=True)  # untied models only
PARAMS = (EMBEDDING, *LAYER, NORM, LM_HEAD)


def param_names(config: Qwen3Config, *, tied_lm_head: bool = False) -> list[ParamSpec]:
    """Every HF tensor of the architecture, in HF's usual order.

    `tied_lm_head`: a tied model lists `lm_head.weight` too (the embedding again), for vLLM's in-place reload,
    which refreshes only the layers it is given a tensor for (see rollout/weights.py).
    """
    names = [EMBEDDING, *(spec.at_layer(i) for i in range(config.num_hidden_layers) for spec in LAYER), NORM]
    if not config.tie_word_embeddings:
        names.append(LM_HEAD)
    elif tied_lm_head:
        names.append(dataclasses.replace(EMBEDDING, hf_name=LM_HEAD.hf_name))
    return names
