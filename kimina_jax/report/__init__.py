"""Figures and a Markdown page from the TensorBoard scalars of one or more training runs.

    python -m kimina_jax.report RUN_DIR [RUN_DIR ...] --out DIR [--smooth ALPHA]

Writes into DIR (created if missing) one PNG per figure that some run has data for, runs overlaid, and `report.md`
embedding them with a per-run config summary (from each run's config.yaml) and the last value of the headline
metrics. The figures (verl's metric names; `<data>` is the validation set, e.g. minif2f_test):

- `response_length.png`: response_length/mean, min..max shaded.
- `format_errors.png`: format_error/turn_{1,2}/<kind>, one panel per kind and turn.
- `best_at_8.png`: turn 1 (val-core/<data>/acc/best@8/mean, mean@8, pass@k) beside turn 2
  (val-aux/<data>/acc_turn_2/...).
- `score.png`: critic/score/mean (min..max shaded) and reward/accuracy.
- `unverified.png`: reward/unverified.
- `logprob_diff.png`: rollout/logprob_diff_max (and _mean).
- `actor.png`: actor/pg_loss, actor/grad_norm, actor/entropy.
- `throughput.png`: perf/throughput.
- `timing.png`: timing_s/<section> stacked (figures.STACKED), one panel per run, timing_s/step as a line.

A figure no run has data for is not written (one line says so); a run folder without event files is skipped.
"""
from kimina_jax.report.cli import main
from kimina_jax.report.events import Run, Series, load_run, smooth
from kimina_jax.report.figures import FIGURES, build_figures

__all__ = ["FIGURES", "Run", "Series", "build_figures", "load_run", "main", "smooth"]
