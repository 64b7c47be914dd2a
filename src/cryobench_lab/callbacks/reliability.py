"""Resume and divergence safety for every method, without model code: one Lightning callback.

- **Resume**: each checkpoint also carries the global random states (torch, numpy, Python) and the run's
  dataset fingerprints (provenance.py). Lightning itself restores the weights, optimiser states, per-image
  tables (they are parameters or buffers), the epoch and the step; restoring the random states as well, with
  the DataModule's epoch-seeded shuffle, makes a run resumed from an end-of-epoch checkpoint repeat exactly
  what the uninterrupted run did next.
- **Divergence guard**: every batch's images are checked before the method sees them (so methods without a
  loss, the EM and backprojection accumulators, are covered too), the gradients before every optimiser
  step, and after every batch the returned loss. A NaN or Inf stops the run at once (``on_nonfinite=stop``, the default) with one line
  naming the step and the last finite checkpoint, before the bad step reaches the weights, so no later
  checkpoint or result is written from them. With ``on_nonfinite=skip`` images with NaN/Inf pixels are left
  out of their batch (the batch counts as a skipped step) and a non-finite optimiser step is skipped
  (its gradients are dropped, so Adam-style optimisers leave those parameters alone) and counted in
  ``train/skipped_steps``; more than ``max_skipped`` skips in a row stop the run.

Checkpoints are written by :class:`AtomicCheckpointIO`: Lightning's own writer stages the file in the
system temporary folder and moves it over, which degrades to a plain (interruptible) copy when that folder
is on another filesystem than the run folder.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cryobench_lab.errors import TrainingError
from cryobench_lab.io.atomic import atomic_path

NONFINITE_MODES = ("stop", "skip")


def _finite(t: torch.Tensor) -> bool:
    if t.is_sparse:
        t = t.coalesce().values()
    return bool(torch.isfinite(t).all())


def rng_states() -> dict:
    """Global random states as plain tensors, lists and ints (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(state), gauss],
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints saved to a temporary file next to the target, then renamed onto it (io/atomic.py)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class EpochCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that also saves the epochs of methods without optimiser steps.

    Lightning skips a save when ``global_step`` has not moved since the last one; an EM or backprojection
    method never steps an optimiser, so its ``global_step`` stays 0 and it would never be checkpointed (a
    killed ``multiclass`` run restarted from scratch). Every epoch's end is a new state, so it is saved.
    """

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._last_global_step_saved == trainer.global_step:
            self._last_global_step_saved = -1
        super().on_train_epoch_end(trainer, pl_module)


class ReliabilityCallback(L.Callback):
    """Random states and fingerprints in checkpoints; NaN/Inf guard on gradients and losses."""

    def __init__(self, fingerprints: dict | None = None, on_nonfinite: str = "stop", max_skipped: int = 100,
                 lr_hint: str | None = None):
        """``fingerprints``: stored in every checkpoint; ``lr_hint``: the override of a lower learning rate
        (``model.lr=1e-05``) suggested when the run stops."""
        if on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be stop or skip, got {on_nonfinite!r}")
        self.fingerprints = fingerprints or {}
        self.lr_hint = lr_hint
        self.mode = on_nonfinite
        self.max_skipped = max_skipped
        self.skipped_steps = 0
        self._in_a_row = 0
        self._skipping_batch = False

    # ---- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["cryobench_lab"] = {"rng": rng_states(), **self.fingerprints}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        extra = checkpoint.get("cryobench_lab") or {}
        if "rng" in extra:
            set_rng_states(extra["rng"])

    # ---- divergence guard ----------------------------------------------------------------------------
    def _where(self, trainer) -> str:
        return f"epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx} (global step {trainer.global_step})"

    def _stop(self, trainer, what: str) -> None:
        ckpt = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
        last = ckpt or "none (no epoch finished yet)"
        # Commands that the resume check accepts: a changed learning rate is not a resumable change (the
        # optimiser state restored from the checkpoint would bring the old rate back anyway), so it starts over.
        advice = []
        if self.mode == "stop":
            advice.append(f"to go on {'from it ' if ckpt else ''}skipping such steps rerun with "
                          f"`{'resume=true ' if ckpt else ''}on_nonfinite=skip`")
        if self.lr_hint:
            advice.append(f"to start over with a lower learning rate (this run is moved aside) rerun with "
                          f"`{self.lr_hint} resume=false`")
        raise TrainingError(
            f"{what} at {self._where(trainer)}; training stopped, nothing written from the diverged weights; "
            f"last finite checkpoint: {last}" + "".join(f"; {a}" for a in advice)
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._skipping_batch = False
        images = batch.get("images") if isinstance(batch, dict) else None
        if images is None:
            return
        finite = torch.isfinite(images.reshape(len(images), -1)).all(1)  # (B,)
        if bool(finite.all()):
            return
        bad = batch["index"][~finite].tolist() if "index" in batch else []
        what = f"NaN/Inf pixels in the images of particle(s) {', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''} (0-based)"
        if self.mode == "stop" or not bool(finite.any()):
            self._stop(trainer, what)
        # The batch dict is the one the method's training_step receives: drop the bad images in place.
        for key, value in list(batch.items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == len(finite):
                batch[key] = value[finite]
        self._skipping_batch = True
        self.skipped_steps += 1
        self._in_a_row += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if all(_finite(p.grad) for p in params):
            return
        names = {id(p): n for n, p in pl_module.named_parameters()}
        bad = next(names.get(id(p), "a parameter") for p in params if not _finite(p.grad))
        if self.mode == "stop":
            self._stop(trainer, f"NaN/Inf gradient of {bad}")
        for p in params:
            p.grad = None  # optimisers skip parameters without a gradient
        if not self._skipping_batch:
            self._skipping_batch = True
            self.skipped_steps += 1
            self._in_a_row += 1
            if self._in_a_row > self.max_skipped:
                self._stop(trainer, f"{self._in_a_row} batches in a row with NaN/Inf gradients")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not _finite(loss.detach()):
            if self.mode == "stop":
                self._stop(trainer, f"NaN/Inf loss ({float(loss.detach().float().reshape(-1)[0])})")
            if not self._skipping_batch:
                self.skipped_steps += 1
                self._in_a_row += 1
            return
        if not self._skipping_batch:
            self._in_a_row = 0
