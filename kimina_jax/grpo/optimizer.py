"""AdamW with global-norm clipping (SPEC 3) and verl's learning-rate schedules.

verl steps its learning-rate scheduler once per training step, not per optimizer update: all mini-batch
updates of a step share one learning rate, and `warmup_steps` / the cosine length count training steps.
So the optimizer keeps its learning rate as a hyperparameter in its state (`optax.inject_hyperparams`),
and the train step sets it from `learning_rate_schedule(train_step)` before each update.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from kimina_jax.config import OptimConfig
from kimina_jax.errors import KiminaError


def learning_rate_schedule(optim: OptimConfig, total_steps: int | None = None) -> optax.Schedule:
    """The learning rate of training step `step` (0-based), as verl / transformers schedule it.

    Warmup rises linearly from 0 (step 0 gets lr 0) to `lr` at step `warmup_steps`; then `constant` stays at
    `lr`, `cosine` falls along half a cosine to `lr * min_lr_ratio` at step `total_steps` and stays there.
    """
    if optim.warmup_steps < 0:
        raise KiminaError(f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}")
    if optim.schedule not in ("constant", "cosine"):
        raise KiminaError(f"optim.schedule must be 'constant' or 'cosine', got {optim.schedule!r}")
    if optim.schedule == "cosine" and (total_steps is None or total_steps <= optim.warmup_steps):
        raise KiminaError(f"optim.schedule 'cosine' needs the total number of training steps "
                          f"(> optim.warmup_steps = {optim.warmup_steps}), got {total_steps}")
    lr, warmup = optim.lr, optim.warmup_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(step / warmup, 1.0) if warmup else 1.0
        if optim.schedule == "constant":
            return lr * warm
        progress = jnp.clip((step - warmup) / (total_steps - warmup), 0.0, 1.0)
        cosine = optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return lr * jnp.where(step < warmup, warm, cosine)

    return schedule


def make_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clip to `grad_clip`, then AdamW (decoupled weight decay on every parameter, as torch's
    AdamW over all of verl's parameters) at the learning rate held in the state (`optim.lr` until
    `with_learning_rate` changes it)."""

    def clipped_adamw(learning_rate):
        return optax.chain(
            optax.clip_by_global_norm(optim.grad_clip),
            optax.adamw(learning_rate, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay),
        )

    return optax.inject_hyperparams(clipped_adamw)(learning_rate=optim.lr)


def with_learning_rate(
    opt_state: optax.InjectHyperparamsState, learning_rate: jax.Array
) -> optax.InjectHyperparamsState:
    """`opt_state` of `make_optimizer` with the learning rate of the next update set."""
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": learning_rate})
