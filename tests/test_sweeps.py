"""Sweeps: deterministic job folders, skipping finished runs, resuming a killed sweep, and the comparison."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from cryobench_lab.compare import compare
from cryobench_lab.config import _job_dirname
from cryobench_lab.sweeps import config_hash, finished_metrics

REPO = Path(__file__).resolve().parents[1]
TIMING = ("train/wall_time_s", "train/images_per_s")


def test_job_dirname_is_one_path_component():
    assert _job_dirname("model=segvae,seed=0") == "model=segvae,seed=0"
    name = _job_dirname("data.particles=/a/b/particles.star,seed=1")
    assert "/" not in name and name.startswith("data.particles=particles.star~") and name.endswith(",seed=1")
    assert _job_dirname("data.particles=/x/particles.star") != _job_dirname("data.particles=/y/particles.star")
    assert len(_job_dirname(",".join(f"k{i}=v" for i in range(100)))) <= 200
    assert _job_dirname("") == "default"


def test_config_hash_ignores_execution_keys_only():
    cfg = OmegaConf.create({"model": {"name": "hydra", "n_classes": 3}, "seed": 0, "threads": None,
                            "trainer": {"devices": 1, "max_epochs": 2}, "output_dir": "/a", "logger": {"backends": ["csv"]}})
    same = OmegaConf.merge(cfg, {"threads": 2, "trainer": {"devices": 4}, "output_dir": "/b", "logger": {"backends": []}})
    assert config_hash(same) == config_hash(cfg)
    for change in ({"seed": 1}, {"model": {"n_classes": 5}}, {"trainer": {"max_epochs": 3}}):
        assert config_hash(OmegaConf.merge(cfg, change)) != config_hash(cfg)


def test_finished_metrics_needs_the_same_config_and_a_complete_file(tmp_path):
    from cryobench_lab.run_folder import write_marker
    from cryobench_lab.sweeps import set_aside_stale_run

    cfg = OmegaConf.create({"model": {"name": "a"}, "seed": 0})
    assert finished_metrics(tmp_path, cfg) is None
    (tmp_path / "metrics.json").write_text(json.dumps({"train/wall_time_s": 1.0, "config_hash": config_hash(cfg)}))
    assert finished_metrics(tmp_path, cfg) is None  # no completeness marker: killed before the last write
    write_marker(tmp_path, config_hash(cfg))
    assert finished_metrics(tmp_path, cfg)["train/wall_time_s"] == 1.0
    assert finished_metrics(tmp_path, OmegaConf.merge(cfg, {"seed": 1})) is None
    (tmp_path / "metrics.json").write_text('{"train/wall_time_s": 1.0, "config_hash": "')  # truncated
    assert finished_metrics(tmp_path, cfg) is None
    # a folder left by another config: the whole run is moved aside so the job starts over
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    (tmp_path / "checkpoints").mkdir()
    assert set_aside_stale_run(tmp_path, cfg) is None and (tmp_path / "checkpoints").is_dir()  # same config: kept
    aside = set_aside_stale_run(tmp_path, OmegaConf.merge(cfg, {"model": {"name": "b"}}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [aside.name]
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "complete.json", "config.yaml", "metrics.json"]


def _fake_run(folder: Path, method: str, seed: int, n_classes: int, auc: float, ari: float) -> None:
    folder.mkdir(parents=True)
    freq = [i / 32 for i in range(17)]
    per_state = [{"state": s, "freq": freq, "curve": [max(0.0, 1 - f * (3 - auc)) for f in freq]} for s in (0, 1)]
    metrics = {"dataset": "toy", "seed": seed, "method": method, "apix": 2.0, "n_particles": 10,
               "train/wall_time_s": 10.0 + seed, "train/images_per_s": 100.0, "val/fsc_auc_mean": auc, "val/ari": ari,
               "val/dist_corr_LID_CORE": math.nan, "val/per_state": per_state}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    cfg = {"data": {"name": "toy", "snr": 0.1}, "model": {"name": method, "n_classes": n_classes}, "seed": seed,
           "output_dir": str(folder), "threads": None}
    OmegaConf.save(OmegaConf.create(cfg), folder / "config.yaml")


def test_compare_mean_std_over_seeds_figures_and_html(tmp_path):
    sweep = tmp_path / "study"
    aucs = {("hydra", 1): (0.20, 0.22), ("hydra", 3): (0.30, 0.34), ("hydra", 5): (0.31, 0.33), ("oracle", 1): (0.40, 0.40)}
    for (method, K), values in aucs.items():
        for seed, auc in enumerate(values):
            _fake_run(sweep / f"model={method},K={K},seed={seed}", method, seed, K, auc, ari=0.1 * K + 0.01 * seed)
    (sweep / "model=segvae,seed=0").mkdir()
    (sweep / "model=segvae,seed=0" / "error.txt").write_text("data.structure: no base structure\n")
    out = compare([sweep])
    summary = pd.read_csv(out["summary_csv"])
    assert list(summary.columns[:4]) == ["dataset", "method", "model.n_classes", "n_seeds"]
    row = summary[(summary["method"] == "hydra") & (summary["model.n_classes"] == 3)].iloc[0]
    assert row["n_seeds"] == 2
    assert row["val/fsc_auc_mean_mean"] == pytest.approx(0.32)
    assert row["val/fsc_auc_mean_std"] == pytest.approx(0.02 * math.sqrt(2))  # sample std of (0.30, 0.34)
    assert row["train/wall_time_s_mean"] == pytest.approx(10.5)
    assert math.isnan(row["val/dist_corr_LID_CORE_mean"])  # NaN metrics stay NaN, not 0
    md = out["summary_md"].read_text()
    assert "0.320 ± 0.028" in md and "| toy | oracle | 1 | 2 |" in md
    assert {f.name for f in out["figures"]} == {"fsc_curves.png", "bars.png", "ari_vs_k.png"}
    report = out["report"].read_text()
    assert report.count("data:image/png;base64,") == 3 and "src=\"figures" not in report
    assert "no base structure" in report  # the failed run is listed
    assert len(pd.read_csv(out["runs_csv"])) == 8


def test_compare_reads_the_part_scores_of_part_aware_mixtures(tmp_path):
    for seed, ari in enumerate((0.6, 0.7)):
        run = tmp_path / "study" / f"seed={seed}"
        _fake_run(run, "partgmm", seed, 1, 0.3, math.nan)
        (run / "parts").mkdir()
        parts = {"n_parts": 3, "n_anchors": 16, "part_sizes": [5, 5], "part_ari_vs_domain": ari, "gates": {"0": {}}}
        (run / "parts" / "parts.json").write_text(json.dumps(parts))
    row = pd.read_csv(compare([tmp_path / "study"])["summary_csv"]).iloc[0]
    assert row["val/part_ari_mean"] == pytest.approx(0.65) and row["val/n_parts_mean"] == 3
    assert "val/n_anchors_mean" not in row and "val/part_sizes_mean" not in row


def _tiny_args(tiny) -> list[str]:
    return ["data=custom", f"data.particles={tiny / 'particles.star'}", f"data.labels={tiny / 'labels.npy'}",
            f"data.gt_volumes={tiny / 'gt_volumes'}", "data.snr=0.1"]


def _sweep_cmd(tiny, extra=()) -> list[str]:
    # two "methods" (the oracle's constant and FSC-weighted Wiener filters) x two seeds, tiny and fast
    return [sys.executable, "-m", "cryobench_lab", "-m", "+sweep=segmentation_ablation", "+size=tiny",
            "model=backproject", "model.wiener=constant,fsc", "seed=0,1", *_tiny_args(tiny), *extra]


def _env(tmp_path, sweeps: Path) -> dict:
    return dict(os.environ, WANDB_MODE="disabled", CRYOBENCH_LAB_CACHE=str(tmp_path / "cache"),
                CRYOBENCH_SWEEPS=str(sweeps), OMP_NUM_THREADS="1")


def _table_without_timing(study: Path) -> pd.DataFrame:
    summary = pd.read_csv(compare([study], study / "compare")["summary_csv"])
    return summary.drop(columns=[c for c in summary.columns if c.startswith(TIMING)])


def _sweep_in_process(tiny, monkeypatch, capsys) -> str:
    """Run the tiny sweep in this process (no interpreter start-up); returns its stderr."""
    from cryobench_lab.__main__ import _app

    monkeypatch.setattr(sys, "argv", ["cryobench_lab", *_sweep_cmd(tiny)[3:]])
    _app()
    return capsys.readouterr().err


def test_sweep_skips_finished_runs_and_reruns_broken_ones(tiny_dataset, tmp_path, monkeypatch, capsys):
    sweeps = tmp_path / "sweeps"
    for key, value in _env(tmp_path, sweeps).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    _sweep_in_process(tiny_dataset, monkeypatch, capsys)
    study = sweeps / "segmentation_ablation"
    runs = sorted(p.parent for p in study.rglob("metrics.json"))
    assert len(runs) == 4 and all("/" not in p.relative_to(study).as_posix() for p in runs)
    before = _table_without_timing(study)
    # a crash mid-run leaves no metrics.json (it is written last, atomically); a stale one has another config
    (runs[0] / "metrics.json").unlink()
    stale = json.loads((runs[1] / "metrics.json").read_text())
    (runs[1] / "metrics.json").write_text(json.dumps({**stale, "config_hash": "0" * 12}))
    kept = {p: (p / "metrics.json").read_text() for p in runs[2:]}
    err = _sweep_in_process(tiny_dataset, monkeypatch, capsys)
    assert err.count("skipped:") == 2
    assert all((p / "metrics.json").read_text() == text for p, text in kept.items())  # untouched
    pd.testing.assert_frame_equal(_table_without_timing(study), before)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_killed_sweep_resumes_to_the_same_table(tiny_dataset, tmp_path):
    """Acceptance: kill a sweep after two finished runs, re-run it, get the uninterrupted sweep's table."""
    env = _env(tmp_path, tmp_path / "full")
    full = subprocess.run(_sweep_cmd(tiny_dataset), check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]
    env = _env(tmp_path, tmp_path / "killed")
    study = tmp_path / "killed" / "segmentation_ablation"
    proc = subprocess.Popen(_sweep_cmd(tiny_dataset), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and len(list(study.rglob("metrics.json"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(study.rglob("metrics.json")))
    assert 2 <= finished < 4
    again = subprocess.run(_sweep_cmd(tiny_dataset), check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped:") == finished
    pd.testing.assert_frame_equal(_table_without_timing(study),
                                  _table_without_timing(tmp_path / "full" / "segmentation_ablation"))


STUDIES = ("segmentation_ablation", "segment_count", "hydra_kd", "partgmm_ablation", "leaderboard")


@pytest.mark.parametrize("study", STUDIES)
def test_study_composes_and_its_wandb_version_has_the_same_grid(study):
    import yaml
    from hydra import compose, initialize_config_dir

    from cryobench_lab.config import register_configs

    register_configs()

    params = OmegaConf.load(REPO / "conf" / "sweep" / f"{study}.yaml").hydra.sweeper.params
    grid = {k: [v.strip() for v in str(values).split(",")] for k, values in params.items()}
    wandb_grid = yaml.safe_load((REPO / "sweeps" / f"{study}.wandb.yaml").read_text())["parameters"]
    assert {k: [str(v) for v in p["values"]] for k, p in wandb_grid.items()} == grid
    models = grid.get("model", [])
    missing = [m for m in models if not (REPO / "conf" / "model" / f"{m}.yaml").exists()]
    if missing:
        pytest.skip(f"model configs not in this checkout yet: {missing}")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        first = {k: v[0] for k, v in grid.items()}
        cfg = compose(config_name="train", overrides=[f"+sweep={study}", *(f"{k}={v}" for k, v in first.items()),
                                                       "output_dir=."], return_hydra_config=True)
    assert cfg.skip_finished and cfg.logger.group == study and f"study:{study}" in cfg.logger.tags
    assert cfg.hydra.sweep.dir.endswith(f"/{study}")
