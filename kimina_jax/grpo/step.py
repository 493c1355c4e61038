"""The GRPO update (SPEC 3): jitted calls over a mini-batch's micro-batches, sharded over a device mesh.

A mini-batch arrives as one `PackedBatch` whose `loss_weights` already hold the mini-batch normalisers, so
its loss is sum(loss_weights * token loss) over all its rows. The rows come in micro-batches of `rows_multiple`
rows (`algorithm.micro_batch_rows` per data-parallel shard), each of one row length. One jitted call per run of
micro-batches of one length adds their gradient and metric sums to the running totals (a loop inside the call;
the totals donated, updated in place), and one more applies the optimizer, so the update does not depend on how
the rows are cut.

Compilations: the gradient pass and the log-prob pass compile once per (micro-batches, row length) of a run
(`pack_samples` keeps both in small sets), the optimizer step and the zeroed totals once.
`TrainStep.compilations` counts them.
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
from kimina_jax.grpo.packing import PackedBatch
from kimina_jax.grpo.rollout_correction import importance_level
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
    model: Qwen3ForCausalLM, micro: dict[str, jax.Array], algorithm: AlgorithmConfig, temperature: float,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`math.grpo_loss` of one micro-batch ([rows, length] arrays of a `PackedBatch`, aggregated with its
    `loss_weights`, sequences by its `segment_ids`) with `algorithm.policy_loss`: the policy's log-probs (and
    entropies, only when `entropy_coeff` is not 0) from the chunked pass, the reference's log-probs and the
    rollout correction's weights when the batch carries them; `key`: the loss's randomness (clip_cov)."""
    logp, entropy = token_logprobs(
        model, micro["tokens"], micro["positions"], micro["segment_ids"], micro["targets"],
        temperature, algorithm.logits_chunk_tokens, with_entropy=bool(algorithm.entropy_coeff),
    )
    return grpo_loss(
        logp, micro["old_logp"], micro["advantages"], micro["loss_mask"], micro["loss_weights"],
        clip_low=algorithm.clip_low, clip_high=algorithm.clip_high, clip_c=algorithm.clip_c,
        policy_loss=algorithm.policy_loss, options=algorithm.policy_loss_options, segment_ids=micro["segment_ids"],
        key=key, is_weights=micro.get("is_weights"), entropy=entropy, entropy_coeff=algorithm.entropy_coeff,
        ref_logp=micro.get("ref_logp"), kl_coef=algorithm.kl.coef, kl_kind=algorithm.kl.kind,
        loss_scale=algorithm.loss_scale,
    )


