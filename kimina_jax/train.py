"""`python -m kimina_jax.train --config <recipe> [key=value ...]`: GRPO training of a Qwen3 Lean prover.

Each step: draw prompts (error-fix prompts mixed in) -> rollout -> verify (started group by group) -> score ->
advantages -> old log-probs -> one update per mini-batch -> weight sync -> metrics -> error-fix cache.
Validation every `trainer.test_freq` steps, a checkpoint every `trainer.save_freq`, automatic resume from the
run folder. On SIGTERM/SIGINT the step in progress finishes (verification still unanswered `trainer.stop_grace_s`
after the signal is left unverified) and a checkpoint is written before exiting, as when the verifier refuses
to work mid-run (`VerifierError`: the step in progress is dropped, the one before it saved). An update that
leaves non-finite parameters stops the run with the newest checkpoint as the last good one.

Several processes (hosts): run the same command on each. JAX's runtime is joined from the environment (SLURM,
Open MPI, a Cloud TPU pod) or from --coordinator-address HOST:PORT --num-processes N --process-id I (or the
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). Each process generates its share of every
batch with its own engine; process 0 alone verifies, writes TensorBoard, rollouts and the resolved config; the
run folder must be storage every process sees (checkpoints are written by all of them together).

Longer than the project's ~400-line habit on purpose: the loop and each stage of the step (DESIGN.md) are short
methods kept in one place so that a step reads top to bottom; what each stage computes lives in its room.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimina_jax import metrics as stats
from kimina_jax.checkpoint import Checkpointer
from kimina_jax.run_folder import claim_run_dir, saved_steps, writable_folder, write_model_files
from kimina_jax.config import TINY, TrainConfig, config_to_dict, parse_cli, save_resolved, validate_for_devices
from kimina_jax.data import PromptRenderer, build_fix_prompts, load_prompt_dataset, load_tokenizer, train_iterator
from kimina_jax.errors import KiminaError, VerifierError
from kimina_jax.eval import dump_samples, validate
from kimina_jax.grpo import (
    PackItem,
    ReferencePolicy,
    TrainStep,
    batch_agg_metric,
    compute_advantages,
    effective_agg_mode,
    pack_samples,
    rollout_correction,
    row_length_buckets,
)
from kimina_jax.grpo.rollout_correction import is_active
from kimina_jax.grpo.dynamic_sampling import GroupFilter
from kimina_jax.models import load_hf_checkpoint
from kimina_jax.models.attention import resolve_attention_impl
from kimina_jax.models.hf import resolve_model_folder, to_jax_dtype
from kimina_jax.models.tiny import build_tiny_model
from kimina_jax.parallel import (
    allgather_objects,
    any_process,
    barrier,
    local_replica,
    make_mesh,
    maybe_initialize_distributed,
    parse_distributed_flags,
)
from kimina_jax.partial import PartialRollouts, PartialStepRollouts, staleness
from kimina_jax.pipeline import MainProcessRewarder, ProcessShardedEngine, StepRollouts, UnverifiedSteps, chunk_seed
from kimina_jax.reward import FormatError, extra_means, reward_from_config
from kimina_jax.rollout import SamplingParams, logprob_diff
from kimina_jax.rollout.factory import make_engine, share_accelerator_with_vllm
from kimina_jax.types import Sample
from kimina_jax.wandb_run import WandbRun

log = logging.getLogger("kimina_jax.train")


class StopRequested:
    """Set by SIGTERM/SIGINT; a second SIGINT interrupts at once. `grace_s` after the first signal, `on_grace_over`
    runs (in a thread): waiting for a hung verifier must not outlast a preemption's grace period."""

    def __init__(self, grace_s: float, on_grace_over: Callable[[str], None]):
        self.requested = False
        self.grace_s, self.on_grace_over = grace_s, on_grace_over

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested = True
        name = signal.Signals(signum).name
        log.warning("%s received: finishing this step (verification waited for at most %g s more), then writing a "
                    "checkpoint", name, self.grace_s)
        timer = threading.Timer(self.grace_s, self.on_grace_over, [f"abandoned {self.grace_s:g} s after {name}"])
        timer.daemon = True
        timer.start()


