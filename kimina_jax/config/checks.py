"""The checks of a built config: every key's range, then what no single key can say (combinations, lengths,
the mesh against the devices at hand)."""
from __future__ import annotations

import dataclasses
import importlib.util

from kimina_jax.config.options import policy_loss_options, rejection_criteria
from kimina_jax.config.ranges import check_ranges
from kimina_jax.config.sections import ENV_URL, TINY, TrainConfig
from kimina_jax.errors import KiminaError


def check_config(cfg: TrainConfig, source: str) -> None:
    """The checks across keys (and each key's range) of a built, resolved config; KiminaError naming the keys."""
    def fail(message: str) -> None:
        raise KiminaError(f"{source}: {message}")

    for f in dataclasses.fields(cfg):
        check_ranges(getattr(cfg, f.name), f.name, fail)
    if cfg.data.train_batch_size % cfg.algorithm.ppo_mini_batch_size:
        fail(
            f"algorithm.ppo_mini_batch_size ({cfg.algorithm.ppo_mini_batch_size}) must divide "
            f"data.train_batch_size ({cfg.data.train_batch_size})"
        )
    if cfg.algorithm.adv_estimator == "rloo" and cfg.algorithm.norm_adv_by_std:
        fail("algorithm.adv_estimator 'rloo' has no std normalisation (as in verl); set algorithm.norm_adv_by_std false")
    try:
        algorithm = cfg.algorithm
        policy_loss_options(algorithm.policy_loss, algorithm.policy_loss_options, "algorithm.policy_loss_options")
        correction = cfg.algorithm.rollout_correction
        if correction.rollout_rs is not None:
            rejection_criteria(correction.rollout_rs, correction.rollout_rs_threshold)
    except KiminaError as error:
        fail(str(error))
    partial = cfg.rollout.partial
    if partial.enabled and cfg.rollout.engine == "vllm-server":
        fail("rollout.partial.enabled needs rollout.engine jax or vllm: a vllm-server call cannot be stopped part way")
    if cfg.logging.wandb.enabled and importlib.util.find_spec("wandb") is None:
        fail('logging.wandb.enabled needs the wandb package: pip install -e ".[wandb]"')
    if cfg.algorithm.filter_groups.enabled and cfg.rollout.n < 2:
        fail("algorithm.filter_groups.enabled needs rollout.n >= 2: a group of one response is never informative")
    if cfg.algorithm.kl.ref_path is not None and not cfg.algorithm.kl.enabled:
        fail("'algorithm.kl.ref_path' is set but algorithm.kl.enabled is false (the reference exists only with KL on)")

    full_length = cfg.data.max_prompt_length + cfg.data.max_response_length
    if cfg.rollout.vllm.max_model_len < full_length:
        fail(
            f"rollout.vllm.max_model_len ({cfg.rollout.vllm.max_model_len}) is below max prompt + response "
            f"length ({full_length})"
        )
    if cfg.algorithm.pack_length < full_length:
        fail(f"algorithm.pack_length ({cfg.algorithm.pack_length}) must hold one full sequence ({full_length} tokens)")

    if cfg.rollout.engine == "vllm-server" and not cfg.rollout.servers.urls:
        fail("rollout.engine is 'vllm-server' but rollout.servers.urls is empty")
    if cfg.rollout.engine == "vllm-server" and not cfg.rollout.servers.weights_dir:
        fail("rollout.engine is 'vllm-server' but rollout.servers.weights_dir (shared weight storage) is not set")

    if cfg.reward.function is not None and not cfg.reward.function.strip():
        fail("'reward.function' is empty: give a registered name such as 'lean', or 'package.module:name', or null")
    if cfg.reward.batch and ":" not in (cfg.reward.function or ""):
        fail("'reward.batch' is for a user's function ('package.module:name'); registered rewards have no batch form")

    tiny = cfg.model.path == TINY
    if cfg.verifier.kind == "standin" and not tiny:
        fail(
            "verifier.kind 'standin' is only for the tiny recipe (model.path: tiny); its verdicts are not Lean's. "
            f"Use 'lean' and set ${ENV_URL}."
        )
    if cfg.data.tokenizer == TINY and not tiny:
        fail("data.tokenizer 'tiny' only fits model.path 'tiny' (a real checkpoint has its own tokenizer)")
    heads, kv_heads = cfg.model.tiny.num_attention_heads, cfg.model.tiny.num_key_value_heads
    if tiny and heads % kv_heads:
        fail(f"model.tiny.num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")

    axes = {"mesh.data": cfg.mesh.data, "mesh.fsdp": cfg.mesh.fsdp, "mesh.tensor": cfg.mesh.tensor}
    if sum(v == -1 for v in axes.values()) > 1:
        fail(f"at most one mesh axis may be -1, got {axes}")


def validate_for_devices(cfg: TrainConfig, n_devices: int, process_count: int = 1) -> tuple[int, int, int]:
    """Check the config against the devices at hand; return the mesh shape (data, fsdp, tensor) with -1 resolved."""
    from kimina_jax.parallel.mesh import _resolve_axis_sizes  # the one place that does mesh arithmetic

    shape = _resolve_axis_sizes({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}, n_devices)
    if cfg.data.train_batch_size % process_count:
        raise KiminaError(
            f"data.train_batch_size ({cfg.data.train_batch_size}) must be divisible by the number of processes "
            f"({process_count}): each process draws an equal share of every batch"
        )
    return shape
