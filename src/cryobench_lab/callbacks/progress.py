"""What a run shows while it trains: one progress bar with epoch k/N, the loss, images/s and the time left; a
``run.log`` in the run folder with one line per epoch (Hydra's log handler writes the same file); and none of the library chatter that reads like an
error but says nothing about the user's data."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

# Library messages that concern neither the data nor the run's result (matched as substrings).
_NOISE = (
    "GPU available:", "TPU available:", "HPU available:", "litlogger", "LitLogger",
    "but have no `validation_step`", "configure_optimizers` returned `None`", "is smaller than the logging interval",
    "LeafSpec", "does not have many workers", "anonymous setting has no effect", "Images sizes do not match",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _NOISE)


def quiet_library_noise() -> None:
    """Filter the known library messages above from warnings and from every handler that prints them."""
    for text in _NOISE:
        warnings.filterwarnings("ignore", message=f".*{text}.*")
    noise = _DropNoise()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "wandb", ""):
        logger = logging.getLogger(name)
        logger.addFilter(noise)
        for handler in logger.handlers:
            handler.addFilter(noise)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class RunLog(L.Callback):
    """Counts images per epoch and appends ``epoch k/N  <losses>  images/s  time`` to ``run.log`` (rank 0)."""

    def __init__(self, path: Path):
        self.path = path
        self.epoch_start = 0.0
        self.images = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_start, self.images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and "images" in batch:
            self.images += int(batch["images"].shape[0])

    def images_per_s(self) -> float | None:
        elapsed = time.perf_counter() - self.epoch_start
        return self.images / elapsed if self.images and elapsed > 0 else None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        losses = {k: float(v) for k, v in trainer.callback_metrics.items() if "loss" in k and v.numel() == 1}
        text = "  ".join(f"{k}={v:.5g}" for k, v in sorted(losses.items()))
        rate = self.images_per_s()
        append_run_log(self.path, f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {text}"
                                  + (f"  images/s={rate:.0f}" if rate else "")
                                  + f"  time={time.perf_counter() - self.epoch_start:.1f}s")


class RunProgressBar(TQDMProgressBar):
    """``Epoch 3/16: 40%|… loss=0.812, img/s=214, left≈2 min`` (no ``v_num``); rates from a :class:`RunLog`."""

    def __init__(self, run_log: RunLog):
        super().__init__()
        self.run_log = run_log
        self._fit_start = 0.0
        self._first_epoch = 0

    def _fraction_done(self, trainer: L.Trainer) -> float:
        per_epoch = self.total_train_batches if self.total_train_batches not in (None, float("inf")) else 0
        within = self.train_progress_bar.n / per_epoch if per_epoch and self.train_progress_bar else 0.0
        return (trainer.current_epoch - self._first_epoch + within) / max(trainer.max_epochs - self._first_epoch, 1)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._fit_start = time.perf_counter()
        self._first_epoch = trainer.current_epoch  # a resumed run times only what it runs

    def on_train_epoch_start(self, trainer, *args) -> None:
        # as Lightning's, with "Epoch k/N" counted from 1 (Lightning shows "Epoch k-1" with no total)
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=convert_inf(self.total_train_batches))
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def get_metrics(self, trainer, pl_module) -> dict:
        logged = trainer.callback_metrics  # every method's train/loss, whether or not it asked for the bar
        key = next((k for k in ("train/loss_step", "train/loss") if k in logged), None)
        shown = {"loss": f"{float(logged[key]):.4g}"} if key else {}
        rate = self.run_log.images_per_s()
        if rate:
            shown["img/s"] = f"{rate:.0f}"
        done = self._fraction_done(trainer)
        if done > 0.02:
            shown["left≈"] = _minutes((time.perf_counter() - self._fit_start) * (1 - done) / done)
        return shown


def append_run_log(path: Path, line: str) -> None:
    """One dated line at the end of ``run.log`` (never rewritten, so resumed runs keep their history)."""
    with open(path, "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}\n")
