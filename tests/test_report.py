"""python -m kimina_jax.report on run folders written here with tensorboardX: files, plotted values, messages."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from tensorboardX import FileWriter, SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary

from kimina_jax.report import build_figures, load_run, main, smooth
from kimina_jax.report.events import label_runs

NO_LEAN = "Could not find a valid lean4 code block."
NO_THINK = "Could not find a valid think block."
BEST_1 = "val-core/minif2f_test/acc/best@8/mean"
BEST_2 = "val-aux/minif2f_test/acc_turn_2/best@8/mean"
CONFIG = """# Resolved config of this run (secrets excluded).
experiment:
  name: kimina-prover-1.7B
model:
  path: AI-MO/Kimina-Prover-Distill-1.7B
rollout:
  engine: vllm
trainer:
  total_steps: 10
"""
WRITTEN = ["response_length.png", "format_errors.png", "best_at_8.png", "score.png", "unverified.png",
           "logprob_diff.png", "actor.png", "timing.png"]


def write_events(run: Path, scalars: dict[str, dict[int, float]], suffix: str = "") -> None:
    """Tags verbatim, as kimina_jax.metrics writes them (SummaryWriter.add_scalar would rename `best@8`)."""
    writer = FileWriter(str(run / "tensorboard"), filename_suffix=suffix)
    for step in sorted({s for points in scalars.values() for s in points}):
        values = [Summary.Value(tag=tag, simple_value=v[step]) for tag, v in scalars.items() if step in v]
        writer.add_summary(Summary(value=values), global_step=step)
    writer.close()


def run_a_scalars() -> dict[str, dict[int, float]]:
    steps = range(1, 6)
    return {
        "response_length/mean": {s: 100.0 + 10 * s for s in steps},
        "response_length/min": {s: 50.0 + s for s in steps},
        "response_length/max": {s: 200.0 + s for s in steps},
        f"format_error/turn_1/{NO_LEAN}": {s: 10.0 - s for s in steps},
        f"format_error/turn_1/{NO_THINK}": {s: 6.0 - s for s in steps},
        f"format_error/turn_2/{NO_LEAN}": {s: 3.0 for s in steps},
        BEST_1: {2: 0.25, 4: 0.5},
        BEST_2: {2: 0.375, 4: 0.625},
        "val-core/minif2f_test/acc/mean@8": {2: 0.125, 4: 0.25},
        "val-aux/minif2f_test/acc/pass@8": {2: 0.3, 4: 0.55},
        "critic/score/mean": {s: 0.1 * s for s in steps},
        "reward/unverified": {s: 0.0 for s in steps},
        "rollout/logprob_diff_max": {s: 0.01 * s for s in steps},
        "actor/pg_loss": {s: -0.1 * s for s in steps},
        "actor/grad_norm": {s: 1.0 / s for s in steps},
        "actor/entropy": {s: 2.0 - 0.1 * s for s in steps},
        "timing_s/rollout": {s: 4.0 for s in steps},
        "timing_s/gen": {s: 3.5 for s in steps},
        "timing_s/update_actor": {s: 2.0 for s in steps},
        "timing_s/testing": {2: 3.0, 4: 3.0},
        "timing_s/step": {s: 6.5 for s in steps},
    }


@pytest.fixture()
def runs(tmp_path: Path) -> tuple[Path, Path]:
    """Run a (steps 1..5, validation at 2 and 4) and run b: no step 3, step 4 logged twice (a resume)."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_events(a, run_a_scalars())
    (a / "config.yaml").write_text(CONFIG)
    write_events(b, {"response_length/mean": {1: 90.0, 2: 95.0, 4: 0.0}, "actor/grad_norm": {1: 2.0, 2: 1.0}}, ".1")
    write_events(b, {"response_length/mean": {4: 120.0, 5: 125.0}}, ".2")
    return a, b


def lines_by_gid(figure) -> dict[str, tuple[list, list]]:
    return {line.get_gid(): (list(line.get_xdata()), list(line.get_ydata()))
            for ax in figure.axes for line in ax.get_lines()}