def accumulate_gradients(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    totals: tuple[nnx.State, dict[str, jax.Array]],
    micro_batches: dict[str, jax.Array],
    algorithm: AlgorithmConfig,
    temperature: float,
    key: jax.Array | None = None,
) -> tuple[nnx.State, dict[str, jax.Array]]:
    """`totals` (gradients, metric sums) plus those of the loss of each micro-batch of `micro_batches` ([n, rows,
    length] arrays); the weights are pre-normalised, so the sums over a mini-batch's micro-batches are its own.
    `key` (folded with each micro-batch's index): the loss's randomness."""
    key = jax.random.key(0) if key is None else key
    grad_fn = jax.grad(
        lambda p, micro, k: micro_batch_loss(nnx.merge(graphdef, p), micro, algorithm, temperature, k), has_aux=True
    )

    def body(index, totals):
        micro = _micro_batch(micro_batches, index)
        return jax.tree.map(jnp.add, totals, grad_fn(params, micro, jax.random.fold_in(key, index)))

    return jax.lax.fori_loop(0, micro_batches["tokens"].shape[0], body, totals)


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
        stale_rollouts: bool = False,
    ):
        """`model` gives the architecture (an abstract model is enough); `temperature` is the rollout's;
        `total_steps` (training steps of the run) sets the cosine schedule's length; `mesh` defaults to the
        first device alone; `stale_rollouts`: rollouts may come from older weights than the step's (partial
        rollouts), which the rollout correction's `auto` level treats as off-policy's."""
        if algorithm.micro_batch_rows < 1:
            raise KiminaError(f"algorithm.micro_batch_rows must be >= 1, got {algorithm.micro_batch_rows}")
        if temperature <= 0:
            raise KiminaError(f"rollout temperature must be > 0, got {temperature}")
        self.algorithm = algorithm
        self.stale_rollouts = stale_rollouts
        self.temperature = temperature
        self.mesh = mesh if mesh is not None else make_mesh(1, 1, 1, devices=jax.devices()[:1])
        self.rows_multiple = algorithm.micro_batch_rows * num_shards(self.mesh, "batch")
        self.optimizer = make_optimizer(optim)
        self.learning_rate = learning_rate_schedule(optim, total_steps)
        self.graphdef, params = nnx.split(model)
        self._abstract_params = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), params)
        self.state_shardings = self._state_shardings(params)
        self.compilations: collections.Counter[str] = collections.Counter()

        # The arrays `update` takes from a packed batch.
        self.update_inputs = (*UPDATE_INPUTS, *("ref_logp",) * algorithm.kl.enabled,
                              *("is_weights",) * self.uses_is_weights)

        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._micro_sharding = logical_sharding(self.mesh, (None, "batch", "length"))
        totals = (self.state_shardings.params, replicated)
        self._zero_totals = jax.jit(self._zero_totals_fn, in_shardings=(self.state_shardings.params,),
                                    out_shardings=totals)
        self._accumulate = jax.jit(
            self._accumulate_fn,
            in_shardings=(self.state_shardings.params, totals, self._micro_sharding, replicated, replicated,
                          replicated),
            out_shardings=totals,
            donate_argnums=1,
        )
        self._apply = jax.jit(
            self._apply_fn,
            in_shardings=(self.state_shardings, totals, replicated),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,  # the totals too would find no output to reuse their buffers
        )
        self._logprobs = jax.jit(
            self._logprobs_fn,
            in_shardings=(self.state_shardings.params, self._micro_sharding),
            out_shardings=replicated,  # every process reads the whole result back
            static_argnums=2,
        )

    # ------------------------------------------------------------------------------------------- public
    @property
    def off_policy(self) -> bool:
        """Whether rollouts may come from older weights than the step's (off-policy or partial rollouts)."""
        return self.algorithm.off_policy or self.stale_rollouts

    @property
    def uses_is_weights(self) -> bool:
        """Whether `update` weights the policy loss by the rollout correction's importance weights
        (`PackedBatch.corrected`)."""
        return importance_level(self.algorithm.rollout_correction, self.off_policy) is not None

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
        actor/skipped_updates (so far) and actor/{kl_loss,kl_coef} when the KL term is on. An update whose
        gradient norm is not finite leaves parameters and optimizer state as they were.
        """
        runs = self._device_runs(batch, self._update_names(batch))
        with jax.set_mesh(self.mesh):  # attention kernels split themselves by this mesh
            totals = self._zero_totals(state.params)
            for run, (_, micro_batches) in enumerate(runs):  # dispatched without waiting: the calls queue
                totals = self._accumulate(state.params, totals, micro_batches, state.rng, state.step,
                                          self._replicated_scalar(run))
            return self._apply(state, totals, self._replicated_scalar(train_step))

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
        """The gradient pass of the batch's first run of micro-batches (its longest rows) lowered, e.g. for
        `.compile().memory_analysis()`: where activations peak."""
        _, micro_batches = self._device_runs(batch, self._update_names(batch))[0]
        with jax.set_mesh(self.mesh):
            return self._accumulate.lower(state.params, self._zero_totals(state.params), micro_batches, state.rng,
                                          state.step, self._replicated_scalar(0))

    def abstract_state(self) -> TrainState:
        """What `init_state` makes, as shape, dtype and sharding only (nothing allocated): to compile the step's
        programs ahead of time, e.g. for devices this process does not have (`kimina_jax.plan`)."""
        shapes = jax.eval_shape(lambda params: TrainState(
            params=params, opt_state=self.optimizer.init(params), step=jnp.zeros((), jnp.int32),
            skipped_updates=jnp.zeros((), jnp.int32), rng=jax.random.key(0),
        ), self._abstract_params)
        return _placed(shapes, self.state_shardings)

    def lower_programs(self, state: TrainState, micro_batches: int, length: int,
                       reference: nnx.State | None = None) -> dict[str, jax.stages.Lowered]:
        """The update's programs lowered for runs of `micro_batches` micro-batches of `length`-token rows, from
        `state` (arrays or `abstract_state()`): `update` (the gradient pass), `apply` (the optimizer step),
        `old_logprobs` (with the entropy: verl's `actor/entropy`) and, given the reference's parameters (KL on),
        `ref_logprobs`."""
        names = {name: jnp.int32 if name in LOGPROB_INPUTS else jnp.float32 for name in self.update_inputs}
        micro = {name: jax.ShapeDtypeStruct((micro_batches, self.rows_multiple, length), dtype,
                                            sharding=self._micro_sharding) for name, dtype in names.items()}
        logprob_inputs = {name: micro[name] for name in LOGPROB_INPUTS}
        with jax.set_mesh(self.mesh):
            totals = _placed(jax.eval_shape(self._zero_totals_fn, state.params),
                             (self.state_shardings.params, NamedSharding(self.mesh, PartitionSpec())))
            scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(self.mesh, PartitionSpec()))
            programs = {
                # One int32 scalar shape: the run of micro-batches (update), the training step (apply).
                "update": self._accumulate.lower(state.params, totals, micro, state.rng, state.step, scalar),
                "apply": self._apply.lower(state, totals, scalar),
                "old_logprobs": self._logprobs.lower(state.params, logprob_inputs, True),
            }
            if reference is not None:
                programs["ref_logprobs"] = self._logprobs.lower(reference, logprob_inputs, False)
        return programs

    def logprobs(
        self, params: nnx.State, batch: PackedBatch, with_entropy: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """[rows, length] log-probs of `batch.targets` under `params` (temperature applied), aligned like
        `batch.loss_mask`: `batch.response_values(...)` cuts them into per-response arrays. `with_entropy`:
        also the entropy of each position's full next-token distribution, from the same log-softmax."""
        runs = self._device_runs(batch, LOGPROB_INPUTS)
        with jax.set_mesh(self.mesh):
            values = jax.device_get([self._logprobs(params, micro_batches, with_entropy) for _, micro_batches in runs])
        out = tuple(np.zeros(batch.tokens.shape, np.float32) for _ in range(1 + with_entropy))
        for ((rows, length), _), run_values in zip(runs, values):
            for array, value in zip(out, run_values):
                array[rows, :length] = value.reshape(-1, length)
        return out if with_entropy else out[0]

    # ------------------------------------------------------------------------------------ jitted bodies
    def _zero_totals_fn(self, params: nnx.State) -> tuple[nnx.State, dict[str, jax.Array]]:
        self.compilations["zero_totals"] += 1  # runs only while tracing, i.e. once per compiled shape
        micro = {name: jax.ShapeDtypeStruct((self.rows_multiple, 1), jnp.int32 if name in LOGPROB_INPUTS else
                                            jnp.float32) for name in self.update_inputs}  # sums don't need more
        _, sums = jax.eval_shape(
            lambda p, m: micro_batch_loss(nnx.merge(self.graphdef, p), m, self.algorithm, self.temperature),
            params, micro,
        )
        return jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums)

    def _accumulate_fn(self, params: nnx.State, totals: tuple[nnx.State, dict[str, jax.Array]],
                       micro_batches: dict[str, jax.Array], rng: jax.Array, step: jax.Array, run: jax.Array):
        self.compilations["update"] += 1
        # Randomness (clip_cov's) per update and run of micro-batches, the same after a resume.
        key = jax.random.fold_in(jax.random.fold_in(rng, step), run)
        return accumulate_gradients(self.graphdef, params, totals, micro_batches, self.algorithm, self.temperature,
                                    key)

    def _apply_fn(self, state: TrainState, totals: tuple[nnx.State, dict[str, jax.Array]], train_step: jax.Array):
        self.compilations["apply"] += 1
        grads, sums = totals
        learning_rate = self.learning_rate(train_step)
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
        metrics.update({
            "actor/grad_norm": grad_norm,
            "actor/lr": learning_rate,
            "actor/skipped_updates": new_state.skipped_updates.astype(jnp.float32),
        })
        return new_state, metrics

    def _logprobs_fn(self, params: nnx.State, micro_batches: dict[str, jax.Array], with_entropy: bool):
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
        return jax.lax.fori_loop(0, micro_batches["tokens"].shape[0], body, out)

    # ----------------------------------------------------------------------------------------- helpers
    def _update_names(self, batch: PackedBatch) -> tuple[str, ...]:
        """The arrays `update` takes, checked to be in the batch."""
        if batch.old_logp is None:
            raise KiminaError("TrainStep.update: the packed batch has no old_logp (pack items with old log-probs)")
        if self.algorithm.kl.enabled and batch.ref_logp is None:
            raise KiminaError("TrainStep.update: algorithm.kl.enabled but the packed batch has no ref_logp")
        if self.uses_is_weights and batch.is_weights is None:
            raise KiminaError("TrainStep.update: the rollout correction weights the loss (algorithm.rollout_correction"
                              ".rollout_is), but the packed batch has no is_weights (see PackedBatch.corrected)")
        return self.update_inputs

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

    def _device_runs(
        self, batch: PackedBatch, names: tuple[str, ...]
    ) -> list[tuple[tuple[slice, int], dict[str, jax.Array]]]:
        """Each run of consecutive micro-batches of one row length: its (rows, row length) and its named arrays,
        [micro-batches, rows_multiple, row length], on the mesh."""
        spans = []
        for rows, length in batch.micro_batches(self.rows_multiple):
            if spans and spans[-1][1] == length:
                rows = slice(spans.pop()[0].start, rows.stop)
            spans.append((rows, length))
        runs = []
        for rows, length in spans:
            run = {}
            for name in names:
                host = getattr(batch, name)[rows, :length].reshape(-1, self.rows_multiple, length)
                # From the global host array, so it also works when the mesh spans several processes.
                run[name] = jax.make_array_from_callback(host.shape, self._micro_sharding,
                                                         lambda index, h=host: h[index])
            runs.append(((rows, length), run))
        return runs

    def _replicated_scalar(self, value: int) -> jax.Array:
        return jax.make_array_from_callback((), NamedSharding(self.mesh, PartitionSpec()), lambda _: np.int32(value))


def _placed(shapes: Any, shardings: Any) -> Any:
    """`shapes` (a tree of shape-dtype structs) with the shardings of `shardings`, a tree of which `shapes`
    extends (one sharding may stand for a whole subtree)."""
    return jax.tree.map(
        lambda sharding, subtree: jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                                 sharding=sharding), subtree),
        shardings, shapes,
    )


def _same_structure(node: Any, structure: jax.tree_util.PyTreeDef) -> bool:
    return isinstance(node, nnx.State) and jax.tree.structure(node) == structure


def _micro_batch(micro_batches: dict[str, jax.Array], index) -> dict[str, jax.Array]:
    return {name: jax.lax.dynamic_index_in_dim(array, index, keepdims=False) for name, array in micro_batches.items()}