class Trainer:
    """The training run of one config: setup, then `fit()`."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        writable_folder(self.run_dir, "--run-dir")
        self.is_main = jax.process_index() == 0
        self.mesh = make_mesh(*validate_for_devices(cfg, jax.device_count(), jax.process_count()))
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.renderer = PromptRenderer(self.tokenizer, cfg.data.max_prompt_length)
        self.rewarder = MainProcessRewarder(
            reward_from_config(cfg.reward, cfg.verifier) if self.is_main else None
        )
        self.rewarder.check_ready()  # before any compute: a broken Lean server is one clear error, not a wasted run
        self.unverified = UnverifiedSteps(cfg.verifier.max_unverified_steps, cfg.verifier.url)
        self.model = self._load_model()
        if self.is_main:
            m = cfg.model
            log.info("%d process(es), %d %s device(s), mesh %s; %s compute, %s parameters, attention %s, remat %s; "
                     "rollout engine %s", jax.process_count(), jax.device_count(), jax.default_backend(),
                     dict(self.mesh.shape), m.dtype, m.param_dtype,
                     resolve_attention_impl(m.attention_impl, to_jax_dtype(m.dtype)), m.remat, cfg.rollout.engine)
        self.data = train_iterator(cfg.data, self.renderer, jax.process_index(), jax.process_count())
        self.val_prompts = load_prompt_dataset(
            cfg.data.val, self.renderer, cfg.data.filter_overlong_prompts, "data.val"
        ).all_prompts()
        self.steps_total = cfg.trainer.total_steps or cfg.trainer.total_epochs * self.data.steps_per_epoch
        self.step_fn = TrainStep(
            self.model, cfg.algorithm, cfg.optim, temperature=cfg.rollout.temperature,
            total_steps=self.steps_total, mesh=self.mesh, stale_rollouts=cfg.rollout.partial.enabled,
        )
        self.state = self.step_fn.init_state(self.model, seed=cfg.experiment.seed)
        self.reference = ReferencePolicy.from_config(
            cfg.algorithm.kl, self.state.params, self.step_fn, load_model=self._load_reference
        ) if cfg.algorithm.kl.enabled else None
        self.buckets = row_length_buckets(cfg.algorithm.pack_length, min_length=min(256, cfg.algorithm.pack_length))
        # Everything is checked and loaded: only now is the run folder written (a failed rerun leaves it as it was).
        claim_run_dir(self.run_dir, config_to_dict(cfg), self.model.config.to_dict(), cfg.trainer.resume, self.is_main)
        if self.is_main:
            save_resolved(cfg, self.run_dir)
            write_model_files(self.run_dir, self.model.config.to_dict(), self.tokenizer)
        barrier("model_files")  # the other processes' engines start from them
        multi = jax.process_count() > 1
        # From the arrays the updates produce, on their devices: later weight pushes then recompile nothing.
        engine_model = nnx.merge(self.step_fn.graphdef, self._engine_weights())
        self.engine = make_engine(cfg.rollout, engine_model, self.tokenizer, model_dir=self.run_dir / "model_files")
        # Validation spreads its prompts over the processes; training rollouts do so through the data shares.
        self.val_engine = ProcessShardedEngine(self.engine) if multi else self.engine
        self.checkpointer = Checkpointer(self.run_dir, keep=cfg.trainer.keep_checkpoints)
        wandb_run = None
        if cfg.logging.wandb.enabled and self.is_main:
            wandb_run = WandbRun(cfg.logging.wandb, self.run_dir, config_to_dict(cfg), cfg.experiment.name,
                                 resume=self.checkpointer.latest_step() is not None)
        self.writer = stats.MetricsWriter(
            self.run_dir, enabled=self.is_main, tensorboard=cfg.logging.tensorboard, console=cfg.logging.console,
            num_text_samples=cfg.logging.num_text_samples, total_steps=self.steps_total, wandb=wandb_run,
        )
        self.step = 0
        self._text_samples: list[Sample] = []
        self.stop = StopRequested(cfg.trainer.stop_grace_s, self.rewarder.abandon)
        # Off-policy: the next step's rollouts, generating while this step trains.
        self._next_rollouts: StepRollouts | PartialStepRollouts | None = None
        self.partial = self._partial_rollouts_state()
        self._partial_before_ahead: dict | None = None  # the groups in flight before the next step's generation

    def _partial_rollouts_state(self) -> PartialRollouts | None:
        partial, batch = self.cfg.rollout.partial, self.cfg.data.train_batch_size
        if not partial.enabled:
            return None
        share = batch // jax.process_count()
        return PartialRollouts(self.cfg.rollout.n, share, batch, jax.process_index() * share,
                               partial.over_provision, partial.max_staleness)

    def _load_model(self):
        m = self.cfg.model
        if m.path == "tiny":
            return build_tiny_model(
                m.tiny, len(self.tokenizer), eos_token_id=self.tokenizer.eos_token_id, dtype=to_jax_dtype(m.dtype),
                param_dtype=to_jax_dtype(m.param_dtype), attention_impl=m.attention_impl, remat=m.remat,
                seed=self.cfg.experiment.seed,
            )
        return load_hf_checkpoint(
            resolve_model_folder(m.path), m.dtype, self.mesh, param_dtype=m.param_dtype,
            attention_impl=m.attention_impl, remat=m.remat,
        )

    def _load_reference(self, path: str):
        m = self.cfg.model
        return load_hf_checkpoint(resolve_model_folder(path), m.dtype, self.mesh, param_dtype=m.param_dtype,
                                  attention_impl=m.attention_impl, remat=m.remat)

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> None:
        self.stop.install()
        self._resume()
        if self.step == 0 and self.cfg.trainer.val_before_train:
            self._validate()
        stopping = any_process(self.stop.requested)  # every process stops after the same step
        while self.step < self.steps_total and not stopping:
            self.step += 1
            start = time.perf_counter()  # verl's step time: everything up to logging, validation and saving too
            before = self._resumable_state()  # what a checkpoint of the previous step holds
            try:
                metrics = self.train_step()
            except VerifierError:  # the step is lost; the run is saved as the previous step left it
                self.step -= 1
                self._save_and_close(before)
                raise
            stopping = any_process(self.stop.requested) or self.unverified.exceeded
            # A stopping run saves at once (a grace period is running out): no validation.
            if not stopping and (self.step % self.cfg.trainer.test_freq == 0 or self.step == self.steps_total):
                try:
                    metrics.update(self._validate(log_now=False))
                except VerifierError:
                    self._save_and_close()
                    raise
            if self.step % self.cfg.trainer.save_freq == 0 or self.step == self.steps_total or stopping:
                with timed(metrics, "save_checkpoint"):
                    self._save()
            metrics["timing_s/step"] = time.perf_counter() - start
            metrics.update(
                stats.throughput_stats(metrics["perf/total_num_tokens"], metrics["timing_s/step"], jax.device_count())
            )
            self.writer.log_step(self.step, metrics, self._text_samples)
        self.checkpointer.wait()
        self.close()
        if self.unverified.exceeded:  # checkpointed above; the run ends non-zero
            raise self.unverified.error(self.step)

    def train_step(self) -> dict[str, float]:
        """One GRPO step, stage by stage as in DESIGN.md: rollouts -> advantages and packing -> old (and reference)
        log-probs -> updates -> weight sync -> error-fix feedback -> metrics."""
        samples, generated, metrics = self._rollouts()
        self._text_samples = samples
        if not samples:  # dynamic sampling kept no group within its generation batches: nothing to train on
            self.unverified.update(generated)
            self._dump(generated)
            return {**metrics, **self._error_fix_feedback(generated), "perf/total_num_tokens": 0.0}
        verified, advantages = self._advantages(samples)
        batches = self._pack(samples, verified, advantages)
        if self._next_rollouts is None:
            self.engine.sleep()  # releases vLLM's memory while JAX computes (no-op for the JAX sampler)
        with timed(metrics, "old_log_prob"):
            batches, entropies = self._old_logprobs(batches)
        if is_active(self.cfg.algorithm.rollout_correction, self.step_fn.off_policy):
            batches = self._rollout_correction(samples, batches, metrics)
        if self.reference is not None:
            with timed(metrics, "ref"):
                batches = [(dataclasses.replace(b, ref_logp=self.reference.logprobs(b)), idx) for b, idx in batches]
        with timed(metrics, "update_actor"):
            self.state, actor = self.step_fn.update_epochs(self.state, [b for b, _ in batches], self.step - 1)
        self._check_finite()
        self._sync_weights(metrics)
        metrics.update(self._error_fix_feedback(generated))
        metrics.update(actor)
        metrics.update(self._logprob_diff(samples, batches))
        metrics.update(self.engine.take_metrics())  # the JAX engine's rows in flight, KV blocks, preemptions
        metrics.update(self._step_metrics(samples, verified, advantages, entropies, metrics))
        self._dump(generated)
        return metrics

    def _dump(self, generated: list[Sample]) -> None:
        """Every sample generated for the step (dropped groups too), written once the step is done."""
        if self.is_main and self.cfg.logging.dump_rollouts:
            dump_samples(self.run_dir / "rollouts" / f"step_{self.step}.jsonl", generated)

    def _rollouts(self) -> tuple[list[Sample], list[Sample], dict[str, float]]:
        """This step's samples to train on, every sample generated for it (dumped, and remembered in the pass
        rates), and their metrics. The first generation batch was generated ahead in off-policy mode; with dynamic
        sampling, extra batches follow here with the current weights. Off-policy, the next step's rollouts start
        as soon as this step's are generated, sampling with the weights this step starts from: while Lean checks
        this step's proofs and the step trains (with dynamic sampling, after its extra batches: they need the
        engine and come first in the data order)."""
        rollouts = self._next_rollouts
        if rollouts is not None:
            self.data.use_ahead()
            self._partial_before_ahead = None
        else:
            rollouts = self._start_rollouts(self.step)
        self._next_rollouts = None
        drawn = self._drawn_metrics()  # the step's batch, before the next step's is drawn
        ahead = self.cfg.algorithm.off_policy and self.step < self.steps_total
        filtering = self.cfg.algorithm.filter_groups.enabled
        early = self._start_next_rollouts if ahead and not filtering else None
        generated, timings = rollouts.finish(on_generated=early)
        samples, metrics = generated, dict(timings)
        if filtering:
            samples, generated, metrics = self._filter_groups(generated, metrics)
            drawn = self._drawn_metrics()
        self.data.pass_rates.record_groups(generated, self.cfg.rollout.n)  # every process holds the global batch
        if ahead and filtering:
            self._start_next_rollouts()
        return samples, generated, {**metrics, **drawn}

    def _drawn_metrics(self) -> dict[str, float]:
        """The epoch of the latest batch drawn (verl's epoch loop) and, with skip_solved, the rows left out of it."""
        metrics = {"training/epoch": self.data.drawn_epoch}
        if self.data.skip_solved:
            metrics["data/skipped_solved"] = self.data.skipped_solved
        return metrics

    def _start_next_rollouts(self) -> None:
        self._next_rollouts = self._start_rollouts(self.step + 1, ahead=True)

    def _filter_groups(
        self, generated: list[Sample], metrics: dict[str, float]
    ) -> tuple[list[Sample], list[Sample], dict[str, float]]:
        """DAPO's dynamic sampling (`algorithm.filter_groups`, see GroupFilter): more batches of prompts are drawn
        and generated until the step has `data.train_batch_size` informative groups or `max_gen_batches` batches
        were generated. Returns the samples to train on, every sample generated and the metrics with the extra
        batches' timings added."""
        cfg = self.cfg.algorithm.filter_groups
        groups = GroupFilter(cfg.metric, self.cfg.rollout.n, self.cfg.data.train_batch_size)
        groups.add(generated)
        while not groups.full and (cfg.max_gen_batches == 0 or groups.gen_batches < cfg.max_gen_batches):
            log.info("step %d: %d informative groups after %d generation batch(es); generating another",
                     self.step, groups.kept, groups.gen_batches)
            more, timings = self._start_rollouts(self.step, gen_batch=groups.gen_batches).finish()
            groups.add(more)
            generated = generated + more
            for name, seconds in timings.items():
                metrics[name] = metrics.get(name, 0.0) + seconds
            if not any(s.is_verified for s in more):
                log.warning("step %d: the verifier judged none of a generation batch; no more batches", self.step)
                break
        if not groups.full:
            log.warning("step %d: %d of %d groups were informative after max_gen_batches (%d) generation batches; "
                        "training on those", self.step, groups.kept, groups.groups_wanted, groups.gen_batches)
        return groups.samples(), generated, {**metrics, **groups.metrics()}

    def _advantages(self, samples: list[Sample]) -> tuple[list[int], np.ndarray]:
        """The verified samples' indices and their advantages by `algorithm.adv_estimator` (unverified ones are left
        out)."""
        verified = [i for i, s in enumerate(samples) if s.is_verified]
        scores = np.array([samples[i].score for i in verified], np.float32)
        group_ids = np.array([i // self.cfg.rollout.n for i in verified], np.int32)
        algorithm = self.cfg.algorithm
        return verified, np.asarray(
            compute_advantages(algorithm.adv_estimator, scores, group_ids, algorithm.norm_adv_by_std)
        )

    def _check_finite(self) -> None:
        """Stop the run, saving nothing, when the update left a non-finite parameter: the newest checkpoint stays
        the last good one."""
        if bool(_all_finite(self.state.params)):
            return
        self.checkpointer.wait()
        kept = self.checkpointer.latest_step()
        self.close()
        raise KiminaError(
            f"step {self.step}: the update left non-finite parameters (actor/grad_norm was finite, so the step was not "
            f"skipped); stopped without saving them. The last good checkpoint: "
            f"{'none' if kept is None else self.checkpointer.directory / str(kept)}. Lower optim.lr or optim.grad_clip, "
            "or use model.param_dtype=float32")

    def _sync_weights(self, metrics: dict[str, float]) -> None:
        if self._next_rollouts is not None:
            with timed(metrics, "gen_wait"):
                self._next_rollouts.wait_generated()  # before the engine's weights change
        with timed(metrics, "sync_weights"):
            self.engine.wake()
            self.engine.update_weights(self._engine_weights())

    def _error_fix_feedback(self, samples: list[Sample]) -> dict[str, int]:
        """Failed samples with Lean feedback become turn-2 prompts (when the fix turn is on); their counts."""
        fix = self.cfg.data.error_fix
        prompts, counts = build_fix_prompts(samples, self.renderer, fix.max_feedback_chars, fix.enabled)
        if self.data.fix_cache is not None:
            self.data.fix_cache.add(prompts)
        return counts

    def _start_rollouts(
        self, step: int, ahead: bool = False, gen_batch: int = 0
    ) -> StepRollouts | PartialStepRollouts:
        """Draw training step `step`'s prompts (this process's share) and set up their rollouts; `ahead`: for the
        next step, generating in the background while this one trains; `gen_batch`: the step's generation batch
        (dynamic sampling), which places its prompts after the earlier batches' (their sampling seeds differ).
        With partial rollouts: the groups in flight topped up from the data, generated until this process has its
        share finished (kimina_jax/partial.py)."""
        label = f"step {step}" + (f" batch {gen_batch + 1}" if gen_batch else "")
        progress = label if self.is_main and self.cfg.logging.progress_bars else None
        params = self._sampling(self.cfg.rollout.n, step=step)
        if self.partial is not None:
            if ahead:
                self._partial_before_ahead = self.partial.state_dict()
            self.partial.top_up(lambda: self.data.next_batch(ahead=ahead), any_process)
            seed = chunk_seed(params.seed, gen_batch * self.cfg.data.train_batch_size)
            params = dataclasses.replace(params, seed=seed)
            rollouts = PartialStepRollouts(self.engine, self.rewarder, self.partial, params, step, self.step,
                                           self.tokenizer, progress)
        else:
            prompts = self.data.next_batch(ahead=ahead)
            first = gen_batch * self.cfg.data.train_batch_size + jax.process_index() * len(prompts)
            rollouts = StepRollouts(self.engine, self.rewarder, prompts, first, params,
                                    self.cfg.rollout.overlap_chunks, progress=progress)
        if ahead:
            rollouts.start_in_background()
        return rollouts

    def _engine_weights(self):
        """What the engine samples with: the trainer's parameters; across processes a whole copy on this process's
        devices (each process samples alone); for the JAX sampler off-policy a copy, since the update reuses the
        state's buffers while the sampler still holds them (vLLM copies pushed weights into its own)."""
        if jax.process_count() > 1:
            return local_replica(self.state.params)
        if self.cfg.algorithm.off_policy and self.cfg.rollout.engine == "jax":
            return jax.tree.map(jnp.copy, self.state.params)
        return self.state.params

    def _sampling(self, n: int, val: bool = False, step: int | None = None) -> SamplingParams:
        r = self.cfg.rollout
        v = r.val
        step = self.step if step is None else step
        return SamplingParams(
            n=n, temperature=v.temperature if val else r.temperature, top_p=v.top_p if val else r.top_p,
            top_k=v.top_k if val else r.top_k, max_tokens=r.max_tokens,
            seed=self.cfg.experiment.seed * 1_000_003 + step * 2 + int(val),
        )

    def _pack(self, samples: list[Sample], verified: list[int], advantages: np.ndarray):
        """One PackedBatch per mini-batch of `ppo_mini_batch_size` prompts (unverified samples left out)."""
        per_prompt = self.cfg.algorithm.ppo_mini_batch_size * self.cfg.rollout.n
        chunks = defaultdict(list)
        for index, advantage in zip(verified, advantages):
            chunks[index // per_prompt].append((index, float(advantage)))
        batches = []
        for _, members in sorted(chunks.items()):
            items = [PackItem(samples[i].prompt.token_ids, samples[i].completion.token_ids, adv) for i, adv in members]
            batch = pack_samples(
                items, self.buckets, loss_agg_mode=self._agg_mode,
                max_response_len=self.cfg.algorithm.loss_norm_length, rows_multiple=self.step_fn.rows_multiple,
                mixed_lengths=self.cfg.algorithm.mixed_row_lengths, pad_id=self.tokenizer.pad_token_id or 0,
            )
            batches.append((batch, [i for i, _ in members]))
        return batches

    @property
    def _agg_mode(self) -> str:
        """The policy loss's aggregation: the configured one, or the loss's own (gspo, sapo, geo_mean)."""
        return effective_agg_mode(self.cfg.algorithm.policy_loss, self.cfg.algorithm.loss_agg_mode)

    def _rollout_correction(self, samples, batches, metrics):
        """The batches with verl's rollout correction of the step's responses (the engine's log-probs against the
        old ones: importance weights, rejected tokens); its rollout_corr/* metrics into `metrics`."""
        old = [values for batch, _ in batches for values in batch.response_values(batch.old_logp)]
        engine = [samples[i].completion.logprobs for _, indices in batches for i in indices]
        correction = rollout_correction(old, engine, self.cfg.algorithm.rollout_correction, self.step_fn.off_policy)
        metrics.update(correction.metrics)
        out, first = [], 0
        for batch, indices in batches:
            span = slice(first, first + len(indices))
            first = span.stop
            pick = lambda values: None if values is None else values[span]  # noqa: E731
            out.append((batch.corrected(pick(correction.weights), pick(correction.keep), loss_agg_mode=self._agg_mode,
                                        max_response_len=self.cfg.algorithm.loss_norm_length), indices))
        return out

    def _old_logprobs(self, batches):
        """Each batch with its old log-probs (the weights before the step's updates), and every response's old
        policy entropies: verl takes `actor/entropy` from this pass."""
        with_logp, entropies = [], []
        for batch, indices in batches:
            old_logp, entropy = self.step_fn.logprobs(self.state.params, batch, with_entropy=True)
            with_logp.append((dataclasses.replace(batch, old_logp=old_logp), indices))
            entropies += batch.response_values(entropy)
        return with_logp, entropies

    def _logprob_diff(self, samples, batches) -> dict[str, float]:
        """`rollout/logprob_diff_{mean,max}`: the engine's log-probs against the trainer's old log-probs."""
        completions, trainer = [], []
        for batch, indices in batches:
            completions += [samples[i].completion for i in indices]
            trainer += batch.response_values(batch.old_logp)
        diff = logprob_diff(completions, trainer)
        return {"rollout/logprob_diff_mean": diff.mean, "rollout/logprob_diff_max": diff.max}

    def _step_metrics(self, samples, verified, advantages, entropies, timings) -> dict[str, float]:
        """verl's step metrics (SPEC 9) from the step's samples; `timings` holds its `timing_s/*` so far."""
        cfg, trainer = self.cfg, self.cfg.trainer
        self.unverified.update(samples)  # fit() stops after too many steps in a row with nothing verified
        kept = [samples[i] for i in verified]
        lengths = [len(samples[i].completion.token_ids) for i in verified]
        scores = [s.score for s in kept]
        # Nothing verified: no score, advantage or accuracy point (a 0 would read as wrong proofs), as validation.
        judged = {
            **stats.score_stats(scores),
            **stats.score_stats(scores, name="rewards"),
            **stats.advantage_stats(advantages, lengths),
            **stats.advantage_stats(advantages, lengths, name="returns"),
            "reward/accuracy": float(np.mean([s.acc for s in kept])),
        } if kept else {}
        prompts = [s.prompt for s in samples[:: cfg.rollout.n]]
        format_checked = [s for s in samples if s.format_error]  # a user's reward checks no format
        return {
            **judged,
            **stats.length_stats("response_length", [len(s.completion.token_ids) for s in samples], cfg.rollout.max_tokens),
            **stats.length_stats("prompt_length", [len(p.token_ids) for p in prompts], cfg.data.max_prompt_length),
            **(stats.format_error_counts(format_checked, [str(e) for e in FormatError]) if format_checked else {}),
            "actor/entropy": batch_agg_metric(entropies, cfg.algorithm.loss_agg_mode, cfg.algorithm.loss_norm_length),
            **staleness([s.completion for s in kept], self.step),
            "reward/unverified": float(len(samples) - len(verified)),
            **extra_means(samples),
            **self.rewarder.stats(),
            "training/global_step": self.step,
            **stats.perf_stats(
                samples, verified, timings, self.model.config.training_flops, trainer.peak_tflops_per_device,
                jax.device_count(), [d.memory_stats() for d in jax.local_devices()],
            ),
        }

    def _validate(self, log_now: bool = True) -> dict[str, float]:
        metrics = {}
        with timed(metrics, "testing"):
            val_metrics, samples = validate(
                self.val_engine, self.rewarder, self.val_prompts,
                self._sampling(self.cfg.rollout.val.n, val=True),
                self.renderer, error_fix=self.cfg.data.error_fix,
                data_source=self.cfg.data.val.name or "val",
                progress=self.is_main and self.cfg.logging.progress_bars,
            )
        metrics.update(val_metrics)
        if log_now:
            self.writer.log_step(self.step, metrics, samples)
        return metrics

    # ----------------------------------------------------------------------------------- checkpoints
    def _resumable_state(self) -> dict:
        """The data iterator's state (the position before prompts drawn ahead: a resumed run draws them again; the
        fix cache; the pass rates) and, with partial rollouts, every process's groups in flight."""
        state = {"data": self.data.state_dict()}
        if self.partial is not None:
            mine = self._partial_before_ahead or self.partial.state_dict()
            state["partial"] = allgather_objects(mine) if jax.process_count() > 1 else [mine]
        return state

    def _save(self, resumable: dict | None = None) -> None:
        """A checkpoint of `self.step`; `resumable`: a `_resumable_state()` to store (default: now)."""
        loop_state = {
            "step": self.step,
            **(self._resumable_state() if resumable is None else resumable),
            "optimizer_updates": int(self.state.step),
            "skipped_updates": int(self.state.skipped_updates),
        }
        self.checkpointer.save(
            self.step, params=self.state.params, opt_state=self.state.opt_state, rng_key=self.state.rng,
            loop_state=loop_state, config=config_to_dict(self.cfg),
        )

    def _save_and_close(self, resumable: dict | None = None) -> None:
        """Before a fatal verifier error ends the run: a checkpoint of `self.step`, unless there is one already
        (or nothing was trained)."""
        if self.step > (self.checkpointer.latest_step() or 0):
            self._save(resumable)
            log.warning("checkpoint of step %d written before stopping", self.step)
        self.checkpointer.wait()
        self.close()

    def _end_background_generation(self) -> None:
        """A run stopping while the next step's rollouts generate (a verifier error in this step's verdicts) lets
        that generation end before the engine closes; the step it was for will not run."""
        if self._next_rollouts is None:
            return
        try:
            self._next_rollouts.wait_generated()
        except Exception as err:  # noqa: BLE001 (the run ends for another reason, which must surface)
            log.warning("the next step's generation failed as the run stopped: %s", err)
        self._next_rollouts = None

    def _resume(self) -> None:
        latest = self.checkpointer.latest_step()
        if latest is None:
            return
        restored = self.checkpointer.restore(
            latest, params=self.state.params, opt_state=self.state.opt_state, rng_key=self.state.rng
        )
        loop = restored.loop_state
        self.state = dataclasses.replace(
            self.state, params=restored.params, opt_state=restored.opt_state, rng=restored.rng_key,
            step=jax.device_put(np.int32(loop["optimizer_updates"]), self.state.step.sharding),
            skipped_updates=jax.device_put(np.int32(loop["skipped_updates"]), self.state.skipped_updates.sharding),
        )
        self.data.load_state_dict(loop["data"])
        self._resume_partial(loop.get("partial"))
        self.step = int(loop["step"])
        self.engine.update_weights(self._engine_weights())
        self.writer.restart_at(self.step + 1)  # TensorBoard hides the points of the steps run again
        log.warning("resumed from %s at step %d", self.checkpointer.directory / str(latest), self.step)

    def _resume_partial(self, saved: list | None) -> None:
        """This process's groups in flight from the checkpoint (none saved: the run starts partial rollouts now)."""
        if self.partial is None:
            return
        if saved is not None and len(saved) != jax.process_count():
            raise KiminaError(f"cannot resume partial rollouts: the checkpoint holds the groups of {len(saved)} "
                              f"processes, this run has {jax.process_count()}")
        if saved is not None:
            self.partial.load_state_dict(saved[jax.process_index()])

    def close(self) -> None:
        self._end_background_generation()
        self.writer.close()
        self.engine.close()
        self.rewarder.close()
        self.checkpointer.close()


@jax.jit
def _all_finite(params) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)]))


