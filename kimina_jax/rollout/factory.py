"""The rollout engine a recipe's `rollout` section asks for, fed the trainer's model."""
from __future__ import annotations

import os
from pathlib import Path

from kimina_jax.errors import KiminaError
from kimina_jax.models import Qwen3Config, Qwen3ForCausalLM
from kimina_jax.rollout.base import RolloutEngine, find_eos_token_ids
from kimina_jax.rollout.jax_sampler import JaxSampler


def share_accelerator_with_vllm(rollout_cfg) -> None:
    """With vLLM in this process, JAX must leave it GPU memory: `rollout.vllm.jax_memory_fraction`, or allocate on
    demand. Training and evaluation call it before JAX initialises its backends (XLA reads these variables once)."""
    if rollout_cfg.engine != "vllm":
        return
    fraction = rollout_cfg.vllm.jax_memory_fraction
    if fraction is not None:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(fraction)
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def make_engine(
    rollout_cfg, model: Qwen3ForCausalLM | None, tokenizer, model_dir: str | Path | None = None
) -> RolloutEngine:
    """`jax`: the built-in sampler on `model`. `vllm`: vLLM started from `model_dir` (an HF folder; random
    weights when it holds only config.json), then given `model`'s weights; with `model` None (evaluation of an
    HF folder) vLLM keeps the folder's own weights and no Flax copy is needed. `vllm-server`: the recipe's
    remote servers, given `model`'s weights through `rollout.servers.weights_dir` (with `model` None they keep
    what they serve)."""
    if rollout_cfg.engine == "jax":
        if model is None:
            raise KiminaError("rollout.engine 'jax' samples with the Flax model: load it first")
        eos = find_eos_token_ids(model.config, tokenizer, model_dir)
        return JaxSampler.from_config(rollout_cfg.jax, model, tokenizer=tokenizer, eos_token_ids=eos)
    if rollout_cfg.engine == "vllm":
        from kimina_jax.rollout.vllm_engine import VllmEngine

        if model_dir is None:
            raise KiminaError("rollout.engine 'vllm' needs the model's HF folder (config.json) to start from")
        has_weights = any(Path(model_dir).glob("*.safetensors"))
        if model is None and not has_weights:
            raise KiminaError(f"{model_dir}: no *.safetensors weights, and no model given to push into vLLM")
        # vLLM adds generation_config.json's EOS ids by itself; the JAX sampler is given the same set above.
        engine = VllmEngine.from_config(
            rollout_cfg.vllm, model_dir, tokenizer=tokenizer,
            load_format="auto" if has_weights else "dummy",
        )
        if model is not None:
            engine.update_weights(model)
        return engine
    if rollout_cfg.engine == "vllm-server":
        from kimina_jax.rollout.vllm_server import VllmServerEngine

        if model is None and model_dir is None:
            raise KiminaError("rollout.engine 'vllm-server' needs the model or its HF folder (config.json)")
        config = model.config if model is not None else Qwen3Config.from_pretrained(model_dir)
        # The servers run with `--generation-config vllm`: every EOS id is sent with each request.
        engine = VllmServerEngine.from_config(
            rollout_cfg.servers, config, tokenizer=tokenizer,
            eos_token_ids=find_eos_token_ids(config, tokenizer, model_dir),
        )
        if model is not None:
            engine.update_weights(model)
        return engine
    raise KiminaError(
        f"rollout.engine {rollout_cfg.engine!r} is not available here (choose 'jax', 'vllm' or 'vllm-server')"
    )
