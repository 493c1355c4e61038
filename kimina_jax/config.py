"""The training recipe as typed dataclasses: YAML files, dotted command-line overrides, validation.

One dataclass per stage; a stage receives only its own section. Values that one section derives from
another (e.g. `rollout.max_tokens` from `data.max_response_length`) are filled in at load time so that
each stage still needs only its own section. Secrets (the Lean server API key) come from the environment
only and are never written anywhere.

Over 400 lines on purpose: every section's dataclass, with each key's default and comment, is the configuration
reference users read, and the loading and checks beside it are the one place each key is interpreted.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from kimina_jax.errors import KiminaError
from kimina_jax.urls import redact_url

TINY = "tiny"  # model.path / data.tokenizer value: build a tiny random Qwen3 / train a small tokenizer
RECIPE_DIR = Path(__file__).parent / "configs"
DEFAULT_RECIPE = "tiny"
ENV_URL = "LEAN_SERVER_API_URL"
ENV_KEY = "LEAN_SERVER_API_KEY"
RECIPE_MAX_RESPONSE_LENGTH = 24576


def _derived(source: str, default: int) -> Any:
    """A field filled from another section at load time; YAML may repeat it only with the same value.

    The default (the recipe's value) serves sections built directly in code, e.g. in tests.
    """
    return dataclasses.field(default=default, metadata={"derived_from": source})


# ---------------------------------------------------------------------------------------------- sections
@dataclasses.dataclass
class ExperimentConfig:
    name: str = "tiny"
    seed: int = 1


@dataclasses.dataclass
class TinyModelConfig:
    """Sizes of the random Qwen3 built when `model.path` is `tiny` (head_dim >= 32: vLLM's CPU attention)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    vocab_size: int | None = None  # None: the tokenizer's size
    tie_word_embeddings: bool = True
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096


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
    limit: int | None = None  # keep the first N rows (after `where`)


@dataclasses.dataclass
class ErrorFixConfig:
    """The second turn of SPEC 7."""

    enabled: bool = True
    rate: float = 0.5  # probability that a batch row is drawn from the cache (when non-empty)
    cache_size: int = 5000
    max_feedback_chars: int = 3000


@dataclasses.dataclass
class SkipSolvedConfig:
    """Leave out of each epoch the statements solved in every sample of each of their last `visits` training visits
    (turn-1 groups; their advantages would be 0). Off in the recipe; the pass rates are kept and saved either way."""

    enabled: bool = False
    visits: int = 2  # k: the visits kept per statement, all of which must be solved in all n samples


@dataclasses.dataclass
class DataConfig:
    train: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    val: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    tokenizer: str | None = None  # None: model.path; `tiny`: trained on the fly from the bundled statements
    max_prompt_length: int = 8192
    max_response_length: int = RECIPE_MAX_RESPONSE_LENGTH
    filter_overlong_prompts: bool = True
    shuffle: bool = True
    seed: int = 1
    train_batch_size: int = 256  # prompts per step
    error_fix: ErrorFixConfig = dataclasses.field(default_factory=ErrorFixConfig)
    skip_solved: SkipSolvedConfig = dataclasses.field(default_factory=SkipSolvedConfig)


@dataclasses.dataclass
class ValSamplingConfig:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = -1


@dataclasses.dataclass
class VllmConfig:
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.6
    max_model_len: int | None = None  # None: max prompt + max response length
    kv_cache_bytes: int | None = None  # fixed KV cache size (needed on CPU); None: from gpu_memory_utilization
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    dtype: str = "auto"
    enable_sleep_mode: bool = True  # release the engine's memory while the trainer updates
    # XLA_PYTHON_CLIENT_MEM_FRACTION for JAX on a GPU shared with vLLM (set before JAX starts); None: JAX default.
    jax_memory_fraction: float | None = None


@dataclasses.dataclass
class JaxSamplerConfig:
    """Engine `jax`: the built-in sampler (continuously batched over a paged KV cache)."""

    max_batch_rows: int = 128  # rows decoded together at most (the largest power of two within this)
    kv_cache_bytes: int | None = 16 * 2**30  # the KV block pool per device; None: what a call could need
    kv_block_size: int = 16  # tokens per block of the KV cache (vLLM's 16; TPU kernels read larger ones faster)


@dataclasses.dataclass
class PartialRolloutsConfig:
    """Partial rollouts (Kimi k1.5, APRIL): a step's generation stops once `data.train_batch_size` groups have all
    their samples finished; unfinished samples are carried and continued in later steps with the weights then."""

    enabled: bool = False
    over_provision: float = 1.5  # groups in flight per step, as a multiple of data.train_batch_size
    max_staleness: int = 4  # a group whose oldest token would train more than this many steps later is dropped


@dataclasses.dataclass
class ServerPoolConfig:
    """Engine `vllm-server`: remote OpenAI-compatible vLLM servers."""

    urls: list[str] = dataclasses.field(default_factory=list)
    weights_dir: str | None = None  # storage every server can read; new weights are written here each step
    timeout_s: float = 3600.0
    retries: int = 3


@dataclasses.dataclass
class RolloutConfig:
    engine: Literal["jax", "vllm", "vllm-server"] = "vllm"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    max_tokens: int = _derived("data.max_response_length", RECIPE_MAX_RESPONSE_LENGTH)
    # Generate each process's prompts of a step in this many engine calls; a call's groups are sent to Lean as soon
    # as it returns, while the next call generates. More calls overlap more verification but give the engine
    # smaller batches (each call waits for its longest response). 1: one call, verification after generation.
    overlap_chunks: int = 4
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
    timeout_s: float = 60.0  # per snippet, sent to the server
    batch_size: int = 8  # snippets per request
    max_in_flight: int = 40  # concurrent requests
    # A snippet the server could not answer (down, restarting, HTTP 5xx) is retried at least `retries` times, then
    # until `retry_budget_s` has passed since its first failure, waiting 1 s doubling up to `backoff_max_s` (with
    # jitter): a restart costs latency, not samples.
    retries: int = 3
    retry_budget_s: float = 120.0
    backoff_max_s: float = 10.0
    # Stop the run (after a checkpoint) when this many steps in a row had no verified sample; 0: never.
    max_unverified_steps: int = 3
    # What the server's message line numbers count from (SPEC 11): `body` (after the imports: 2.0.0, PyPI's 2.1.3),
    # `code` (the whole snippet: upstream since 2025-10-24), or `auto` (one probe before the first check).
    message_lines: Literal["auto", "body", "code"] = "auto"


@dataclasses.dataclass
class FormatConfig:
    """Thresholds of the format checks (SPEC 6; `reward.format.FormatThresholds` is this class); recipe defaults."""

    repeat_min_tokens: int = 10  # a thinking line is "significant" with this many non-stopword word tokens
    repeat_max_count: int = 6  # ... and fails the response when it occurs this many times
    min_tactics_blocks: int = 2
    tactics_lines_floor: int = 5  # a tactics block may always have this many lines
    tactics_lines_ratio: float = 0.95  # ... or this fraction of the final lean4 code's lines, whichever is larger
    min_coverage: float = 0.7  # fraction of the final code's distinct lines that must appear in tactics blocks
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
    coef: float = 0.001
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
    max_gen_batches: int = 0  # verl's max_num_gen_batches: generation batches per step at most; 0: no limit


# The options each policy loss takes (algorithm.policy_loss_options): verl's names, defaults and our ranges.
POLICY_LOSS_OPTIONS: dict[str, dict[str, tuple[float, str]]] = {
    "sapo": {"tau_pos": (1.0, "> 0"), "tau_neg": (1.05, "> 0")},
    "clip_cov": {"clip_cov_ratio": (0.0002, "(0, 1]"), "clip_cov_lb": (1.0, "finite"),
                 "clip_cov_ub": (5.0, "> clip_cov_lb")},
    "kl_cov": {"kl_cov_ratio": (0.0002, "(0, 1]"), "ppo_kl_coef": (0.1, ">= 0")},
}
POLICY_LOSS_NAMES = ("vanilla", "gspo", "cispo", "geo_mean", "sapo", "gpg", "clip_cov", "kl_cov")


def policy_loss_options(name: str, options: Mapping[str, float], key: str | None = None) -> dict[str, float]:
    """The options of policy loss `name`: `options` over verl's defaults, checked. An unknown loss, an option it
    does not take or a value out of range is a KiminaError naming it (`key`: the options' config key)."""
    if name not in POLICY_LOSS_NAMES:
        raise KiminaError(f"unknown policy loss {name!r}; expected one of {', '.join(POLICY_LOSS_NAMES)}")
    spec = POLICY_LOSS_OPTIONS.get(name, {})
    for option in options:
        if option not in spec:
            takes = f"takes {', '.join(spec)}" if spec else "takes no options"
            raise KiminaError(f"'{_option_key(key, option)}' is not an option of policy loss {name!r} (it {takes})")
    values = {option: float(options.get(option, default)) for option, (default, _) in spec.items()}
    for option, (_, allowed) in spec.items():
        value = values[option]
        ok = {"> 0": value > 0, ">= 0": value >= 0, "(0, 1]": 0 < value <= 1, "finite": math.isfinite(value),
              "> clip_cov_lb": value > values.get("clip_cov_lb", -math.inf)}[allowed]
        if not ok:
            raise KiminaError(f"'{_option_key(key, option)}' must be {allowed}, got {value}")
    return values


def _option_key(key: str | None, option: str) -> str:
    return option if key is None else f"{key}.{option}"


# verl's rollout_rs criteria: a divergence (k1: log-ratio, k2, k3) per token, or per sequence its sum, mean or max.
REJECTION_CRITERIA = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
                      "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")


def rejection_criteria(spec: str, thresholds: str | float | None) -> list[tuple[str, float | None, float]]:
    """verl's `rollout_rs` and `rollout_rs_threshold` read: (criterion, lower, upper) for each distinct criterion,
    in order. k1 criteria bound the probability ratio (lower given, or 1/upper), the others the divergence."""
    key = "algorithm.rollout_correction"
    names = list(dict.fromkeys(part.strip() for part in spec.split(",") if part.strip()))
    if not names:
        raise KiminaError(f"'{key}.rollout_rs' names no criterion; expected some of {', '.join(REJECTION_CRITERIA)}")
    for name in names:
        if name not in REJECTION_CRITERIA:
            raise KiminaError(f"'{key}.rollout_rs': unknown criterion {name!r}; expected "
                              f"{', '.join(REJECTION_CRITERIA)}")
    if thresholds is None:
        raise KiminaError(f"'{key}.rollout_rs' needs '{key}.rollout_rs_threshold'")
    specs = [part.strip() for part in str(thresholds).split(",") if part.strip()]
    if len(specs) not in (1, len(names)):
        raise KiminaError(f"'{key}.rollout_rs_threshold' gives {len(specs)} thresholds for {len(names)} criteria: "
                          "give one for all or one each")
    criteria = []
    for name, text in zip(names, specs * len(names) if len(specs) == 1 else specs):
        parts = text.split("_") if name.endswith("k1") else [text]
        try:
            bounds = [float(part) for part in parts]
        except ValueError:
            bounds = []
        if len(bounds) not in (1, 2) or not all(b > 0 and math.isfinite(b) for b in bounds):
            form = "a ratio upper bound or lower_upper" if name.endswith("k1") else "one upper bound"
            raise KiminaError(f"'{key}.rollout_rs_threshold' {text!r} for {name}: expected {form}, positive numbers")
        lower = (bounds[0] if len(bounds) == 2 else 1.0 / bounds[0]) if name.endswith("k1") else None
        criteria.append((name, lower, bounds[-1]))
    return criteria


@dataclasses.dataclass
class RolloutCorrectionConfig:
    """verl's rollout correction (`algorithm.rollout_correction`, grpo/rollout_correction.py): the engine's
    log-probs of the sampled tokens against the old policy's, as importance weights on the policy loss and as
    rejection of tokens or whole sequences. Applies on-policy too (training/inference mismatch)."""

    # token: exp(old - engine log-prob) per token; sequence: exp of the sequence's sum; geometric: exp of its mean;
    # auto: token where rollouts are off-policy (algorithm.off_policy, rollout.partial), none on-policy; none: off
    rollout_is: Literal["auto", "none", "token", "sequence", "geometric"] = "auto"
    rollout_is_threshold: float = 2.0  # the weights' upper truncation (verl's TIS cap)
    rollout_is_batch_normalize: bool = False  # weights divided by their mean over the step's batch
    # Rejection (verl's rollout_rs): comma-separated criteria, all to pass, among token_k1/k2/k3 (tokens),
    # seq_sum_k1/k2/k3, seq_mean_k1/k2/k3, seq_max_k2/k3 (whole sequences); a rejected token leaves the loss
    rollout_rs: str | None = None
    # One threshold for every criterion or one each, comma-separated; a k1 criterion takes "lower_upper" ratio
    # bounds (an upper alone: lower = 1/upper), the others an upper bound on the divergence
    rollout_rs_threshold: str | float | None = None


@dataclasses.dataclass
class AlgorithmConfig:
    """GRPO (SPEC 3)."""

    # grpo: r - group mean; rloo: r - mean of the others; grpo_passk: only a group's best response, r_max - r_second
    # (grpo/math.py). Dr. GRPO is grpo with norm_adv_by_std false and loss_agg_mode seq-mean-token-sum-norm.
    adv_estimator: Literal["grpo", "rloo", "grpo_passk"] = "grpo"
    norm_adv_by_std: bool = False
    clip_low: float = 0.2
    clip_high: float = 0.3
    clip_c: float = 3.0
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        "seq-mean-token-sum-norm"
    )
    loss_norm_length: int = _derived("data.max_response_length", RECIPE_MAX_RESPONSE_LENGTH)  # L of ...-sum-norm
    # A constant factor on the aggregated loss (policy, KL and entropy terms) before gradients and clipping: the
    # normaliser stays SPEC 3's, this reproduces the original's gradient scale (its recipes: 2, see them).
    loss_scale: float = 1.0
    # verl's actor.policy_loss.loss_mode (grpo/math.py POLICY_LOSSES; README's table of losses). vanilla: dual-clip
    # PPO; gspo, sapo and geo_mean aggregate seq-mean-token-mean whatever loss_agg_mode says (as verl).
    policy_loss: Literal[POLICY_LOSS_NAMES] = "vanilla"
    # The loss's options under verl's names: sapo tau_pos, tau_neg; clip_cov clip_cov_ratio, clip_cov_lb,
    # clip_cov_ub; kl_cov kl_cov_ratio, ppo_kl_coef. Unset: verl's defaults; one the loss does not take: refused.
    policy_loss_options: dict[str, float] = dataclasses.field(default_factory=dict)
    kl: KlConfig = dataclasses.field(default_factory=KlConfig)
    entropy_coeff: float = 0.0
    ppo_mini_batch_size: int = 32  # prompts per optimizer update
    ppo_epochs: int = 1
    pack_length: int | None = None  # tokens per packed row; None: max prompt + max response length
    micro_batch_rows: int = 1  # packed rows per gradient-accumulation micro-batch (per data-parallel shard)
    # Micro-batches of a mini-batch may differ in row length where that saves 2% of the slots (grpo/packing.py):
    # less padding where micro-batches are few, more compiled shapes; false: one row length per mini-batch.
    mixed_row_lengths: bool = True
    logits_chunk_tokens: int = 1024  # tokens per lm_head + log-softmax chunk
    # One-step off-policy: step t+1's rollouts are generated with step t's weights as soon as step t's are, while
    # Lean checks step t's and step t trains.
    off_policy: bool = False
    rollout_correction: RolloutCorrectionConfig = dataclasses.field(default_factory=RolloutCorrectionConfig)
    filter_groups: FilterGroupsConfig = dataclasses.field(default_factory=FilterGroupsConfig)


