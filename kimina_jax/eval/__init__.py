"""Evaluation (SPEC 8): `metrics` (pass@k, verl's bootstrap statistics, metric names), `validation` (sample, verify,
the fix turn; the trainer's `validate`), `records` (sample records, the resumable store, rollout dumps) and `run` (the
resumable evaluation behind `python -m kimina_jax.evaluate`, imported from there only)."""
from kimina_jax.eval.metrics import (
    Outcome,
    average_metrics,
    bootstrap_extremes,
    bootstrap_sizes,
    pass_at_k,
    problem_metrics,
    summarize,
    turn_values,
    val_metric_names,
)
from kimina_jax.eval.records import SampleStore, dump_samples, restore_sample, sample_record
from kimina_jax.eval.validation import fix_params, fix_targets, sample_and_submit, validate

__all__ = [
    "Outcome", "SampleStore", "average_metrics", "bootstrap_extremes", "bootstrap_sizes", "dump_samples",
    "fix_params", "fix_targets", "pass_at_k", "problem_metrics", "restore_sample", "sample_and_submit",
    "sample_record", "summarize", "turn_values", "val_metric_names", "validate",
]