def test_report_writes_figures_and_page(runs, tmp_path, capsys):
    out = tmp_path / "out" / "report"
    assert main([str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    for name in WRITTEN:
        image = imread(out / name)
        assert image.ndim == 3 and not np.all(image == image[0, 0]), name  # drawn on, not one colour
    assert not (out / "throughput.png").exists()
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if "throughput" in line] == [
        "no run has perf/throughput: throughput.png not written"]
    page = (out / "report.md").read_text()
    for name in WRITTEN:
        assert f"]({name})" in page
    assert "| a | AI-MO/Kimina-Prover-Distill-1.7B | kimina-prover-1.7B | 5 / 10 | vllm |" in page
    assert "| b | - | - | 5 / - | - |" in page  # no config.yaml
    assert "| a | 0.5 (5) | 150 (5) | 0.5 (4) | 0.625 (4) | 0.2 (5) | 0 (5) |" in page
    assert "| b | - | 125 (5) | - | - | 1 (2) | - |" in page


def test_plotted_series_are_the_logged_values_at_their_steps(runs):
    figures = build_figures(label_runs([load_run(d) for d in runs]))
    lengths = lines_by_gid(figures["response_length.png"])
    assert lengths["a::response_length/mean"] == ([1, 2, 3, 4, 5], [110.0, 120.0, 130.0, 140.0, 150.0])
    assert lengths["b::response_length/mean"] == ([1, 2, 4, 5], [90.0, 95.0, 120.0, 125.0])  # gap at 3, last write
    band = next(c for c in figures["response_length.png"].axes[0].collections if c.get_gid())
    assert band.get_gid() == "a::response_length/mean::band"  # b logs no min/max

    errors = lines_by_gid(figures["format_errors.png"])
    assert errors[f"a::format_error/turn_1/{NO_LEAN}"] == ([1, 2, 3, 4, 5], [9.0, 8.0, 7.0, 6.0, 5.0])
    assert errors[f"a::format_error/turn_1/{NO_THINK}"] == ([1, 2, 3, 4, 5], [5.0, 4.0, 3.0, 2.0, 1.0])
    assert errors[f"a::format_error/turn_2/{NO_LEAN}"] == ([1, 2, 3, 4, 5], [3.0] * 5)

    best = lines_by_gid(figures["best_at_8.png"])
    assert best[f"a::{BEST_1}"] == ([2, 4], [0.25, 0.5])
    assert best[f"a::{BEST_2}"] == ([2, 4], [0.375, 0.625])
    assert best["a::val-core/minif2f_test/acc/mean@8"] == ([2, 4], [0.125, 0.25])
    assert best["a::val-aux/minif2f_test/acc/pass@8"][0] == [2, 4]

    actor = lines_by_gid(figures["actor.png"])
    assert actor["b::actor/grad_norm"] == ([1, 2], [2.0, 1.0])
    assert set(actor) == {"a::actor/pg_loss", "a::actor/grad_norm", "a::actor/entropy", "b::actor/grad_norm"}
    assert "throughput.png" not in figures

    stack = {c.get_gid() for c in figures["timing.png"].axes[0].collections}
    assert stack == {"a::timing_s/rollout", "a::timing_s/update_actor", "a::timing_s/testing"}  # not step, not gen
    assert lines_by_gid(figures["timing.png"])["a::timing_s/step"][1] == [6.5] * 5


def test_smoothing_is_tensorboards_over_the_raw_values(runs):
    figures = build_figures([load_run(runs[1])], smooth_weight=0.5)
    lines = lines_by_gid(figures["actor.png"])
    assert lines["b::actor/grad_norm::raw"] == ([1, 2], [2.0, 1.0])
    # debiased EMA: (0.5 * 2) / 0.5 = 2, then (0.5 * 1 + 0.5 * 1) / 0.75
    assert lines["b::actor/grad_norm"][1] == pytest.approx([2.0, 1.0 / 0.75])
    assert list(smooth(np.array([3.0, 3.0, 3.0]), 0.9)) == pytest.approx([3.0, 3.0, 3.0])


def test_summary_writer_names_and_shared_folder_names(tmp_path):
    """SummaryWriter.add_scalar writes `best@8` as `best_8`; two runs named alike are told apart by their paths."""
    dirs = [tmp_path / "x" / "run", tmp_path / "y" / "run"]
    for i, run in enumerate(dirs):
        with SummaryWriter(str(run / "tensorboard")) as writer:
            writer.add_scalar(BEST_1, 0.5 + i, 3)
            writer.add_text("samples/turn_1/0", "a sample", 3)
    runs = label_runs([load_run(d) for d in dirs])
    assert [run.name for run in runs] == [str(d) for d in dirs]
    lines = lines_by_gid(build_figures(runs)["best_at_8.png"])
    assert lines[f"{dirs[1]}::val-core/minif2f_test/acc/best_8/mean"] == ([3], [1.5])


def test_folders_without_events_and_missing_folders(runs, tmp_path, capsys):
    empty, out = tmp_path / "empty", tmp_path / "out"
    (empty / "tensorboard").mkdir(parents=True)
    assert main([str(empty), str(runs[1]), "--out", str(out)]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if "empty" in line] == [
        f"{empty}: no TensorBoard events"]

    assert main([str(empty), "--out", str(tmp_path / "out_2")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "out_2").exists()

    assert main([str(runs[0]), str(tmp_path / "nope"), "--out", str(tmp_path / "out_3")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err and "Traceback" not in err
    assert not (tmp_path / "out_3").exists()


def test_module_runs_as_a_command(runs, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "kimina_jax.report", str(runs[0]), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "report.md").is_file() and (out / "response_length.png").is_file()

    missing = subprocess.run([sys.executable, "-m", "kimina_jax.report", str(tmp_path / "nope"), "--out", str(out)],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
