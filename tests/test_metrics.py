"""Metrics: the statistics against direct numpy on token arrays; event files read back with TensorBoard."""
from __future__ import annotations

import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kimina_jax.metrics import (
    MetricsWriter,
    advantage_stats,
    console_line,
    format_error_counts,
    length_stats,
    memory_stats,
    score_stats,
    throughput_stats,
    timing_per_token_ms,
)
from kimina_jax.types import Completion, Prompt, Sample, Verdict


def test_score_and_advantage_stats_match_token_level_numpy():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 2, size=16).astype(float)
    groups = scores.reshape(4, 4)
    advantages = (groups - groups.mean(axis=1, keepdims=True)).ravel()
    lengths = rng.integers(0, 50, size=16)
    lengths[3] = 0
    # verl's way: a [responses, max_len] advantage matrix masked by the response mask
    mask = np.arange(50)[None, :] < lengths[:, None]
    token_adv = np.broadcast_to(advantages[:, None], mask.shape)[mask]

    assert score_stats(scores) == pytest.approx(
        {"critic/score/mean": scores.mean(), "critic/score/max": scores.max(), "critic/score/min": scores.min()}
    )
    assert advantage_stats(advantages, lengths) == pytest.approx(
        {
            "critic/advantages/mean": token_adv.mean(),
            "critic/advantages/max": token_adv.max(),
            "critic/advantages/min": token_adv.min(),
        }
    )


def test_rewards_and_returns_stats_by_hand():
    # rewards: per response; returns (GRPO: the advantages) per response token, as verl's masked_select.
    assert score_stats([1.0, 0.0, 0.5], name="rewards") == {
        "critic/rewards/mean": 0.5, "critic/rewards/max": 1.0, "critic/rewards/min": 0.0,
    }
    # tokens: 0.5 x2, -0.25 x4, 0.75 x2 (the 4th response has none): sum 1.5 over 8 tokens
    assert advantage_stats([0.5, -0.25, 0.75, 1.0], [2, 4, 2, 0], name="returns") == {
        "critic/returns/mean": 0.1875, "critic/returns/max": 0.75, "critic/returns/min": -0.25,
    }


def test_timing_per_token_ms_as_verl():
    timings = {"timing_s/gen": 2.0, "timing_s/update_actor": 3.0, "timing_s/ref": 0.6,
               "timing_s/old_log_prob": 1.0, "timing_s/verify": 5.0, "perf/throughput": 9.0}
    # gen per response token (2000 ms / 800), the policy passes per prompt + response token (1000)
    assert timing_per_token_ms(timings, prompt_tokens=200, response_tokens=800) == pytest.approx({
        "timing_per_token_ms/gen": 2.5, "timing_per_token_ms/update_actor": 3.0, "timing_per_token_ms/ref": 0.6,
    })
    assert timing_per_token_ms({"timing_s/gen": 1.0}, 10, 40) == {"timing_per_token_ms/gen": 25.0}


