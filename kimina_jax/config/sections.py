"""The configuration's sections: one dataclass per stage, each key with its type, range, default and comment.

This is the configuration reference users read. A stage receives only its own section. A key derived from another
section (`_derived`, e.g. `rollout.max_tokens` from `data.max_response_length`) is filled in at load time, so each
stage still needs only its own section. A numeric key's range is on its annotation (config/ranges.py). Secrets (the
Lean server API key) come from the environment only and are never written anywhere.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

from kimina_jax.config.options import POLICY_LOSS_NAMES
from kimina_jax.config.ranges import Ge, Gt, Interval, OneOf, doc

TINY = "tiny"  # model.path / data.tokenizer value: build a tiny random Qwen3 / train a small tokenizer
ENV_URL = "LEAN_SERVER_API_URL"
ENV_KEY = "LEAN_SERVER_API_KEY"
RECIPE_MAX_RESPONSE_LENGTH = 24576


def _derived(source: str, default: int) -> Any:
    """A field filled from another section at load time; YAML may repeat it only with the same value.

    The default (the recipe's value) serves sections built directly in code, e.g. in tests.
    """
    return dataclasses.field(default=default, metadata={"derived_from": source})


@dataclasses.dataclass
class ExperimentConfig:
    name: str = "tiny"
    seed: Annotated[int, Ge(0)] = 1


@dataclasses.dataclass
class TinyModelConfig:
    """Sizes of the random Qwen3 built when `model.path` is `tiny` (head_dim >= 32: vLLM's CPU attention)."""

    hidden_size: Annotated[int, Gt(0)] = 64
    intermediate_size: Annotated[int, Gt(0)] = 128
    num_hidden_layers: Annotated[int, Gt(0)] = 2
    num_attention_heads: Annotated[int, Gt(0)] = 4
    num_key_value_heads: Annotated[int, Gt(0)] = 2
    head_dim: Annotated[int, Ge(32), doc("vLLM's CPU attention rejects smaller")] = 32
    vocab_size: Annotated[int, Gt(0), doc("null: the tokenizer's size")] | None = None
    tie_word_embeddings: bool = True
    rope_theta: Annotated[float, Gt(0)] = 1e6
    rms_norm_eps: Annotated[float, Gt(0)] = 1e-6
    max_position_embeddings: Annotated[int, Gt(0)] = 4096


@dataclasses.dataclass
class ModelConfig:
    path: str = TINY  # a Hugging Face folder or hub name, or `tiny`
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # activations / compute
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    attention_impl: Literal["auto", "xla", "cudnn", "triton", "splash"] = "auto"  # auto: cuDNN on GPU, splash on TPU
    remat: Literal["none", "full", "save_dots"] = "full"  # backward recomputation (models/qwen3/model.py RematPolicy)
    tiny: TinyModelConfig = dataclasses.field(default_factory=TinyModelConfig)


@dataclasses.dataclass
class DatasetConfig:
    """One split: files (local parquet/jsonl/json, `bundled:<name>`, or a Hub name) and their column layout."""

    files: list[str] = dataclasses.field(default_factory=list)
    layout: Literal["auto", "promptset", "minif2f", "numina"] = "auto"
    name: str | None = None  # data_source when rows carry none (None: the first file's stem / hub basename)
    hub_split: str = "train"
    where: dict[str, str] = dataclasses.field(default_factory=dict)  # keep rows whose column equals the value
    limit: Annotated[int, Gt(0), doc("null: all rows")] | None = None  # keep the first N rows (after `where`)


@dataclasses.dataclass
class ErrorFixConfig:
    """The second turn of SPEC 7."""

    enabled: bool = True
    rate: Annotated[float, Interval(ge=0, le=1)] = 0.5  # probability of a batch row from the cache (when non-empty)
    cache_size: Annotated[int, Gt(0)] = 5000
    max_feedback_chars: Annotated[int, Gt(0)] = 3000


@dataclasses.dataclass
class SkipSolvedConfig:
    """Leave out of each epoch the statements solved in every sample of each of their last `visits` training visits
    (turn-1 groups; their advantages would be 0). Off in the recipe; the pass rates are kept and saved either way."""

    enabled: bool = False
    visits: Annotated[int, Gt(0)] = 2  # k: the visits kept per statement, all of which must be solved in all n samples


@dataclasses.dataclass
class DataConfig:
    train: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    val: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    tokenizer: str | None = None  # None: model.path; `tiny`: trained on the fly from the bundled statements
    max_prompt_length: Annotated[int, Gt(0)] = 8192
    max_response_length: Annotated[int, Gt(0)] = RECIPE_MAX_RESPONSE_LENGTH
    filter_overlong_prompts: bool = True
    shuffle: bool = True
    seed: Annotated[int, Ge(0)] = 1
    train_batch_size: Annotated[int, Gt(0)] = 256  # prompts per step
    error_fix: ErrorFixConfig = dataclasses.field(default_factory=ErrorFixConfig)
    skip_solved: SkipSolvedConfig = dataclasses.field(default_factory=SkipSolvedConfig)


@dataclasses.dataclass
class ValSamplingConfig:
    n: Annotated[int, Gt(0)] = 8
    temperature: Annotated[float, Ge(0), doc("0: greedy")] = 1.0
    top_p: Annotated[float, Interval(gt=0, le=1)] = 0.95
    top_k: Annotated[int, Ge(-1), doc("-1 or 0: off")] = -1


@dataclasses.dataclass
class VllmConfig:
    tensor_parallel_size: Annotated[int, Gt(0)] = 1
    gpu_memory_utilization: Annotated[float, Interval(gt=0, le=1)] = 0.6
    max_model_len: Annotated[int, Gt(0)] | None = None  # None: max prompt + max response length
    # A fixed KV cache size (needed on CPU); None: from gpu_memory_utilization
    kv_cache_bytes: Annotated[int, Gt(0)] | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    dtype: str = "auto"
    enable_sleep_mode: bool = True  # release the engine's memory while the trainer updates
    # XLA_PYTHON_CLIENT_MEM_FRACTION for JAX on a GPU shared with vLLM (set before JAX starts); None: JAX default.
    jax_memory_fraction: Annotated[float, Interval(gt=0, le=1)] | None = None


@dataclasses.dataclass
class JaxSamplerConfig:
    """Engine `jax`: the built-in sampler (continuously batched over a paged KV cache)."""

    max_batch_rows: Annotated[int, Gt(0)] = 128  # rows decoded together at most (the largest power of two within this)
    kv_cache_bytes: Annotated[int, Gt(0), doc("null: what a call could need")] | None = 16 * 2**30  # per device
    # Tokens per block of the KV cache (vLLM's 16; TPU kernels read larger ones faster)
    kv_block_size: Annotated[int, Gt(0)] = 16


@dataclasses.dataclass
class PartialRolloutsConfig:
    """Partial rollouts (Kimi k1.5, APRIL): a step's generation stops once `data.train_batch_size` groups have all
    their samples finished; unfinished samples are carried and continued in later steps with the weights then."""

    enabled: bool = False
    over_provision: Annotated[float, Ge(1)] = 1.5  # groups in flight per step, as a multiple of data.train_batch_size
    # A group whose oldest token would train more than this many steps later is dropped
    max_staleness: Annotated[int, Ge(1)] = 4


@dataclasses.dataclass
class ServerPoolConfig:
    """Engine `vllm-server`: remote OpenAI-compatible vLLM servers."""

    urls: list[str] = dataclasses.field(default_factory=list)
    weights_dir: str | None = None  # storage every server can read; new weights are written here each step
    timeout_s: Annotated[float, Gt(0)] = 3600.0
    retries: Annotated[int, Ge(0)] = 3


@dataclasses.dataclass
class RolloutConfig:
    engine: Literal["jax", "vllm", "vllm-server"] = "vllm"
    n: Annotated[int, Gt(0)] = 8
    temperature: Annotated[float, Ge(0), doc("0: greedy")] = 1.0
    top_p: Annotated[float, Interval(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Ge(-1), doc("-1 or 0: off")] = -1
    max_tokens: Annotated[int, Gt(0)] = _derived("data.max_response_length", RECIPE_MAX_RESPONSE_LENGTH)
    # Generate each process's prompts of a step in this many engine calls; a call's groups are sent to Lean as soon
    # as it returns, while the next call generates. More calls overlap more verification but give the engine
    # smaller batches (each call waits for its longest response). 1: one call, verification after generation.
    overlap_chunks: Annotated[int, Gt(0)] = 4
    val: ValSamplingConfig = dataclasses.field(default_factory=ValSamplingConfig)
    vllm: VllmConfig = dataclasses.field(default_factory=VllmConfig)
    jax: JaxSamplerConfig = dataclasses.field(default_factory=JaxSamplerConfig)
    servers: ServerPoolConfig = dataclasses.field(default_factory=ServerPoolConfig)
    partial: PartialRolloutsConfig = dataclasses.field(default_factory=PartialRolloutsConfig)


@dataclasses.dataclass
class VerifierConfig:
    """How proofs are checked. `url` defaults to $LEAN_SERVER_API_URL; the key comes from $LEAN_SERVER_API_KEY only."""

    # `auto` (tiny recipe only): `lean` when LEAN_SERVER_API_URL is set, else the local stand-in.
    kind: Literal["lean", "standin", "auto"] = "lean"
    url: str | None = None
    api_key: str | None = dataclasses.field(default=None, repr=False, metadata={"secret": True})
    timeout_s: Annotated[float, Gt(0)] = 60.0  # per snippet, sent to the server
    batch_size: Annotated[int, Gt(0)] = 8  # snippets per request
    max_in_flight: Annotated[int, Gt(0)] = 40  # concurrent requests
    # A snippet the server could not answer (down, restarting, HTTP 5xx) is retried at least `retries` times, then
    # until `retry_budget_s` has passed since its first failure, waiting 1 s doubling up to `backoff_max_s` (with
    # jitter): a restart costs latency, not samples.
    retries: Annotated[int, Ge(0)] = 3
    retry_budget_s: Annotated[float, Ge(0), doc("0: `retries` alone")] = 120.0
    backoff_max_s: Annotated[float, Gt(0)] = 10.0
    # Stop the run (after a checkpoint) when this many steps in a row had no verified sample; 0: never.
    max_unverified_steps: Annotated[int, Ge(0), doc("0: never stop")] = 3
    # What the server's message line numbers count from (SPEC 11): `body` (after the imports: 2.0.0, PyPI's 2.1.3),
    # `code` (the whole snippet: upstream since 2025-10-24), or `auto` (one probe before the first check).
    message_lines: Literal["auto", "body", "code"] = "auto"


@dataclasses.dataclass
class FormatConfig:
    """Thresholds of the format checks (SPEC 6; `reward.format.FormatThresholds` is this class); recipe defaults."""

    # A thinking line is "significant" with this many non-stopword word tokens, and fails the response when it occurs
    # repeat_max_count times
    repeat_min_tokens: Annotated[int, Gt(0)] = 10
    repeat_max_count: Annotated[int, Ge(2), doc("1 would fail every response with a significant line")] = 6
    min_tactics_blocks: Annotated[int, Ge(0)] = 2
    tactics_lines_floor: Annotated[int, Ge(0)] = 5  # a tactics block may always have this many lines
    tactics_lines_ratio: Annotated[float, Ge(0)] = 0.95  # ... or this fraction of the final code's lines, if larger
    # The fraction of the final code's distinct lines that must appear in tactics blocks
    min_coverage: Annotated[float, Interval(ge=0, le=1)] = 0.7
    forbidden_words: list[str] = dataclasses.field(default_factory=lambda: ["axiom", "local_instance"])


@dataclasses.dataclass
class RewardConfig:
    format: FormatConfig = dataclasses.field(default_factory=FormatConfig)
    # The reward: a registered name (`lean`: the format x Lean reward; null: `lean`), or a user's function as
    # "package.module:name" or "path/to/file.py:name" (verl's custom_reward_function path + name).
    function: str | None = None
    # A user's function takes one RewardInput (false) or the list of one prompt's group (true); either may be async.
    batch: bool = False


@dataclasses.dataclass
class KlConfig:
    """KL loss to a frozen reference policy (off in the recipe; the reference exists only when on)."""

    enabled: bool = False
    coef: Annotated[float, Ge(0)] = 0.001
    # verl's kl_loss_type; a trailing `+` (k1+, k3+, low_var_kl+, ...): the estimate's value with k2's gradient
    kind: Literal["k1", "abs", "k2", "k3", "low_var_kl", "k1+", "abs+", "k2+", "k3+", "low_var_kl+"] = "low_var_kl"
    ref_path: str | None = None  # HF folder of the reference; None: the policy's initial weights
    ref_offload: bool = False  # keep the reference in host memory between its log-prob passes


@dataclasses.dataclass
class FilterGroupsConfig:
    """DAPO's dynamic sampling (verl's `algorithm.filter_groups`; off in the recipe). Groups whose `metric` is equal
    over all their verified samples (all solved or all failed: every advantage 0; fewer than 2 verified samples
    count as equal) are dropped, and more batches of prompts are drawn, generated and verified until the step has
    `data.train_batch_size` groups (the first ones kept; the surplus dropped) or `max_gen_batches` batches were
    generated (then the step trains on the groups it has)."""

    enabled: bool = False
    metric: Literal["score", "acc"] = "score"
    max_gen_batches: Annotated[int, Ge(0), doc("0: no limit")] = 0  # verl's max_num_gen_batches: batches per step


@dataclasses.dataclass
class RolloutCorrectionConfig:
    """verl's rollout correction (`algorithm.rollout_correction`, grpo/rollout_correction.py): the engine's
    log-probs of the sampled tokens against the old policy's, as importance weights on the policy loss and as
    rejection of tokens or whole sequences. Applies on-policy too (training/inference mismatch)."""

    # token: exp(old - engine log-prob) per token; sequence: exp of the sequence's sum; geometric: exp of its mean;
    # auto: token where rollouts are off-policy (algorithm.off_policy, rollout.partial), none on-policy; none: off
    rollout_is: Literal["auto", "none", "token", "sequence", "geometric"] = "auto"
    rollout_is_threshold: Annotated[float, Gt(0)] = 2.0  # the weights' upper truncation (verl's TIS cap)
    rollout_is_batch_normalize: bool = False  # weights divided by their mean over the step's batch
    # Rejection (verl's rollout_rs): comma-separated criteria, all to pass, among token_k1/k2/k3 (tokens),
    # seq_sum_k1/k2/k3, seq_mean_k1/k2/k3, seq_max_k2/k3 (whole sequences); a rejected token leaves the loss
    rollout_rs: str | None = None
    # One threshold for every criterion or one each, comma-separated; a k1 criterion takes "lower_upper" ratio
    # bounds (an upper alone: lower = 1/upper), the others an upper bound on the divergence
    rollout_rs_threshold: str | Annotated[float, Gt(0), doc("as a string, per criterion")] | None = None


@dataclasses.dataclass
class AlgorithmConfig:
    """GRPO (SPEC 3)."""

    # grpo: r - group mean; rloo: r - mean of the others; grpo_passk: only a group's best response, r_max - r_second
    # (grpo/math.py). Dr. GRPO is grpo with norm_adv_by_std false and loss_agg_mode seq-mean-token-sum-norm.
    adv_estimator: Literal["grpo", "rloo", "grpo_passk"] = "grpo"
    norm_adv_by_std: bool = False
    clip_low: Annotated[float, Interval(ge=0, lt=1)] = 0.2
    clip_high: Annotated[float, Ge(0)] = 0.3
    clip_c: Annotated[float, Gt(1), doc("verl's clip_ratio_c, the dual-clip bound")] = 3.0
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        "seq-mean-token-sum-norm"
    )
    # The L of seq-mean-token-sum-norm
    loss_norm_length: Annotated[int, Gt(0)] = _derived("data.max_response_length", RECIPE_MAX_RESPONSE_LENGTH)
    # A constant factor on the aggregated loss (policy, KL and entropy terms) before gradients and clipping: the
    # normaliser stays SPEC 3's, this reproduces the original's gradient scale (its recipes: 2, see them).
    loss_scale: Annotated[float, Gt(0)] = 1.0
    # verl's actor.policy_loss.loss_mode (grpo/math.py POLICY_LOSSES; README's table of losses). vanilla: dual-clip
    # PPO; gspo, sapo and geo_mean aggregate seq-mean-token-mean whatever loss_agg_mode says (as verl).
    policy_loss: Literal[POLICY_LOSS_NAMES] = "vanilla"
    # The loss's options under verl's names: sapo tau_pos, tau_neg; clip_cov clip_cov_ratio, clip_cov_lb,
    # clip_cov_ub; kl_cov kl_cov_ratio, ppo_kl_coef. Unset: verl's defaults; one the loss does not take: refused.
    policy_loss_options: dict[str, float] = dataclasses.field(default_factory=dict)
    kl: KlConfig = dataclasses.field(default_factory=KlConfig)
    entropy_coeff: Annotated[float, Ge(0)] = 0.0
    ppo_mini_batch_size: Annotated[int, Gt(0)] = 32  # prompts per optimizer update
    ppo_epochs: Annotated[int, Gt(0)] = 1
    pack_length: Annotated[int, Gt(0)] | None = None  # tokens per packed row; None: max prompt + max response length
    # Packed rows per gradient-accumulation micro-batch (per data-parallel shard)
    micro_batch_rows: Annotated[int, Gt(0)] = 1
    # Micro-batches of a mini-batch may differ in row length where that saves 2% of the slots (grpo/packing.py):
    # less padding where micro-batches are few, more compiled shapes; false: one row length per mini-batch.
    mixed_row_lengths: bool = True
    logits_chunk_tokens: Annotated[int, Gt(0)] = 1024  # tokens per lm_head + log-softmax chunk
    # One-step off-policy: step t+1's rollouts are generated with step t's weights as soon as step t's are, while
    # Lean checks step t's and step t trains.
    off_policy: bool = False
    rollout_correction: RolloutCorrectionConfig = dataclasses.field(default_factory=RolloutCorrectionConfig)
    filter_groups: FilterGroupsConfig = dataclasses.field(default_factory=FilterGroupsConfig)


@dataclasses.dataclass
class OptimConfig:
    lr: Annotated[float, Gt(0)] = 2e-6
    warmup_steps: Annotated[int, Ge(0)] = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: Annotated[float, Interval(ge=0, le=1)] = 0.0  # cosine floor, as a fraction of lr
    weight_decay: Annotated[float, Ge(0)] = 0.01
    b1: Annotated[float, Interval(ge=0, lt=1)] = 0.9
    b2: Annotated[float, Interval(ge=0, lt=1)] = 0.999
    eps: Annotated[float, Gt(0)] = 1e-8
    grad_clip: Annotated[float, Gt(0), doc("the global-norm bound")] = 1.0


@dataclasses.dataclass
class MeshConfig:
    """Device mesh axis sizes; one may be -1 (all remaining devices)."""

    data: Annotated[int, OneOf(-1, Gt(0)), doc("-1: all remaining devices")] = 1
    fsdp: Annotated[int, OneOf(-1, Gt(0)), doc("-1: all remaining devices")] = -1
    tensor: Annotated[int, OneOf(-1, Gt(0)), doc("-1: all remaining devices")] = 1


@dataclasses.dataclass
class TrainerConfig:
    total_epochs: Annotated[int, Gt(0)] = 15
    total_steps: Annotated[int, Gt(0), doc("null: total_epochs x steps per epoch")] | None = None
    save_freq: Annotated[int, Gt(0)] = 5
    test_freq: Annotated[int, Gt(0)] = 5
    val_before_train: bool = True
    keep_checkpoints: Annotated[int, Gt(0)] = 3
    run_dir: str | None = None  # None: runs/<experiment.name>
    # auto: continue from the run folder's newest checkpoint (refused if it was made for another model or tokenizer);
    # never: start a new run there, the earlier run's records moved to <run_dir>/previous/<UTC time>/
    resume: Literal["auto", "never"] = "auto"
    # After SIGTERM/SIGINT, verification still unanswered this long is left unverified
    stop_grace_s: Annotated[float, Ge(0)] = 30.0
    # The dense bf16 peak (H100/H200: 989); set it to log perf/mfu
    peak_tflops_per_device: Annotated[float, Gt(0), doc("null: no perf/mfu")] | None = None


@dataclasses.dataclass
class WandbConfig:
    """Weights & Biases beside TensorBoard (kimina_jax/wandb_run.py; `pip install -e ".[wandb]"`)."""

    enabled: bool = False
    project: str = "kimina-jax"
    entity: str | None = None  # None: the account's default
    name: str | None = None  # None: experiment.name
    mode: Literal["online", "offline"] | None = None  # None: $WANDB_MODE, else online


@dataclasses.dataclass
class LoggingConfig:
    tensorboard: bool = True
    console: bool = True
    num_text_samples: Annotated[int, Ge(0)] = 2  # responses shown as text in TensorBoard per step
    progress_bars: bool = True
    dump_rollouts: bool = True  # every sample of every step to <run_dir>/rollouts/step_<N>.jsonl
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)


@dataclasses.dataclass
class SharedSections:
    """The sections training and evaluation both read: one class, one default, one check each."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    verifier: VerifierConfig = dataclasses.field(default_factory=VerifierConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)


@dataclasses.dataclass
class TrainConfig(SharedSections):
    experiment: ExperimentConfig = dataclasses.field(default_factory=ExperimentConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.run_dir or f"runs/{self.experiment.name}")


def uses_lean(cfg: SharedSections) -> bool:
    """Whether the run's reward talks to the Lean server (the built-in reward with `verifier.kind` lean)."""
    return cfg.reward.function in (None, "lean") and cfg.verifier.kind == "lean"