@contextlib.contextmanager
def timed(metrics: dict, name: str):
    start = time.perf_counter()
    yield
    metrics[f"timing_s/{name}"] = time.perf_counter() - start


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # a no-op if an import did it
    logging.getLogger("kimina_jax").setLevel(logging.INFO)
    try:
        launch, argv = parse_distributed_flags(sys.argv[1:] if argv is None else argv)
        cfg = parse_cli(argv, description=__doc__)
        share_accelerator_with_vllm(cfg.rollout)
        maybe_initialize_distributed(environ={**os.environ, **launch})
        Trainer(cfg).fit()
    except KiminaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(closing_line(cfg))
    return 0


def closing_line(cfg: TrainConfig) -> str:
    """What a run just did and where to go next (the tiny default says what it was for)."""
    run = cfg.run_dir
    steps = saved_steps(run)
    checkpoint = run / "checkpoints" / str(steps[-1]) if steps else run / "checkpoints" / "<step>"
    seen = (f"the {cfg.experiment.name} recipe ran every stage of GRPO on a tiny random model (its scores mean "
            "nothing); to watch the loop learn: --config configs/learn_demo.yaml; a real run: "
            "configs/kimina_prover_1.7B.yaml (README: A real run on a GPU host)") if cfg.model.path == TINY and cfg.reward.function in (None, "lean") else ""
    return (f"done: {run}. Curves: tensorboard --logdir {run}; figures: python -m kimina_jax.report {run} --out "
            f"{run}/report; a Hugging Face folder: python -m kimina_jax.export --checkpoint {checkpoint} --out <dir>"
            + (f". Note: {seen}." if seen else "."))


if __name__ == "__main__":
    sys.exit(main())
