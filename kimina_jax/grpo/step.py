"""The GRPO update (SPEC 3): one jitted call per mini-batch, sharded over a device mesh.

A mini-batch arrives as one `PackedBatch` whose `loss_weights` already hold the mini-batch normalisers, so
its loss is sum(loss_weights * token loss) over all its rows. The rows are cut into micro-batches of
`rows_multiple` rows (`algorithm.micro_batch_rows` per data-parallel shard); a loop inside the jitted call
adds up the micro-batches' gradients, so the update does not depend on how the rows are cut.

Compilations: a jitted call compiles once per (micro-batches, row length). The row length comes from the
packing buckets; the micro-batch count is rounded up to a `packing.micro_batch_count` (eight per octave) by
padding with empty micro-batches that the loop never runs, so varying row counts reuse a few compiled shapes.
`pack_samples` already picks such counts, so batches it packs carry no empty micro-batches to the devices.
`TrainStep.compilations` counts the compilations.
"""
from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kimina_jax.config import AlgorithmConfig, OptimConfig
from kimina_jax.errors import KiminaError
from kimina_jax.grpo.logprobs import token_logprobs
from kimina_jax.grpo.math import grpo_loss
from kimina_jax.grpo.optimizer import learning_rate_schedule, make_optimizer, with_learning_rate
from kimina_jax.grpo.packing import PackedBatch, micro_batch_count
from kimina_jax.models import Qwen3ForCausalLM
from kimina_jax.parallel import logical_sharding, make_mesh, num_shards, param_shardings

LOGPROB_INPUTS = ("tokens", "targets", "positions", "segment_ids")
UPDATE_INPUTS = (*LOGPROB_INPUTS, "loss_mask", "advantages", "loss_weights", "old_logp")
# Per-micro-batch sums that become the token-mean metrics (divided by the loss-token count). `actor/entropy` is not
# one: verl's is the old policy's, from the old log-prob pass (`TrainStep.logprobs(..., with_entropy=True)`).
TOKEN_MEAN_METRICS = ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl")


@struct.dataclass
class TrainState:
    """What one policy update changes, placed on the mesh; `params` are the model's `nnx.Param`s."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # int32: optimizer updates applied
    skipped_updates: jax.Array  # int32: updates dropped because the gradient norm was not finite
    rng: jax.Array  # a JAX key, carried for whoever needs randomness (the update itself uses none)


def micro_batch_loss(
    model: Qwen3ForCausalLM, micro: dict[str, jax.Array], algorithm: AlgorithmConfig, temperature: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`math.grpo_loss` of one micro-batch ([rows, length] arrays of a `PackedBatch`, aggregated with its
    `loss_weights`): the policy's log-probs (and entropies, only when `entropy_coeff` is not 0) from the chunked
    pass, the reference's and the engine's log-probs when the batch carries them (KL on; off-policy correction)."""
    logp, entropy = token_logprobs(
        model, micro["tokens"], micro["positions"], micro["segment_ids"], micro["targets"],
        temperature, algorithm.logits_chunk_tokens, with_entropy=bool(algorithm.entropy_coeff),
    )
    return grpo_loss(
        logp, micro["old_logp"], micro["advantages"], micro["loss_mask"], micro["loss_weights"],
        clip_low=algorithm.clip_low, clip_high=algorithm.clip_high, clip_c=algorithm.clip_c,
        entropy=entropy, entropy_coeff=algorithm.entropy_coeff,
        ref_logp=micro.get("ref_logp"), kl_coef=algorithm.kl.coef, kl_kind=algorithm.kl.kind,
        rollout_logp=micro.get("rollout_logp"), tis_cap=algorithm.tis_cap,
    )


def accumulate_gradients(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    micro_batches: dict[str, jax.Array],
    num_micro: jax.Array,
    algorithm: AlgorithmConfig,
    temperature: float,
) -> tuple[nnx.State, dict[str, jax.Array]]:
    """Gradient of the mini-batch loss and the metric sums, summed over the first `num_micro` micro-batches
    of `micro_batches` ([n, rows, length] arrays); the weights are pre-normalised, so sums are the totals."""

    def micro_loss(p, micro):
        return micro_batch_loss(nnx.merge(graphdef, p), micro, algorithm, temperature)

    grad_fn = jax.grad(micro_loss, has_aux=True)
    sums_shape = jax.eval_shape(micro_loss, params, _micro_batch(micro_batches, 0))[1]
    zero = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, sums_shape))

    def body(index, totals):
        grads, sums = grad_fn(params, _micro_batch(micro_batches, index))
        return jax.tree.map(jnp.add, totals, (grads, sums))

    return jax.lax.fori_loop(0, num_micro, body, zero)


