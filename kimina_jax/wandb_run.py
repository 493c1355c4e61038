"""A Weights & Biases run beside TensorBoard (`logging.wandb`, the `wandb` extra): the same scalar names at the same
steps, the text samples as a table, the resolved config (secrets excluded, as `config.yaml`).

The run's id is kept in `<run_dir>/wandb/run_id`, so a resumed training run continues the same wandb run; a run
started anew (`trainer.resume=never` moves the earlier one, id included, to `previous/`) gets a new one. Offline
(`mode: offline` or `$WANDB_MODE=offline`) it needs no network: `wandb sync <run_dir>/wandb/offline-run-*` uploads
it later. Only process 0 opens one (the caller's `MetricsWriter` is enabled there alone).
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from kimina_jax.config import WandbConfig
from kimina_jax.errors import KiminaError
from kimina_jax.types import Sample

SAMPLE_COLUMNS = ("statement", "turn", "score", "acc", "format_error", "verdict", "response")


class WandbRun:
    """One wandb run of a training run folder."""

    def __init__(self, cfg: WandbConfig, run_dir: str | Path, config: Mapping[str, Any], default_name: str,
                 resume: bool):
        import wandb  # the config check has made sure it is installed

        self._wandb = wandb
        folder = Path(run_dir) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        # A run with no checkpoint starts again from step 1: a new wandb run, not a second history for the old one.
        run_id = id_file.read_text(encoding="utf-8").strip() if resume and id_file.exists() else uuid.uuid4().hex[:8]
        try:
            self._run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or default_name, id=run_id, resume="allow",
                dir=str(run_dir), config=dict(config), mode=cfg.mode,
            )
        except Exception as err:  # noqa: BLE001 (wandb raises many kinds: each is the same one line to the user)
            raise KiminaError(f"logging.wandb: could not start the wandb run: {err}") from None
        id_file.write_text(run_id + "\n", encoding="utf-8")

    @property
    def id(self) -> str:
        return self._run.id

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log({name: float(v) for name, v in metrics.items() if v is not None}, step=step)

    def samples(self, step: int, samples: Sequence[Sample], tag: str = "samples") -> None:
        rows = [[s.prompt.statement_id, s.prompt.turn, s.score, s.acc, s.format_error,
                 s.verdict.status if s.verdict is not None else "not sent", s.completion.text] for s in samples]
        self._run.log({tag: self._wandb.Table(columns=list(SAMPLE_COLUMNS), data=rows)}, step=step)

    def close(self) -> None:
        self._run.finish()
