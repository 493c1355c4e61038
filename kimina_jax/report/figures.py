"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot, no display).

Line figures overlay the runs, one colour per run (command-line order), one line style per metric of a panel. Each
run is drawn at its own steps, so a step it did not log is a gap between two points, never a 0. Every line has the
gid `"<run name>::<tag>"` (with smoothing, the faint raw line beside it `"<run name>::<tag>::raw"`), for tests and
anyone inspecting a figure.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kimina_jax.report.events import Run, Series, smooth

RUN_COLOURS = matplotlib.colormaps["tab10"].colors
STYLES = ("-", "--", ":", "-.")
SPARSE = 30  # series with at most this many points (validation) get markers, so that isolated points show

# timing_s/* sections stacked in timing.png: the step's sequential parts, so the stack stays under the `step` line
# (drawn over it). Left out: `gen`, `verify` and `verify_wait`, which overlap inside `rollout` (the step's time in
# its rollout stage), and the per-token timings.
STACKED = ("rollout", "gen_wait", "old_log_prob", "ref", "update_actor", "sync_weights", "testing", "save_checkpoint")
SECTION_COLOURS = dict(zip(STACKED, matplotlib.colormaps["Set2"].colors))

VAL = r"val-core/(?P<data>[^/]+)"  # verl's headline validation metrics
AUX = r"val-aux/(?P<data>[^/]+)"
AT = "[@_]"  # tensorboardX's SummaryWriter writes `best@8` as `best_8`


@dataclasses.dataclass(frozen=True)
class Curve:
    """The scalars matching `pattern` (whole), labelled by `label` formatted with the match's named groups.
    `band`: shade the min..max of each run (the tag with its `/mean` replaced by `/min` and `/max`)."""

    pattern: str
    label: str
    band: bool = False


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    curves: tuple[Curve, ...]


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    """One PNG. `needs`: what a run must log for it (the line saying why it was not written)."""

    file: str
    title: str
    needs: str
    build: Callable[[str, Sequence[Run], float], Figure | None]


def build_figures(runs: Sequence[Run], smooth_weight: float = 0.0) -> dict[str, Figure]:
    """{file name: figure} of every figure some run has data for, in FIGURES order."""
    figures = {}
    for spec in FIGURES:
        figure = spec.build(spec.title, runs, smooth_weight)
        if figure is not None:
            figures[spec.file] = figure
    return figures


# ---------------------------------------------------------------------------------------------- line figures
def lines(*panels: Panel, ncols: int = 1) -> Callable[[str, Sequence[Run], float], Figure | None]:
    """A figure of `panels` (those with data), `ncols` per row."""

    def build(title: str, runs: Sequence[Run], smooth_weight: float) -> Figure | None:
        cells = [(panel.title, found) for panel in panels if (found := _series(panel, runs))]
        return _line_grid(title, cells, runs, smooth_weight, min(ncols, len(cells))) if cells else None

    return build


def format_errors(title: str, runs: Sequence[Run], smooth_weight: float) -> Figure | None:
    """One panel per error kind (rows) and turn (columns): each kind's count, per turn."""
    pattern = re.compile(r"format_error/turn_(\d+)/(.+)")
    found = {(int(m[1]), m[2]) for run in runs for tag in run.scalars if (m := pattern.fullmatch(tag))}
    if not found:
        return None
    turns = sorted({turn for turn, _ in found})
    cells = []
    for kind in sorted({kind for _, kind in found}):
        for turn in turns:
            tag = f"format_error/turn_{turn}/{kind}"
            cells.append((f"turn {turn}: {_clip(kind)}", [(tag, kind, False)]) if (turn, kind) in found else None)
    return _line_grid(title, cells, runs, smooth_weight, len(turns))


def _series(panel: Panel, runs: Sequence[Run]) -> list[tuple[str, str, bool]]:
    """(tag, label, band) of every scalar some run has for `panel`; a label two tags share becomes the tag."""
    found = []
    for curve in panel.curves:
        regex = re.compile(curve.pattern)
        tags = sorted({tag for run in runs for tag in run.scalars if regex.fullmatch(tag)})
        found += [(tag, curve.label.format(**regex.fullmatch(tag).groupdict()), curve.band) for tag in tags]
    labels = [label for _, label, _ in found]
    return [(tag, label if labels.count(label) == 1 else tag, band) for tag, label, band in found]


def _line_grid(title: str, cells: list, runs: Sequence[Run], smooth_weight: float, ncols: int) -> Figure:
    """`cells`: (title, series) or None for an empty cell, row by row."""
    nrows = math.ceil(len(cells) / ncols)
    figure, axes = _figure(title, nrows, ncols)
    for ax, cell in zip(axes, cells):
        if cell is None:
            ax.axis("off")
            continue
        panel_title, series = cell
        ax.set_title(panel_title, fontsize="medium")
        for i, run in enumerate(runs):
            colour = RUN_COLOURS[i % len(RUN_COLOURS)]
            for j, (tag, label, band) in enumerate(series):
                if tag not in run.scalars:
                    continue
                name = run.name if len(series) == 1 else f"{run.name} · {label}"
                _plot(ax, run.scalars[tag], f"{run.name}::{tag}", name, colour, STYLES[j % len(STYLES)], smooth_weight)
                if band:
                    _band(ax, run, tag, colour)
        ax.legend(fontsize="small")
    for ax in axes[len(cells):]:
        ax.axis("off")
    return figure


