"""TensorBoard (and wandb) scalars and sample texts with verl's metric names (SPEC 9), a console line per step,
and the pure statistics behind the reward/length metrics.

Only the process that owns the writer (process 0 of a multi-host run) writes; others pass `enabled=False`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from kimina_jax.types import Sample

if TYPE_CHECKING:
    from kimina_jax.wandb_run import WandbRun

# Shown on the console line, in this order, when present: (metric name, short label).
CONSOLE_KEYS = (
    ("critic/score/mean", "score"),
    ("val-core/minif2f_test/acc/mean@8", "val_acc"),
    ("response_length/mean", "resp_len"),
    ("actor/pg_loss", "pg_loss"),
    ("actor/grad_norm", "grad_norm"),
    ("actor/ppo_kl", "kl"),
    ("rollout/logprob_diff_mean", "lp_diff"),
    ("reward/unverified", "unverified"),
    ("perf/time_per_step", "step_s"),
)


# ---------------------------------------------------------------------------------------------- statistics
def score_stats(scores: Sequence[float], name: str = "score") -> dict[str, float]:
    """`critic/{name}/{mean,max,min}` over responses. verl's `rewards` are the scores less an in-reward KL
    penalty, which this recipe never applies (its KL is a loss term), so `name="rewards"` takes the scores too."""
    s = np.asarray(scores, dtype=np.float64)
    return {
        f"critic/{name}/mean": float(s.mean()),
        f"critic/{name}/max": float(s.max()),
        f"critic/{name}/min": float(s.min()),
    }


def advantage_stats(
    advantages: Sequence[float], response_lengths: Sequence[int], name: str = "advantages"
) -> dict[str, float]:
    """`critic/{name}/{mean,max,min}` over response tokens, as verl computes them.

    Every token of response i carries advantage A_i, so the token mean weights A_i by the response length.
    GRPO's returns are its advantages (verl sets both alike), so `name="returns"` takes the advantages too.
    """
    a = np.asarray(advantages, dtype=np.float64)
    n = np.asarray(response_lengths, dtype=np.float64)
    has_tokens = n > 0
    return {
        f"critic/{name}/mean": float((a * n).sum() / n.sum()),
        f"critic/{name}/max": float(a[has_tokens].max()),
        f"critic/{name}/min": float(a[has_tokens].min()),
    }


def length_stats(prefix: str, lengths: Sequence[int], max_length: int) -> dict[str, float]:
    """`{prefix}/{mean,max,min,clip_ratio}`; clip_ratio = share of sequences that reached `max_length`."""
    n = np.asarray(lengths, dtype=np.float64)
    return {
        f"{prefix}/mean": float(n.mean()),
        f"{prefix}/max": float(n.max()),
        f"{prefix}/min": float(n.min()),
        f"{prefix}/clip_ratio": float((n >= max_length).mean()),
    }


def timing_per_token_ms(metrics: Mapping[str, float], prompt_tokens: int, response_tokens: int) -> dict[str, float]:
    """`timing_per_token_ms/{name}` as verl's compute_timing_metrics: `timing_s/gen` per response token, the
    reference and actor passes per prompt + response token of the step batch; sections not timed are left out."""
    total = prompt_tokens + response_tokens
    tokens = {"gen": response_tokens, "ref": total, "update_actor": total}
    return {
        f"timing_per_token_ms/{name}": metrics[f"timing_s/{name}"] * 1000 / n
        for name, n in tokens.items()
        if f"timing_s/{name}" in metrics
    }


def throughput_stats(total_tokens: int, step_seconds: float, num_devices: int) -> dict[str, float]:
    """`perf/time_per_step` and `perf/throughput` (tokens per second per device), as verl."""
    return {"perf/time_per_step": step_seconds, "perf/throughput": total_tokens / (step_seconds * num_devices)}


def memory_stats(device_stats: Sequence[Mapping[str, int] | None]) -> dict[str, float]:
    """`perf/max_memory_{allocated,reserved}_gb` (GiB, as verl's torch figures): the allocator's peak bytes in
    use and the peak it held from the device (its pool), highest over the devices. Statistics a backend does not
    keep are left out (the CPU keeps none)."""
    out = {}
    for name, key in (("allocated", "peak_bytes_in_use"), ("reserved", "peak_pool_bytes")):
        values = [s[key] for s in device_stats if s and key in s]
        if values:
            out[f"perf/max_memory_{name}_gb"] = max(values) / 1024**3
    return out


def perf_stats(
    samples: Sequence[Sample],
    trained: Sequence[int],
    timings: Mapping[str, float],
    training_flops: Callable[[Sequence[int]], float],
    peak_tflops: float | None,
    num_devices: int,
    device_stats: Sequence[Mapping[str, int] | None],
) -> dict[str, float]:
    """`perf/total_num_tokens`, `timing_per_token_ms/*`, device memory and, when `peak_tflops` (per device) is
    known, `perf/mfu`: the model FLOPs of the update (`training_flops` of the `trained` samples' lengths) over its
    time (`timing_s/update_actor`) on all devices."""
    prompt_tokens = sum(len(s.prompt.token_ids) for s in samples)
    response_tokens = sum(len(s.completion.token_ids) for s in samples)
    out = {"perf/total_num_tokens": float(prompt_tokens + response_tokens)}
    out.update(timing_per_token_ms(timings, prompt_tokens, response_tokens))
    out.update(memory_stats(device_stats))
    if peak_tflops:
        lengths = [len(samples[i].prompt.token_ids) + len(samples[i].completion.token_ids) for i in trained]
        out["perf/mfu"] = training_flops(lengths) / (timings["timing_s/update_actor"] * num_devices * peak_tflops * 1e12)
    return out


def format_error_counts(samples: Sequence[Sample], known_errors: Sequence[str] = (), turns: int = 2) -> dict[str, int]:
    """`format_error/turn_{t}/<error string>` counts; `known_errors` are reported (as 0) even when absent."""
    counts = {f"format_error/turn_{t}/{error}": 0 for t in range(1, turns + 1) for error in known_errors}
    for sample in samples:
        key = f"format_error/turn_{sample.prompt.turn}/{sample.format_error}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def console_line(step: int, metrics: Mapping[str, float], total_steps: int | None = None,
                 eta_s: float | None = None) -> str:
    """One line per step: progress (step / total), the headline numbers that are present, and the time left."""
    parts = [f"step {step}" + (f"/{total_steps}" if total_steps else "")]
    for key, label in CONSOLE_KEYS:
        if key in metrics:
            parts.append(f"{label} {_short(metrics[key])}")
    if eta_s is not None:
        parts.append(f"eta {_duration(eta_s)}")
    return " | ".join(parts)


def eta_seconds(step_times: Sequence[float], steps_left: int) -> float | None:
    """Time left at the median of the last 5 steps' times (the first step's compilation does not last)."""
    if not step_times:
        return None
    return steps_left * float(np.median(step_times[-5:]))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _short(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and float(value).is_integer() and abs(value) >= 1):
        return str(int(value))
    return f"{value:.4g}"


# ---------------------------------------------------------------------------------------------- writer
class MetricsWriter:
    """Writes scalars and sample texts to `<run_dir>/tensorboard` (and a wandb run, when given) and a console line,
    on process 0 only. `total_steps`: the run's length, for the console's progress and ETA."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        console: bool = True,
        num_text_samples: int = 2,
        total_steps: int | None = None,
        wandb: WandbRun | None = None,
    ):
        self.enabled = enabled
        self.console = console and enabled
        self.num_text_samples = num_text_samples
        self.total_steps = total_steps
        self.logdir = Path(run_dir) / "tensorboard"
        self.wandb = wandb
        self._step_times: list[float] = []
        self._writer = None
        if enabled and tensorboard:
            from tensorboardX import FileWriter

            self._writer = FileWriter(str(self.logdir))

    def log_step(self, step: int, metrics: Mapping[str, float], samples: Sequence[Sample] = ()) -> None:
        """Scalars, a few sample texts, and the console line for one training step."""
        self.scalars(step, metrics)
        if samples:
            self.samples(step, samples)
        if "timing_s/step" in metrics:
            self._step_times.append(metrics["timing_s/step"])
        if self.console:
            from tqdm import tqdm

            eta = eta_seconds(self._step_times, self.total_steps - step) if self.total_steps else None
            tqdm.write(console_line(step, metrics, self.total_steps, eta))  # keeps active progress bars intact
        self.flush()

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        """One event per step. Tags are written verbatim (`SummaryWriter.add_scalar` would rewrite `mean@8` to
        `mean_8` and spaces in the format-error names to `_`), so they read exactly as SPEC 9 / verl name them."""
        if self.wandb is not None:
            self.wandb.scalars(step, metrics)
        if self._writer is None:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=name, simple_value=float(v)) for name, v in metrics.items() if v is not None]
        self._writer.add_summary(Summary(value=values), global_step=step)

    def restart_at(self, step: int) -> None:
        """A resumed run logs from `step` on again: TensorBoard drops the points at `step` and later that an earlier
        process logged (its purge on a session restart, as tensorboardX's `purge_step`)."""
        if self._writer is None:
            return
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._writer.add_event(Event(step=step, file_version="brain.Event:2"))
        self._writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))

    def samples(self, step: int, samples: Sequence[Sample], tag: str = "samples") -> None:
        """The first `num_text_samples` samples as Markdown text under `{tag}/turn_{t}` (and a wandb table)."""
        if self.wandb is not None:
            self.wandb.samples(step, samples[: self.num_text_samples], tag)
        if self._writer is None:
            return
        from tensorboardX.summary import text

        for i, sample in enumerate(samples[: self.num_text_samples]):
            self._writer.add_summary(text(f"{tag}/turn_{sample.prompt.turn}/{i}", sample_markdown(sample)), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None


def sample_markdown(sample: Sample) -> str:
    verdict = sample.verdict.status if sample.verdict is not None else "not sent (no proof found)"
    lines = [
        f"**statement** `{sample.prompt.statement_id}` (turn {sample.prompt.turn}) · **score** {sample.score:g} · "
        f"**acc** {sample.acc:g} · **format** {sample.format_error} · **Lean** {verdict}",
        "",
        "**response**",
        "",
        _fenced(sample.completion.text),
    ]
    if sample.feedback:
        lines += ["", "**feedback**", "", _fenced(sample.feedback)]
    return "\n".join(lines)


def _fenced(text: str) -> str:
    # Indented code keeps the response's own ``` fences from closing the block.
    return "\n".join("    " + line for line in text.splitlines())
