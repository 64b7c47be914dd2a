"""Sweep launchers: hydra/launcher=local (joblib processes) and slurm (submitit), the latter exercised with
submitit's local executor (no cluster here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _compose_hydra(overrides):
    from hydra import compose, initialize_config_dir

    from cryobench_lab.config import register_configs

    register_configs()

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, "output_dir=."], return_hydra_config=True)


def test_launcher_configs_compose():
    slurm = _compose_hydra(["+sweep=hydra_kd", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=4"]).hydra.launcher
    assert slurm._target_.endswith("submitit_launcher.SlurmLauncher")
    assert slurm.tasks_per_node == 4 and slurm.max_num_timeout >= 1 and slurm.timeout_min > 0
    assert slurm.submitit_folder.endswith("/.submitit/%j")
    local = _compose_hydra(["+sweep=hydra_kd", "hydra/launcher=local", "threads=1"])
    assert local.hydra.launcher._target_.endswith("JoblibLauncher") and local.hydra.launcher.n_jobs == 2
    assert local.threads == 1


def _tiny_sweep(tiny, sweeps: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", CRYOBENCH_SWEEPS=str(sweeps), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "cryobench_lab", "-m", "+sweep=segmentation_ablation", "+size=tiny", "model=backproject",
         "model.wiener=constant,fsc", "seed=0", "data=custom", "data.snr=0.1", f"data.particles={tiny / 'particles.star'}",
         f"data.labels={tiny / 'labels.npy'}", f"data.gt_volumes={tiny / 'gt_volumes'}", *launcher],
        cwd=sweeps.parent, env=env, capture_output=True, text=True, timeout=1500, check=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("launcher", [["hydra/launcher=local", "threads=1"], ["hydra/launcher=submitit_local"]],
                         ids=["joblib", "submitit_local"])
def test_parallel_launchers_run_every_job(tiny_dataset, tmp_path, launcher):
    proc = _tiny_sweep(tiny_dataset, tmp_path / "sweeps", launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = tmp_path / "sweeps" / "segmentation_ablation"
    done = sorted(p.parent.name for p in study.rglob("metrics.json"))
    assert len(done) == 2 and any("wiener=fsc" in d for d in done) and any("wiener=constant" in d for d in done)
    written = {p: p.stat().st_mtime_ns for p in study.rglob("metrics.json")}
    again = _tiny_sweep(tiny_dataset, tmp_path / "sweeps", launcher)  # resumable with these launchers too
    assert again.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in study.rglob("metrics.json")} == written  # nothing re-run
    # joblib jobs print to the sweep's own stderr; submitit jobs to their logs in <sweep>/.submitit/<job>/
    # (the first sweep's jobs ran, so every "skipped:" there is the second sweep's)
    logs = "".join(p.read_text() for p in study.rglob(".submitit/*/*_log.*"))
    assert (again.stderr + again.stdout + logs).count("skipped:") == 2


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ddp_inside_a_local_sweep_runs_each_job_once(tiny_dataset, tmp_path):
    """trainer=ddp in a multirun: each job's rank-1 process re-runs that job only (sweeps.prepare_ddp_relaunch),
    and the next job starts its own process group."""
    proc = _tiny_sweep(tiny_dataset, tmp_path / "sweeps", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stderr + proc.stdout).count("Starting with 2 processes") >= 2
    assert len(list((tmp_path / "sweeps" / "segmentation_ablation").rglob("metrics.json"))) == 2
