"""`report.md`: the figures written, each run's config summary and the last value of the headline metrics."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from kimina_jax.config import lookup
from kimina_jax.report.events import Run

CONFIG_KEYS = ("model.path", "experiment.name", "trainer.total_steps", "rollout.engine")
CONFIG_HEADER = ["run", "model.path", "recipe (experiment.name)", "steps reached / trainer.total_steps",
                 "rollout.engine"]

# (column, scalar pattern): the first matching scalar of a run (sorted) gives its last value.
HEADLINE = (
    ("score", r"critic/score/mean"),
    ("response length", r"response_length/mean"),
    ("best@8 turn 1", r"val-core/[^/]+/acc/best[@_]8/mean"),
    ("best@8 turn 2", r"val-aux/[^/]+/acc_turn_2/best[@_]8/mean"),
    ("grad_norm", r"actor/grad_norm"),
    ("unverified", r"reward/unverified"),
)


def render(runs: Sequence[Run], figures: Mapping[str, str], notes: Sequence[str] = (), smooth: float = 0.0) -> str:
    """The page's Markdown. `figures`: {file: title} of the figures written; `notes`: what was left out."""
    out = ["# Training report", "", "Runs: " + ", ".join(f"`{run.name}`" for run in runs) + ".", ""]
    out += ["## Runs", "", *_table(CONFIG_HEADER, [_config_row(run) for run in runs]), ""]
    out += ["## Last values", "", "The value at each run's last logged step of the metric (its step in brackets).", "",
            *_table(["run", *(c for c, _ in HEADLINE)], [_headline_row(run) for run in runs]), ""]
    out += ["## Figures", ""]
    if smooth > 0:
        out += [f"Lines smoothed as TensorBoard does (weight {smooth:g}); the raw values are the faint lines.", ""]
    for file, title in figures.items():
        out += [f"### {title}", "", f"![{title}]({file})", ""]
    if notes:
        out += ["## Not plotted", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(out)


def write(out_dir: Path, runs: Sequence[Run], figures: Mapping[str, str], notes: Sequence[str] = (),
          smooth: float = 0.0) -> Path:
    path = out_dir / "report.md"
    path.write_text(render(runs, figures, notes, smooth), encoding="utf-8")
    return path


def _config_row(run: Run) -> list[str]:
    model, recipe, total, engine = (lookup(run.config, key) for key in CONFIG_KEYS)
    return [run.name, _cell(model), _cell(recipe), f"{_cell(run.steps_reached)} / {_cell(total)}", _cell(engine)]


def _headline_row(run: Run) -> list[str]:
    row = [run.name]
    for _, pattern in HEADLINE:
        tags = run.tags(pattern)
        last = run.last(tags[0]) if tags else None
        row.append("-" if last is None else f"{last[1]:.4g} ({last[0]})")
    return row


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]
