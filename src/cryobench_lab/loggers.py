"""The run's loggers (W&B, CSV), built so that a run's history survives any number of resumes.

- CSV (:class:`HistoryCSVLogger`): Lightning's CSV logger deletes ``csv/metrics.csv`` as soon as it opens the
  folder, so every resume (and every failed start) erased the history. Here the existing rows are read
  instead, those the checkpoint has already accounted for are kept (see :func:`rows_before`), and the file is
  replaced, atomically, only once the new session has rows of its own: a start that fails never touches it.
- W&B: the run id is chosen when a run starts fresh (``provenance.json``) and every resume opens the same W&B
  run (``resume="allow"``). Steps the resumed session repeats are older than W&B's last step and W&B drops
  them, so the W&B history keeps the interrupted session's values for those steps.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import atomic_path

Row = dict[str, str]


def rows_before(epoch: int, global_step: int) -> Callable[[Row], bool]:
    """Which rows of a log a resume from a checkpoint of (``epoch``, ``global_step``) keeps.

    Lightning's rows carry the epoch: those of later epochs were logged after the checkpoint and the resumed
    session logs them again. Rows without an epoch (the scorer's) are kept up to the checkpoint's step, except
    the end-of-run summary (``train/wall_time_s``), which the resumed session writes again.
    """

    def keep(row: Row) -> bool:
        if row.get("train/wall_time_s"):
            return False
        if row.get("epoch"):
            return float(row["epoch"]) <= epoch
        return float(row.get("step") or 0) <= global_step

    return keep


class _HistoryWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep: Callable[[Row], bool] | None):
        self._keep = keep
        self._history: list[Row] | None = None
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here
        self._history = []
        if self._keep is not None and os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as fh:
                self._history = [row for row in csv.DictReader(fh) if self._keep(row)]

    def save(self) -> None:
        if self._history is None or not self.metrics:
            super().save()
            return
        # first rows of this session: the kept history plus them replace the file in one rename
        rows = self._history + self.metrics
        self.metrics_keys = sorted(set(self.metrics_keys).union(*rows))
        with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics, self._history = [], None


class HistoryCSVLogger(CSVLogger):
    """``<save_dir>/csv/metrics.csv`` that keeps the rows ``keep`` accepts (None: a fresh run keeps none)."""

    def __init__(self, save_dir: str, keep: Callable[[Row], bool] | None = None):
        super().__init__(save_dir=save_dir, name="csv", version="")
        self._keep = keep

    @property
    @rank_zero_experiment
    def experiment(self) -> _HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(self.log_dir, self._keep)
        return self._experiment


def wandb_mode() -> str:
    """'online' only when the user chose it or is logged in; the run never asks for an account."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def build_loggers(cfg: DictConfig, out_dir: Path, keep: Callable[[Row], bool] | None = None,
                  wandb_id: str | None = None) -> list:
    """The loggers of ``cfg.logger.backends``; ``keep`` selects the CSV rows a resume keeps, ``wandb_id`` is the
    W&B run to continue (None: W&B picks a new one)."""
    loggers = []
    for backend in cfg.logger.backends:
        if backend == "csv":
            loggers.append(HistoryCSVLogger(save_dir=str(out_dir), keep=keep))
        elif backend == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            os.environ.setdefault("WANDB_SILENT", "true")
            loggers.append(WandbLogger(
                project=cfg.logger.project, group=cfg.logger.group, tags=list(cfg.logger.tags),
                save_dir=str(out_dir), mode=wandb_mode(), id=wandb_id, resume="allow" if wandb_id else None,
                name=f"{cfg.model.name}-{cfg.data.name}-s{cfg.seed}",
                config=OmegaConf.to_container(cfg, resolve=True),
            ))
        else:
            raise InputError(f"logger.backends: {backend!r} is unknown; use wandb and/or csv (logger=wandb|csv|none)")
    return loggers