@dataclasses.dataclass
class OptimConfig:
    lr: float = 2e-6
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm


@dataclasses.dataclass
class MeshConfig:
    """Device mesh axis sizes; one may be -1 (all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass
class TrainerConfig:
    total_epochs: int = 15
    total_steps: int | None = None  # None: total_epochs x steps per epoch
    save_freq: int = 5
    test_freq: int = 5
    val_before_train: bool = True
    keep_checkpoints: int = 3
    run_dir: str | None = None  # None: runs/<experiment.name>
    # auto: continue from the run folder's newest checkpoint (refused if it was made for another model or tokenizer);
    # never: start a new run there, the earlier run's records moved to <run_dir>/previous/<UTC time>/
    resume: Literal["auto", "never"] = "auto"
    stop_grace_s: float = 30.0  # after SIGTERM/SIGINT, verification still unanswered this long is left unverified
    peak_tflops_per_device: float | None = None  # dense bf16 peak (H100/H200: 989); set it to log perf/mfu


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
    num_text_samples: int = 2  # responses shown as text in TensorBoard per step
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


# ---------------------------------------------------------------------------------------------- building
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list (items: {_describe(typing.get_args(tp)[0])})"
    if origin is dict:
        return f"a mapping (values: {_describe(typing.get_args(tp)[1])})"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {type(None): "null", bool: "a bool", int: "an int", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (sections built recursively)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise KiminaError(f"{source}: '{key}' must be a mapping (section), got {value!r}")
        return _build(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key, source)
            except KiminaError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, Mapping):
            _, item_tp = typing.get_args(tp)
            return {str(k): _convert(v, item_tp, f"{key}.{k}", source) for k, v in value.items()}
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) reads `2e-6` as a string; accept what is plainly a number.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise KiminaError(f"{source}: '{key}' must be {_describe(tp)}, got {value!r}")


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise KiminaError(_unknown_key_message(key, name, list(fields), source))
        if fields[name].metadata.get("secret"):
            raise KiminaError(f"{source}: '{key}' cannot be set in a config; set ${ENV_KEY} in the environment")
        if "derived_from" in fields[name].metadata:
            continue  # compared with the value it derives from, in _resolve
        kwargs[name] = _convert(value, hints[name], key, source)
    return cls(**kwargs)


def _unknown_key_message(key: str, name: str, allowed: list[str], source: str) -> str:
    close = difflib.get_close_matches(str(name), allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{source}: unknown key '{key}'{hint}; allowed keys here: {', '.join(allowed)}"


def lookup(data: Mapping[str, Any], dotted: str) -> Any:
    """`data["a"]["b"]` for "a.b"; None when a key is missing."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


