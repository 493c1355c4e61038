"""What a tiny training run leaves for its user to look at, read back as they would: the console's progress, the
offline wandb run (scalars under verl's names at the training steps, continued by a resume) and the figures
`python -m kimina_jax.report` draws from its TensorBoard events."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kimina_jax.config import load_config
from kimina_jax.report import build_figures, load_run

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

pytestmark = pytest.mark.slow


def _train(run_dir: Path, *overrides: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "WANDB_MODE": "offline"}
    env.pop("LEAN_SERVER_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "kimina_jax.train", "--run-dir", str(run_dir), "logging.progress_bars=false",
         "verifier.kind=standin", "data.val.limit=4", "rollout.val.n=8", "logging.wandb.enabled=true",
         *overrides],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny recipe for 2 steps (validation at step 2), then resumed for a third."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    first = _train(run_dir, "trainer.total_steps=2", "trainer.test_freq=2")
    resumed = _train(run_dir, "trainer.total_steps=3", "trainer.test_freq=2")
    return run_dir, first, resumed


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a `.wandb` file, read independently of wandb's writer: a 7-byte header (":W&B", magic,
    version), then LevelDB's log format (32 KiB blocks of chunks: crc32c, length, type; FULL = 1, FIRST = 2,
    MIDDLE = 3, LAST = 4)."""
    data, records, pending, offset = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while offset + 7 <= len(data):
        left_in_block = 32768 - offset % 32768
        if left_in_block < 7:  # a block's tail too short for a header is padding
            offset += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_the_console_line_shows_progress_and_time_left(run):
    _, first, resumed = run
    steps = [line for line in first.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 1/2", "step 2/2"]
    assert all(" | eta " in line for line in steps) and steps[-1].endswith("eta 0:00:00")
    assert [line.split(" | ")[0] for line in resumed.splitlines() if line.startswith("step ")] == ["step 3/3"]


def test_the_offline_wandb_run_holds_the_scalars_and_a_resume_continues_it(run):
    run_dir, _, _ = run
    files = _offline_runs(run_dir)
    assert len(files) == 2  # the first process and the resumed one
    records = [wandb_records(path) for path in files]
    ids = {r.run.run_id for recs in records for r in recs if r.HasField("run")}
    assert ids == {(run_dir / "wandb" / "run_id").read_text().strip()}  # one wandb run, continued

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    tensorboard = {(name, e.step): e.value for name in events.Tags()["scalars"] for e in events.Scalars(name)}
    logged = {}
    for recs in records:
        for record in recs:
            if record.HasField("history"):
                # A scalar is one item under its name; a table is several under [name, field].
                items = {item.key or item.nested_key[0]: item.value_json for item in record.history.item}
                step = int(items.pop("_step"))
                logged.update({(name, step): value for name, value in items.items() if not name.startswith("_")})
    scalars = {key: float(value) for key, value in logged.items() if key[0] != "samples"}
    assert {name for name, _ in scalars} == {name for name, _ in tensorboard}
    assert {step for _, step in scalars} == {1, 2, 3}
    for key, value in tensorboard.items():  # the same names at the same steps, with the same values
        assert scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert {step for name, step in logged if name == "samples"} == {1, 2, 3}  # the text samples, as a table

    sent = {item.key for r in records[0] if r.HasField("run") for item in r.run.config.update}
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert set(resolved) <= sent  # every section of the resolved config


def test_wandb_without_its_package_is_one_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(Exception, match=r'logging.wandb.enabled needs the wandb package: pip install -e "\.\[wandb\]"'):
        load_config("tiny", ["logging.wandb.enabled=true"], env={})


def test_the_report_draws_the_runs_own_values(run, tmp_path):
    """`python -m kimina_jax.report` on the run: the seed's figures are written, not blank, and their lines are
    the run's TensorBoard values at its steps (validation only where it ran)."""
    run_dir, _, _ = run
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "kimina_jax.report", str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    for name in ("response_length.png", "format_errors.png", "best_at_8.png", "score.png", "actor.png", "timing.png"):
        pixels = matplotlib.image.imread(out / name)
        assert pixels.std() > 0.01, name  # not one colour
        assert f"({name})" in (out / "report.md").read_text()

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    figures = build_figures([load_run(run_dir)])
    for figure, tag in (("response_length.png", "response_length/mean"), ("score.png", "critic/score/mean"),
                        ("best_at_8.png", "val-core/minif2f_test/acc/best@8/mean"), ("actor.png", "actor/grad_norm")):
        (line,) = [line for ax in figures[figure].axes for line in ax.get_lines() if line.get_gid() == f"run::{tag}"]
        assert list(line.get_xdata()) == [e.step for e in events.Scalars(tag)], tag
        assert list(line.get_ydata()) == pytest.approx([e.value for e in events.Scalars(tag)]), tag
    assert [e.step for e in events.Scalars("val-core/minif2f_test/acc/best@8/mean")] == [2, 3]  # test_freq, last
