"""The command line: `python -m kimina_jax.report RUN_DIR [RUN_DIR ...] --out DIR [--smooth ALPHA]`."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kimina_jax.report import page
from kimina_jax.report.events import label_runs, load_run
from kimina_jax.report.figures import FIGURES, build_figures


def main(argv: Sequence[str] | None = None) -> int:
    """Figures and report.md of the runs in `--out`; 2 when a run folder is missing or no run has events."""
    args = _parser().parse_args(argv)
    missing = [str(d) for d in args.runs if not d.is_dir()]
    if missing:
        return _error(f"no such run folder: {', '.join(missing)}")
    runs = []
    for run_dir in args.runs:
        run = load_run(run_dir)
        if run is None:
            print(f"{run_dir}: no TensorBoard events")
        elif not run.scalars:
            print(f"{run_dir}: no scalars in its TensorBoard events")
        else:
            runs.append(run)
    if not runs:
        return _error("none of the run folders has TensorBoard scalars")
    runs = label_runs(runs)

    figures = build_figures(runs, args.smooth)
    notes = [f"no run has {spec.needs}: {spec.file} not written" for spec in FIGURES if spec.file not in figures]
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for file, figure in figures.items():
            figure.savefig(args.out / file, dpi=100)
        report = page.write(args.out, runs, {s.file: s.title for s in FIGURES if s.file in figures}, notes, args.smooth)
    except OSError as e:
        return _error(f"cannot write to {args.out}: {e}")
    for note in notes:
        print(note)
    print(f"wrote {report} and {len(figures)} figures for {len(runs)} run(s)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kimina_jax.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="training run folders")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--smooth", type=_weight, default=0.0, metavar="ALPHA",
                        help="TensorBoard's smoothing weight in [0, 1); 0 (default): none")
    return parser


def _weight(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