def test_throughput_and_memory_stats_by_hand():
    assert throughput_stats(1000, 4.0, 2) == {"perf/time_per_step": 4.0, "perf/throughput": 125.0}
    gib = 1024**3
    gpus = [
        {"peak_bytes_in_use": 2 * gib, "peak_pool_bytes": 3 * gib, "bytes_limit": 8 * gib},
        {"peak_bytes_in_use": gib + gib // 2, "peak_pool_bytes": 4 * gib, "bytes_limit": 8 * gib},
    ]
    assert memory_stats(gpus) == {"perf/max_memory_allocated_gb": 2.0, "perf/max_memory_reserved_gb": 4.0}
    assert memory_stats([{"peak_bytes_in_use": gib // 2}]) == {"perf/max_memory_allocated_gb": 0.5}
    assert memory_stats([None]) == {}  # the CPU keeps no statistics


def test_length_stats_and_clip_ratio():
    lengths = np.array([10, 64, 30, 64, 5])
    assert length_stats("response_length", lengths, max_length=64) == pytest.approx(
        {
            "response_length/mean": lengths.mean(),
            "response_length/max": 64,
            "response_length/min": 5,
            "response_length/clip_ratio": 2 / 5,
        }
    )
    assert length_stats("prompt_length", [3, 4], 512)["prompt_length/clip_ratio"] == 0.0


RESPONSE = "<think>\nplan\n</think>\n```lean4\ntheorem t : True := by\n  trivial\n```"


def sample(turn: int, error: str, text: str = RESPONSE) -> Sample:
    prompt = Prompt("lean_workbook_1", (), "theorem t : True := by sorry", (1, 2), turn=turn)
    completion = Completion(0, 0, (3, 4), text, np.zeros(2, np.float32), "stop")
    return Sample(prompt, completion, Verdict("lean_error"), 0.0, 0.0, error, feedback="# Error 1:\nbad")


def test_format_error_counts():
    errors = ("No error.", "Could not find a valid lean4 code block.")
    samples = [sample(1, errors[1]), sample(1, errors[1]), sample(2, errors[0])]
    counts = format_error_counts(samples, known_errors=errors)
    assert counts == {
        "format_error/turn_1/No error.": 0,
        "format_error/turn_1/Could not find a valid lean4 code block.": 2,
        "format_error/turn_2/No error.": 1,
        "format_error/turn_2/Could not find a valid lean4 code block.": 0,
    }


SPEC9_TAGS = [
    "critic/score/mean", "critic/advantages/max", "response_length/clip_ratio", "prompt_length/mean",
    "actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl", "actor/entropy",
    "actor/grad_norm", "actor/lr", "format_error/turn_1/Could not find a valid lean4 code block.",
    "multiturn/turn_1/added_in_database", "val-core/minif2f_test/acc/mean@8", "val-core/minif2f_test/acc/best@8/mean",
    "val-aux/minif2f_test/acc_turn_2/best@8/mean", "perf/throughput", "timing_s/gen", "rollout/logprob_diff_mean",
    "reward/unverified", "reward/cache_hit_rate",
]


def test_event_files_hold_the_tags_and_texts(tmp_path, capsys):
    writer = MetricsWriter(tmp_path, num_text_samples=1)
    for step in (1, 2):
        metrics = {tag: float(step) + i / 100 for i, tag in enumerate(SPEC9_TAGS)}
        writer.log_step(step, metrics, samples=[sample(1, "No error."), sample(2, "No error.")])
    writer.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(SPEC9_TAGS)
    values = events.Scalars("actor/grad_norm")
    assert [(e.step, round(e.value, 4)) for e in values] == [(1, 1.09), (2, 2.09)]
    texts = events.Tags()["tensors"]
    assert texts == ["samples/turn_1/0/text_summary"]  # num_text_samples=1
    text = events.Tensors(texts[0])[0].tensor_proto.string_val[0].decode()
    assert "lean_workbook_1" in text and "    theorem t : True := by" in text

    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("step 2 | score 2 | val_acc 2.13 |")


def test_other_processes_write_nothing(tmp_path, capsys):
    writer = MetricsWriter(tmp_path, enabled=False)
    writer.log_step(1, {"critic/score/mean": 0.5}, samples=[sample(1, "No error.")])
    writer.close()
    assert not (tmp_path / "tensorboard").exists()
    assert capsys.readouterr().out == ""


def test_console_line():
    line = console_line(7, {"critic/score/mean": 0.25, "response_length/mean": 512.0, "actor/grad_norm": 0.0123,
                            "perf/time_per_step": 12.5, "unrelated": 1.0})
    assert line == "step 7 | score 0.25 | resp_len 512 | grad_norm 0.0123 | step_s 12.5"
    assert console_line(7, {"perf/time_per_step": 12.5}, 20, 3725.4) == "step 7/20 | step_s 12.5 | eta 1:02:05"


def test_the_console_shows_progress_and_the_time_left_at_the_recent_steps_pace(tmp_path, capsys):
    """The ETA is the steps left times the median of the last 5 step times, so the first step's compilation
    (here 100 s) stops counting once the steady steps outnumber it."""
    writer = MetricsWriter(tmp_path, tensorboard=False, total_steps=10)
    for step, seconds in enumerate((100.0, 2.0, 3.0, 2.0), start=1):
        writer.log_step(step, {"timing_s/step": seconds, "perf/time_per_step": seconds})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 1/10 | step_s 100 | eta 0:15:00"  # 9 steps x 100 s
    assert lines[1] == "step 2/10 | step_s 2 | eta 0:06:48"  # 8 x median(100, 2) = 8 x 51 s
    assert lines[3] == "step 4/10 | step_s 2 | eta 0:00:15"  # 6 x median(100, 2, 3, 2) = 6 x 2.5 s


def test_a_resumed_run_replaces_the_points_of_the_steps_it_runs_again(tmp_path):
    first = MetricsWriter(tmp_path, console=False)
    for step in range(1, 6):  # killed after logging step 5; its newest checkpoint is step 3
        first.log_step(step, {"critic/score/mean": float(step)})
    first.close()
    time.sleep(1.1)  # event file names hold the second they were opened in
    resumed = MetricsWriter(tmp_path, console=False)
    resumed.restart_at(4)
    for step in (4, 5, 6):
        resumed.log_step(step, {"critic/score/mean": 10.0 + step})
    resumed.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    points = [(e.step, e.value) for e in events.Scalars("critic/score/mean")]
    assert points == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
