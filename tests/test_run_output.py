"""What a user sees while a run trains, and the run.log it leaves: epoch k/N with the loss, no library chatter,
no line printed twice."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SMALL = ["model=hydra", "model.hidden_dim=32", "model.n_layers=1", "+model.n_features=16", "model.epochs=2",
         "data.batch_size=100"]


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("progress") / "run"
    data = ["data=custom", f"data.particles={tiny_dataset / 'particles.star'}",
            f"data.labels={tiny_dataset / 'labels.npy'}", f"data.gt_volumes={tiny_dataset / 'gt_volumes'}",
            "logger=csv", "metrics=fast"]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "cryobench_lab", *SMALL, *data, f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def test_progress_bar_shows_epochs_of_total_and_loss(tiny_run):
    _, console = tiny_run
    screens = console.replace("\r", "\n")
    assert "Epoch 2/2" in screens and "Epoch 0:" not in screens
    assert "loss=" in screens and "img/s=" in screens
    assert "v_num" not in screens


def test_console_has_no_library_chatter_and_no_line_twice(tiny_run):
    _, console = tiny_run
    for noise in ("GPU available", "litlogger", "validation_step", "logging interval", "LeafSpec"):
        assert noise not in console, noise
    lines = [line.strip() for line in console.replace("\r", "\n").splitlines() if line.strip()]
    texts = [line.split("] - ", 1)[-1].removeprefix("INFO: ") for line in lines if "INFO" in line]
    assert len(texts) == len(set(texts)), texts


def test_run_log_has_every_epoch_the_metrics_and_the_outputs(tiny_run):
    out, _ = tiny_run
    log = (out / "run.log").read_text()
    assert "epoch 1/2" in log and "epoch 2/2" in log and "loss" in log
    assert "val/fsc_auc_mean=" in log and f"outputs in {out}" in log
