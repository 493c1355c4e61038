"""The training and evaluation configuration, one room per job: `sections` (every key's type, range, default and
comment: the reference users read), `ranges` (the range vocabulary and its check), `options` (the policy losses'
options and the rejection criteria), `loading` (YAML, overrides, conversion, derived values, saving), `checks`
(across keys and against the devices), `eval` (evaluation's own section and loader)."""
from kimina_jax.config.checks import check_config, validate_for_devices
from kimina_jax.config.eval import RUN_LENGTHS, EvalConfig, EvalRunConfig, load_eval_config
from kimina_jax.config.loading import (
    DEFAULT_RECIPE,
    RECIPE_DIR,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    lookup,
    parse_cli,
    read_text,
    resolve_recipe_path,
    save_resolved,
)
from kimina_jax.config.options import (
    POLICY_LOSS_NAMES,
    POLICY_LOSS_OPTIONS,
    REJECTION_CRITERIA,
    policy_loss_options,
    rejection_criteria,
)
from kimina_jax.config.sections import (
    ENV_KEY,
    ENV_URL,
    RECIPE_MAX_RESPONSE_LENGTH,
    TINY,
    AlgorithmConfig,
    DataConfig,
    DatasetConfig,
    ErrorFixConfig,
    ExperimentConfig,
    FilterGroupsConfig,
    FormatConfig,
    JaxSamplerConfig,
    KlConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    PartialRolloutsConfig,
    RewardConfig,
    RolloutConfig,
    RolloutCorrectionConfig,
    ServerPoolConfig,
    SharedSections,
    SkipSolvedConfig,
    TinyModelConfig,
    TrainConfig,
    TrainerConfig,
    ValSamplingConfig,
    VerifierConfig,
    VllmConfig,
    WandbConfig,
    uses_lean,
)