def _plot(ax: Axes, series: Series, gid: str, label: str, colour, style: str, smooth_weight: float) -> None:
    values = series.values
    if smooth_weight > 0:
        ax.plot(series.steps, values, color=colour, linestyle=style, linewidth=1, alpha=0.25, gid=f"{gid}::raw")
        values = smooth(values, smooth_weight)
    marker = "o" if len(values) <= SPARSE else None
    ax.plot(series.steps, values, color=colour, linestyle=style, marker=marker, markersize=3, label=label, gid=gid)


def _band(ax: Axes, run: Run, tag: str, colour) -> None:
    """The raw min..max at the steps that logged both."""
    low, high = (run.scalars.get(tag.removesuffix("mean") + end) for end in ("min", "max"))
    if low is None or high is None:
        return
    steps, i, j = np.intersect1d(low.steps, high.steps, return_indices=True)
    ax.fill_between(steps, low.values[i], high.values[j], color=colour, alpha=0.15, linewidth=0,
                    gid=f"{run.name}::{tag}::band")


# ---------------------------------------------------------------------------------------------- timing
def timing(title: str, runs: Sequence[Run], smooth_weight: float) -> Figure | None:
    """One panel per run (overlaid stacks could not be read): its STACKED sections as stacked areas, raw, and
    `timing_s/step` as a line. A section missing at a step the run logged did not run in it: 0 s there."""
    stacks = [(run, present) for run in runs if (present := [s for s in STACKED if f"timing_s/{s}" in run.scalars])]
    if not stacks:
        return None
    figure, axes = _figure(title, len(stacks), 1)
    for ax, (run, sections) in zip(axes, stacks):
        tags = [f"timing_s/{s}" for s in sections] + ["timing_s/step"] * ("timing_s/step" in run.scalars)
        steps = np.unique(np.concatenate([run.scalars[tag].steps for tag in tags]))
        areas = ax.stackplot(steps, [_on_steps(run.scalars[f"timing_s/{s}"], steps) for s in sections],
                             labels=sections, colors=[SECTION_COLOURS[s] for s in sections], alpha=0.85)
        for area, section in zip(areas, sections):
            area.set_gid(f"{run.name}::timing_s/{section}")
        if "timing_s/step" in run.scalars:
            _plot(ax, run.scalars["timing_s/step"], f"{run.name}::timing_s/step", "step", "black", "-", smooth_weight)
        ax.set_title(run.name, fontsize="medium")
        ax.set_ylabel("seconds")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: the stack fills the panel
    return figure


def _on_steps(series: Series, steps: np.ndarray) -> np.ndarray:
    out = np.zeros(len(steps))
    out[np.searchsorted(steps, series.steps)] = series.values
    return out


# ---------------------------------------------------------------------------------------------- shared
def _figure(title: str, nrows: int, ncols: int) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(6.4 * ncols, 1.0 + 2.8 * nrows), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    axes = list(figure.subplots(nrows, ncols, squeeze=False, sharex=True).ravel())
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_tick_params(labelbottom=True)  # sharex hides them above the last row, which may be empty cells
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return figure, axes


def _clip(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _one(tag: str, band: bool = False) -> Panel:
    return Panel(tag, (Curve(re.escape(tag), tag, band),))


def _accuracy(data: str, var: str) -> tuple[Curve, ...]:
    return (
        Curve(rf"{data}/{var}/best{AT}8/mean", "best@8"),
        Curve(rf"{data}/{var}/mean{AT}8", "mean@8"),
        Curve(rf"val-(?:core|aux)/(?P<data>[^/]+)/{var}/pass{AT}(?P<k>\d+)", "pass@{k}"),
    )


FIGURES = (
    FigureSpec("response_length.png", "Response length (mean, min..max shaded)", "response_length/*",
               lines(_one("response_length/mean", band=True))),
    FigureSpec("format_errors.png", "Format errors per kind", "format_error/*", format_errors),
    FigureSpec("best_at_8.png", "Validation accuracy: best@8, mean@8, pass@k", "val-*/<data>/{acc,acc_turn_2}/*",
               lines(Panel("turn 1", _accuracy(VAL, "acc")),
                     Panel("turn 2 (within one fix)", _accuracy(AUX, "acc_turn_2")), ncols=2)),
    FigureSpec("score.png", "Score (min..max shaded) and accuracy", "critic/score/* or reward/accuracy",
               lines(_one("critic/score/mean", band=True), _one("reward/accuracy"))),
    FigureSpec("unverified.png", "Unverified rewards", "reward/unverified", lines(_one("reward/unverified"))),
    FigureSpec("logprob_diff.png", "Rollout vs trainer log-prob difference", "rollout/logprob_diff_*",
               lines(Panel("rollout/logprob_diff", (Curve(r"rollout/logprob_diff_(?P<s>max|mean)", "{s}"),)))),
    FigureSpec("actor.png", "Actor", "actor/{pg_loss,grad_norm,entropy}",
               lines(_one("actor/pg_loss"), _one("actor/grad_norm"), _one("actor/entropy"))),
    FigureSpec("throughput.png", "Throughput (tokens/s per device)", "perf/throughput", lines(_one("perf/throughput"))),
    FigureSpec("timing.png", "Step time by section (stacked)", "timing_s/<section>", timing),
)