class TrainStep:
    """The jitted, sharded computations of the policy update for one model architecture on one mesh.

    `update(state, batch, train_step)` applies one optimizer update for a mini-batch; `logprobs(params, batch)`
    gives per-token log-probs for the old policy (`state.params` before the step's updates) or the frozen
    reference (a copy of the initial parameters, kept when KL is on). Pack mini-batches with
    `rows_multiple=self.rows_multiple`.
    """

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        algorithm: AlgorithmConfig,
        optim: OptimConfig,
        *,
        temperature: float = 1.0,
        total_steps: int | None = None,
        mesh: Mesh | None = None,
    ):
        """`model` gives the architecture (an abstract model is enough); `temperature` is the rollout's;
        `total_steps` (training steps of the run) sets the cosine schedule's length; `mesh` defaults to the
        first device alone."""
        if algorithm.micro_batch_rows < 1:
            raise KiminaError(f"algorithm.micro_batch_rows must be >= 1, got {algorithm.micro_batch_rows}")
        if temperature <= 0:
            raise KiminaError(f"rollout temperature must be > 0, got {temperature}")
        self.algorithm = algorithm
        self.temperature = temperature
        self.mesh = mesh if mesh is not None else make_mesh(1, 1, 1, devices=jax.devices()[:1])
        self.rows_multiple = algorithm.micro_batch_rows * num_shards(self.mesh, "batch")
        self.optimizer = make_optimizer(optim)
        self.learning_rate = learning_rate_schedule(optim, total_steps)
        self.graphdef, params = nnx.split(model)
        self.state_shardings = self._state_shardings(params)
        self.compilations: collections.Counter[str] = collections.Counter()

        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._micro_sharding = logical_sharding(self.mesh, (None, "batch", "length"))
        self._update = jax.jit(
            self._update_fn,
            in_shardings=(self.state_shardings, self._micro_sharding, replicated, replicated),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        self._logprobs = jax.jit(
            self._logprobs_fn,
            in_shardings=(self.state_shardings.params, self._micro_sharding, replicated),
            out_shardings=replicated,  # every process reads the whole result back
            static_argnums=3,
        )

    # ------------------------------------------------------------------------------------------- public
    @property
    def uses_rollout_logp(self) -> bool:
        """Whether `update` corrects the policy loss with the engine's log-probs (truncated importance sampling)."""
        return self.algorithm.off_policy and self.algorithm.tis_cap > 0

    def init_state(self, model: Qwen3ForCausalLM, seed: int = 0) -> TrainState:
        """The model's parameters placed on the mesh, fresh optimizer state (sharded like the parameters).
        Across hosts every process must pass the same parameter values."""
        _, params = nnx.split(model)
        # A copy: `update` donates the state, which must not delete the model's own arrays.
        params = jax.device_put(params, self.state_shardings.params, may_alias=False)
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings.opt_state)(params)
        # Made by a jitted call: device_put of a key to devices of other processes is refused.
        scalar = lambda make: jax.jit(make, out_shardings=self.state_shardings.step)()  # noqa: E731
        return TrainState(
            params=params,
            opt_state=opt_state,
            step=scalar(lambda: jnp.zeros((), jnp.int32)),
            skipped_updates=scalar(lambda: jnp.zeros((), jnp.int32)),
            rng=scalar(lambda: jax.random.key(seed)),
        )

    def update(self, state: TrainState, batch: PackedBatch, train_step: int) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update on a mini-batch of training step `train_step` (0-based; it sets the learning
        rate, which verl changes once per training step); `state` is consumed (its buffers are reused).

        Returns the new state and SPEC 9 metrics as device scalars (`jax.device_get` them when logging):
        actor/pg_loss (the mini-batch loss), actor/{pg_clipfrac,pg_clipfrac_lower,ppo_kl} (means over
        the mini-batch's loss tokens), actor/grad_norm (before clipping), actor/lr (of this update),
        actor/skipped_updates (so far), actor/{kl_loss,kl_coef} when the KL term is on, and actor/tis_weight
        (token mean) when the off-policy correction is (`uses_rollout_logp`). An update whose gradient
        norm is not finite leaves parameters and optimizer state as they were.
        """
        with jax.set_mesh(self.mesh):  # attention kernels split themselves by this mesh
            return self._update(state, *self._update_arguments(batch, train_step))

    def update_epochs(
        self, state: TrainState, batches: list[PackedBatch], train_step: int
    ) -> tuple[TrainState, dict[str, float]]:
        """verl's PPO epochs: `algorithm.ppo_epochs` passes over the step's mini-batches in order, one `update`
        each, every batch keeping the old log-probs computed before the first update. Returns the final state and
        each metric's mean over the updates."""
        totals: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
        for _ in range(self.algorithm.ppo_epochs):
            for batch in batches:
                state, metrics = self.update(state, batch, train_step)
                for name, value in jax.device_get(metrics).items():
                    totals[name].append(float(value))
        return state, {name: float(np.mean(values)) for name, values in totals.items()}

    def lower_update(self, state: TrainState, batch: PackedBatch) -> jax.stages.Lowered:
        """`update` lowered for this batch's shapes, e.g. for `.compile().memory_analysis()`."""
        with jax.set_mesh(self.mesh):
            return self._update.lower(state, *self._update_arguments(batch, 0))

    def logprobs(
        self, params: nnx.State, batch: PackedBatch, with_entropy: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """[rows, length] log-probs of `batch.targets` under `params` (temperature applied), aligned like
        `batch.loss_mask`: `batch.response_values(...)` cuts them into per-response arrays. `with_entropy`:
        also the entropy of each position's full next-token distribution, from the same log-softmax."""
        micro_batches, num_micro = self._device_micro_batches(batch, LOGPROB_INPUTS)
        with jax.set_mesh(self.mesh):
            out = jax.device_get(self._logprobs(params, micro_batches, num_micro, with_entropy))
        values = tuple(np.asarray(a)[: int(num_micro)].reshape(batch.tokens.shape) for a in out)
        return values if with_entropy else values[0]

    # ------------------------------------------------------------------------------------ jitted bodies
    def _update_fn(self, state: TrainState, micro_batches: dict[str, jax.Array], num_micro: jax.Array,
                   train_step: jax.Array):
        self.compilations["update"] += 1  # runs only while tracing, i.e. once per compiled shape
        learning_rate = self.learning_rate(train_step)
        grads, sums = accumulate_gradients(
            self.graphdef, state.params, micro_batches, num_micro, self.algorithm, self.temperature
        )
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        finite = jnp.isfinite(grad_norm)
        updates, opt_state = self.optimizer.update(
            grads, with_learning_rate(state.opt_state, learning_rate), state.params
        )
        params = optax.apply_updates(state.params, updates)
        keep_if_finite = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = state.replace(
            params=jax.tree.map(keep_if_finite, params, state.params),
            opt_state=jax.tree.map(keep_if_finite, opt_state, state.opt_state),
            step=state.step + finite.astype(jnp.int32),
            skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32),
        )
        tokens = jnp.maximum(sums["loss_tokens"], 1.0)
        metrics = {"actor/pg_loss": sums["pg_loss"]}
        metrics.update({f"actor/{name}": sums[name] / tokens for name in TOKEN_MEAN_METRICS})
        if "kl_loss" in sums:
            metrics["actor/kl_loss"] = sums["kl_loss"]
            metrics["actor/kl_coef"] = jnp.float32(self.algorithm.kl.coef)
        if "tis_weight" in sums:
            metrics["actor/tis_weight"] = sums["tis_weight"] / tokens
        metrics.update({
            "actor/grad_norm": grad_norm,
            "actor/lr": learning_rate,
            "actor/skipped_updates": new_state.skipped_updates.astype(jnp.float32),
        })
        return new_state, metrics

    def _logprobs_fn(self, params: nnx.State, micro_batches: dict[str, jax.Array], num_micro: jax.Array,
                     with_entropy: bool):
        self.compilations["logprobs"] += 1

        def body(index, out):
            micro = _micro_batch(micro_batches, index)
            values = token_logprobs(
                nnx.merge(self.graphdef, params), micro["tokens"], micro["positions"], micro["segment_ids"],
                micro["targets"], self.temperature, self.algorithm.logits_chunk_tokens, with_entropy=with_entropy,
            )
            return tuple(jax.lax.dynamic_update_index_in_dim(o, v, index, axis=0) for o, v in zip(out, values))

        # (log-probs,) or (log-probs, entropies)
        out = (jnp.zeros(micro_batches["tokens"].shape, jnp.float32),) * (2 if with_entropy else 1)
        return jax.lax.fori_loop(0, num_micro, body, out)

    # ----------------------------------------------------------------------------------------- helpers
    def _update_arguments(
        self, batch: PackedBatch, train_step: int
    ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
        if batch.old_logp is None:
            raise KiminaError("TrainStep.update: the packed batch has no old_logp (pack items with old log-probs)")
        names = UPDATE_INPUTS
        if self.algorithm.kl.enabled:
            if batch.ref_logp is None:
                raise KiminaError("TrainStep.update: algorithm.kl.enabled but the packed batch has no ref_logp")
            names = (*names, "ref_logp")
        if self.uses_rollout_logp:
            if batch.rollout_logp is None:
                raise KiminaError("TrainStep.update: algorithm.off_policy with tis_cap > 0, but the packed batch has "
                                  "no rollout_logp (pack items with the engine's log-probs)")
            names = (*names, "rollout_logp")
        micro_batches, num_micro = self._device_micro_batches(batch, names)
        return micro_batches, num_micro, self._replicated_scalar(train_step)

    def _state_shardings(self, abstract_params: nnx.State) -> TrainState:
        params = param_shardings(abstract_params, self.mesh)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        structure = jax.tree.structure(abstract_params)
        abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
        # Optimizer moments are trees shaped like the parameters: they take the parameters' shardings.
        opt_state = jax.tree.map(
            lambda node: params if _same_structure(node, structure) else replicated,
            abstract_opt,
            is_leaf=lambda node: _same_structure(node, structure),
        )
        return TrainState(params=params, opt_state=opt_state, step=replicated, skipped_updates=replicated,
                          rng=replicated)

    def _device_micro_batches(
        self, batch: PackedBatch, names: tuple[str, ...]
    ) -> tuple[dict[str, jax.Array], jax.Array]:
        """The named arrays as [micro-batches (padded to a `micro_batch_count`), rows_multiple, length] on the
        mesh, and the number of real micro-batches."""
        rows, length = batch.tokens.shape
        if rows % self.rows_multiple:
            raise KiminaError(f"packed batch has {rows} rows, not a multiple of {self.rows_multiple} (micro-batch "
                              "rows x data-parallel devices): pack with rows_multiple=TrainStep.rows_multiple")
        num_micro = rows // self.rows_multiple
        padded_micro = micro_batch_count(num_micro)
        shape = (padded_micro, self.rows_multiple, length)
        arrays = {}
        for name in names:
            host = np.zeros(shape, getattr(batch, name).dtype)
            host[:num_micro] = getattr(batch, name).reshape(num_micro, self.rows_multiple, length)
            # From the global host array, so it also works when the mesh spans several processes.
            arrays[name] = jax.make_array_from_callback(shape, self._micro_sharding, lambda index, h=host: h[index])
        return arrays, self._replicated_scalar(num_micro)

    def _replicated_scalar(self, value: int) -> jax.Array:
        return jax.make_array_from_callback((), NamedSharding(self.mesh, PartitionSpec()), lambda _: np.int32(value))


def _micro_batch(micro_batches: dict[str, jax.Array], index) -> dict[str, jax.Array]:
    return {name: jax.lax.dynamic_index_in_dim(array, index, keepdims=False) for name, array in micro_batches.items()}


def _same_structure(node: Any, structure: jax.tree_util.PyTreeDef) -> bool:
    return isinstance(node, nnx.State) and jax.tree.structure(node) == structure