# ---------------------------------------------------------------------------------------------- overrides
def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML scalars/flow) to a raw config mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise KiminaError(f"override '{item}' must look like dotted.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise KiminaError(f"override '{item}': the value is not valid YAML: {_yaml_error(exc)}") from None
        _set(data, key, value, f"override '{item}'")
    return data


def _yaml_error(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: where, then what."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + (getattr(exc, "problem", None) or " ".join(str(exc).split()))


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file's content; an unreadable or binary file is one error naming it (and the line)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KiminaError(f"cannot read {what} {path}: {exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise KiminaError(
            f"{path}:{line}: the {what} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})"
        ) from None


def _set(data: dict[str, Any], key: str, value: Any, what: str) -> None:
    """Set `dotted.key` of a raw config mapping, making the sections on the way."""
    node = data
    *parents, last = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise KiminaError(f"{what}: '{part}' is not a section")
        node = child
    node[last] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(read_text(path, "config"))
    except yaml.YAMLError as exc:
        raise KiminaError(f"{path}: not valid YAML: {_yaml_error(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KiminaError(f"{path}: the top level must be a mapping of sections")
    return data


def resolve_recipe_path(name_or_path: str | os.PathLike | None) -> Path:
    """A YAML path, or the name of a recipe shipped in the package (`tiny`, `kimina_prover_1.7B`, ...)."""
    if name_or_path is None:
        name_or_path = DEFAULT_RECIPE
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPE_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if shipped.exists():
        return shipped
    available = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
    raise KiminaError(f"config '{name_or_path}' is neither a file nor a shipped recipe ({available})")


# ---------------------------------------------------------------------------------------------- loading
def config_from_dict(
    data: Mapping[str, Any], *, env: Mapping[str, str] | None = None, source: str = "<config>"
) -> TrainConfig:
    """Build, resolve derived values and check a config from a raw mapping (as read from YAML)."""
    env = os.environ if env is None else env
    cfg = _build(TrainConfig, data, "", source)
    _resolve(cfg, data, env, source)
    _check(cfg, source)
    return cfg


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    run_dir: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    needs_verifier: bool = True,
) -> TrainConfig:
    """Read a recipe (a path or a shipped recipe name; default `tiny`), apply overrides and `--run-dir`.
    `needs_verifier=False`: a Lean recipe without a server configured is accepted (planning runs no step)."""
    recipe = resolve_recipe_path(path)
    data = apply_overrides(_read_yaml(recipe), overrides)
    if run_dir is not None:
        data.setdefault("trainer", {})["run_dir"] = str(run_dir)
    env = os.environ if env is None else env
    cfg = config_from_dict(data, env=env, source=str(recipe))
    if needs_verifier and uses_lean(cfg) and not cfg.verifier.url:
        raise KiminaError(
            f"{recipe}: verifier.kind is 'lean' but no server is configured: set ${ENV_URL} "
            "(e.g. http://localhost after launch/lean_server.sh)"
        )
    return cfg


def parse_cli(argv: Sequence[str] | None = None, description: str = "") -> TrainConfig:
    """The command line shared by the entry points: `--config`, `--run-dir` and `dotted.key=value` overrides.

    With no `--config`, the `tiny` recipe shipped inside the package is used.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config", default=None, help=f"recipe YAML or shipped recipe name (default: {DEFAULT_RECIPE})"
    )
    parser.add_argument("--run-dir", default=None, help="run folder (default: runs/<experiment.name>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rollout.n=4 data.train_batch_size=8")
    args = parser.parse_intermixed_args(argv)  # flags and overrides in any order
    return load_config(args.config, args.overrides, run_dir=args.run_dir)


def _resolve(cfg: TrainConfig, data: Mapping[str, Any], env: Mapping[str, str], source: str) -> None:
    derived = {
        "rollout.max_tokens": cfg.data.max_response_length,
        "algorithm.loss_norm_length": cfg.data.max_response_length,
    }
    for key, value in derived.items():
        given = lookup(data, key)
        if given is not None and given != value:
            raise KiminaError(
                f"{source}: '{key}' is derived from data.max_response_length ({value}); got {given!r}. "
                "Set data.max_response_length instead."
            )
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)

    full_length = cfg.data.max_prompt_length + cfg.data.max_response_length
    if cfg.data.tokenizer is None:
        cfg.data.tokenizer = cfg.model.path
    if cfg.rollout.vllm.max_model_len is None:
        cfg.rollout.vllm.max_model_len = full_length
    if cfg.algorithm.pack_length is None:
        cfg.algorithm.pack_length = full_length
    if cfg.verifier.url is None:
        cfg.verifier.url = env.get(ENV_URL) or None
    cfg.verifier.api_key = env.get(ENV_KEY) or None
    if cfg.verifier.kind == "auto":
        cfg.verifier.kind = "lean" if cfg.verifier.url else "standin"


# The allowed values of every numeric key, in one place. A range is `> a`, `>= a`, an interval (`[a, b)`: brackets
# closed, parentheses open) or a single value, alternatives joined by ` | `; after `;`, a note the error shows. Null,
# where a key's type allows it, is always allowed; a list key's range holds for each item; every float must be finite.
RANGES: dict[str, str] = {
    "experiment.seed": ">= 0",
    "model.tiny.hidden_size": "> 0",
    "model.tiny.intermediate_size": "> 0",
    "model.tiny.num_hidden_layers": "> 0",
    "model.tiny.num_attention_heads": "> 0",
    "model.tiny.num_key_value_heads": "> 0",
    "model.tiny.head_dim": ">= 32; vLLM's CPU attention rejects smaller",
    "model.tiny.vocab_size": "> 0; null: the tokenizer's size",
    "model.tiny.rope_theta": "> 0",
    "model.tiny.rms_norm_eps": "> 0",
    "model.tiny.max_position_embeddings": "> 0",
    "data.max_prompt_length": "> 0",
    "data.max_response_length": "> 0",
    "data.seed": ">= 0",
    "data.train_batch_size": "> 0",
    "data.train.limit": "> 0; null: all rows",
    "data.val.limit": "> 0; null: all rows",
    "data.error_fix.rate": "[0, 1]",
    "data.error_fix.cache_size": "> 0",
    "data.error_fix.max_feedback_chars": "> 0",
    "data.skip_solved.visits": "> 0",
    "rollout.n": "> 0",
    "rollout.temperature": ">= 0; 0: greedy",
    "rollout.top_p": "(0, 1]",
    # Every engine takes top_k <= 0 as "off" (vLLM: 0 or -1, verl's default -1); below -1 is a mistake.
    "rollout.top_k": ">= -1; -1 or 0: off",
    "rollout.max_tokens": "> 0",
    "rollout.overlap_chunks": "> 0",
    "rollout.val.n": "> 0",
    "rollout.val.temperature": ">= 0; 0: greedy",
    "rollout.val.top_p": "(0, 1]",
    "rollout.val.top_k": ">= -1; -1 or 0: off",
    "rollout.vllm.tensor_parallel_size": "> 0",
    "rollout.vllm.gpu_memory_utilization": "(0, 1]",
    "rollout.vllm.max_model_len": "> 0",
    "rollout.vllm.kv_cache_bytes": "> 0",
    "rollout.vllm.jax_memory_fraction": "(0, 1]",
    "rollout.jax.max_batch_rows": "> 0",
    "rollout.jax.kv_cache_bytes": "> 0; null: what a call could need",
    "rollout.jax.kv_block_size": "> 0",
    "rollout.servers.timeout_s": "> 0",
    "rollout.partial.over_provision": ">= 1",
    "rollout.partial.max_staleness": ">= 1",
    "rollout.servers.retries": ">= 0",
    "verifier.timeout_s": "> 0",
    "verifier.batch_size": "> 0",
    "verifier.max_in_flight": "> 0",
    "verifier.retries": ">= 0",
    "verifier.retry_budget_s": ">= 0; 0: `retries` alone",
    "verifier.backoff_max_s": "> 0",
    "verifier.max_unverified_steps": ">= 0; 0: never stop",
    "reward.format.repeat_min_tokens": "> 0",
    "reward.format.repeat_max_count": ">= 2; 1 would fail every response with a significant line",
    "reward.format.min_tactics_blocks": ">= 0",
    "reward.format.tactics_lines_floor": ">= 0",
    "reward.format.tactics_lines_ratio": ">= 0",
    "reward.format.min_coverage": "[0, 1]",
    "algorithm.clip_low": "[0, 1)",
    "algorithm.clip_high": ">= 0",
    "algorithm.clip_c": "> 1; verl's clip_ratio_c, the dual-clip bound",
    "algorithm.loss_norm_length": "> 0",
    "algorithm.loss_scale": "> 0",
    "algorithm.kl.coef": ">= 0",
    "algorithm.entropy_coeff": ">= 0",
    "algorithm.ppo_mini_batch_size": "> 0",
    "algorithm.ppo_epochs": "> 0",
    "algorithm.pack_length": "> 0",
    "algorithm.micro_batch_rows": "> 0",
    "algorithm.logits_chunk_tokens": "> 0",
    "algorithm.rollout_correction.rollout_is_threshold": "> 0",
    "algorithm.rollout_correction.rollout_rs_threshold": "> 0; as a string, per criterion (rejection_criteria)",
    "algorithm.filter_groups.max_gen_batches": ">= 0; 0: no limit",
    "optim.lr": "> 0",
    "optim.warmup_steps": ">= 0",
    "optim.min_lr_ratio": "[0, 1]",
    "optim.weight_decay": ">= 0",
    "optim.b1": "[0, 1)",
    "optim.b2": "[0, 1)",
    "optim.eps": "> 0",
    "optim.grad_clip": "> 0; the global-norm bound",
    "mesh.data": "-1 | > 0; -1: all remaining devices",
    "mesh.fsdp": "-1 | > 0; -1: all remaining devices",
    "mesh.tensor": "-1 | > 0; -1: all remaining devices",
    "trainer.total_epochs": "> 0",
    "trainer.total_steps": "> 0; null: total_epochs x steps per epoch",
    "trainer.save_freq": "> 0",
    "trainer.test_freq": "> 0",
    "trainer.keep_checkpoints": "> 0",
    "trainer.stop_grace_s": ">= 0",
    "trainer.peak_tflops_per_device": "> 0; null: no perf/mfu",
    "logging.num_text_samples": ">= 0",
    "eval.dataset.limit": "> 0; null: all rows",
    "eval.n": ">= 1",
    "eval.k": ">= 1",
    "eval.seed": ">= 0",
    "eval.batch_problems": ">= 1",
}


def _allows(spec: str, value: float) -> bool:
    """Whether `value` is within a RANGES spec (its note left out)."""
    for alt in (a.strip() for a in spec.split(";")[0].split("|")):
        if alt[0] in "[(":
            low, high = (float(x) for x in alt[1:-1].split(","))
            above = low < value or (alt[0] == "[" and value == low)
            below = value < high or (alt[-1] == "]" and value == high)
            if above and below:
                return True
        elif alt.startswith(">"):
            bound = float(alt.lstrip(">="))
            if value > bound or (alt.startswith(">=") and value == bound):
                return True
        elif value == float(alt):
            return True
    return False


def _check_ranges(section: Any, prefix: str, fail: typing.Callable[[str], None]) -> None:
    """Every numeric value of a built section (recursively) against RANGES; floats must be finite."""
    for f in dataclasses.fields(section):
        key, value = f"{prefix}.{f.name}", getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key, fail)
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not math.isfinite(item):
                fail(f"'{key}' must be a finite number, got {item}")
            spec = RANGES.get(key)
            if spec is not None and not _allows(spec, item):
                ranges, _, note = spec.partition(";")
                wanted = " or ".join(f"in {a}" if a[0] in "[(" else a for a in (a.strip() for a in ranges.split("|")))
                fail(f"'{key}' must be {wanted}{f' ({note.strip()})' if note else ''}, got {item}")


def _check(cfg: TrainConfig, source: str) -> None:
    def fail(message: str) -> None:
        raise KiminaError(f"{source}: {message}")

    for f in dataclasses.fields(cfg):
        _check_ranges(getattr(cfg, f.name), f.name, fail)
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


# ---------------------------------------------------------------------------------------------- saving
def uses_lean(cfg: SharedSections) -> bool:
    """Whether the run's reward talks to the Lean server (the built-in reward with `verifier.kind` lean)."""
    return cfg.reward.function in (None, "lean") and cfg.verifier.kind == "lean"


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data, secrets left out (credentials inside URLs too: they come from the environment)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("secret"):
            continue
        value = getattr(cfg, f.name)
        out[f.name] = config_to_dict(value) if dataclasses.is_dataclass(value) else _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return redact_url(value)


def save_resolved(cfg: TrainConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config to `<run_dir>/config.yaml` (no secrets, URLs without their credentials); it loads
    back with `load_config`."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    path.write_text("# Resolved config of this run (secrets excluded).\n" + text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- evaluation
@dataclasses.dataclass
class EvalRunConfig:
    """The `eval` section: what only evaluation has. The rest comes from the sections training reads too: sampling
    from `rollout.val`, the engine from `rollout`, lengths and the fix-turn feedback limit from `data`."""

    model: str | None = None  # required: an HF folder, a training run folder (its newest checkpoint) or a step folder
    dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)  # files: one MiniF2F file or Hub name
    split: str | None = "test"  # keep rows whose `split` column has this value (all rows when there is no such column)
    n: int = 32  # samples per problem
    k: list[int] = dataclasses.field(default_factory=lambda: [1, 8, 32])  # pass@k / best@k sizes
    error_fix: bool = False  # one fix attempt per failed sample with feedback (SPEC 7)
    out: str = "results"  # output folder; a rerun with the same one resumes
    seed: int = 0
    batch_problems: int = 64  # problems per generate call


@dataclasses.dataclass
class EvalConfig(SharedSections):
    """`python -m kimina_jax.evaluate`: the sections it shares with `TrainConfig` (same classes, same resolution and
    checks) and its own `eval` section."""

    eval: EvalRunConfig = dataclasses.field(default_factory=EvalRunConfig)


# What evaluation takes from the saved config of the training run it evaluates, when its own config does not say.
RUN_LENGTHS = ("data.max_prompt_length", "data.max_response_length")


def load_eval_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    run_config: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> EvalConfig:
    """Evaluation's config from a YAML file (a training recipe serves; None: the defaults) and `dotted.key=value`
    overrides. The shared sections are built, resolved and checked as training's (training-only sections are
    checked too, then left out); `run_config` (the evaluated run's saved config) fills in RUN_LENGTHS."""
    recipe = None if path is None else resolve_recipe_path(path)
    source = "<command line>" if recipe is None else str(recipe)
    data = apply_overrides({} if recipe is None else _read_yaml(recipe), overrides)
    run = _convert(data.pop("eval", None) or {}, EvalRunConfig, "eval", source)
    _check_eval(run, source)
    for key in RUN_LENGTHS:
        saved = lookup(run_config or {}, key)
        if lookup(data, key) is None and saved is not None:
            _set(data, key, saved, f"{key} of the evaluated run")
    shared = config_from_dict(data, env=env, source=source)
    return EvalConfig(
        model=shared.model, data=shared.data, rollout=shared.rollout, verifier=shared.verifier, reward=shared.reward,
        eval=run,
    )


def _check_eval(run: EvalRunConfig, source: str) -> None:
    def fail(message: str) -> None:
        raise KiminaError(f"{source}: {message}")

    if not run.model:
        fail("'eval.model' (--model) is required: an HF folder, a training run folder or a checkpoint step folder")
    if len(run.dataset.files) != 1:
        fail(f"'eval.dataset.files' (--dataset) must name one MiniF2F file or Hub dataset, got {run.dataset.files}")
    if not run.k or min(run.k) < 1:
        fail(f"'eval.k' must be a non-empty list of positive integers, got {run.k}")
    _check_ranges(run, "eval", fail)
    if run.n < max(run.k):
        fail(
            f"eval.n: --n {run.n} is smaller than the largest --k ({max(run.k)}): pass@{max(run.k)} needs at least "
            f"{max(run.k)} samples per problem; raise eval.n or drop that k"
        )
