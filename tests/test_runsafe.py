"""Run-folder safety (issue 26 items 1, 5, 7, 8, 9, 10, 11): one run per folder, checkpoints that know their
run, a completeness marker written last, fallback from a broken checkpoint, logs that survive resumes,
``resume=false`` moving the whole previous run aside, divergence advice that works, validated config values.

Training runs use the mixture of fields shrunk to seconds (2 epochs of 3 batches on the tiny two-state dataset).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cryobench_lab.cli import CONF_DIR
from cryobench_lab.config import register_configs
from cryobench_lab.errors import InputError, TrainingError
from cryobench_lab.models.mixture_of_fields import MixtureOfFields
from cryobench_lab.sweeps import finished_metrics
from test_reliability import KILLER  # kills a run with SIGKILL at batch 1 of epoch 1

register_configs()

HYDRA_SMALL = ["model=hydra", "model.hidden_dim=32", "model.n_layers=1", "+model.n_features=16", "model.epochs=2",
               "data.batch_size=100", "trainer.log_every_n_steps=1"]
TIMING = ("train/wall_time_s", "train/images_per_s")


def _data(tiny: Path, logger: str = "csv") -> list[str]:
    return [
        "data=custom", f"data.particles={tiny / 'particles.star'}", f"data.labels={tiny / 'labels.npy'}",
        f"data.gt_volumes={tiny / 'gt_volumes'}", f"logger={logger}", "metrics=fast", "trainer.enable_progress_bar=false",
    ]


def _compose(overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, f"output_dir={out}"])


def _run(overrides: list[str], out: Path) -> dict:
    from cryobench_lab.run import run

    return run(_compose(overrides, out))


def _csv(out: Path) -> pd.DataFrame:
    table = pd.read_csv(out / "csv" / "metrics.csv")
    return table.drop(columns=[c for c in table.columns if c.startswith(TIMING)])


@pytest.fixture(scope="module")
def finished(tiny_dataset, tmp_path_factory):
    """An uninterrupted tiny hydra run with a CSV log: (metrics, run folder)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return _run([*HYDRA_SMALL, *_data(tiny_dataset)], out), out


def _copy(finished, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished[1], tmp_path / "run"))


class Killed(BaseException):
    """Stands for a SIGKILL in-process: nothing after the raise runs (Lightning re-raises BaseExceptions)."""


def _crash_at(monkeypatch, epoch: int, batch: int) -> None:
    """Make the next Trainer die at (epoch, batch)."""

    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
            if trainer.current_epoch == epoch and batch_idx == batch:
                raise Killed

    init = L.Trainer.__init__

    def patched(self, *args, callbacks=None, **kwargs):
        init(self, *args, callbacks=[*(callbacks or []), Crash()], **kwargs)

    monkeypatch.setattr(L.Trainer, "__init__", patched)


# ---- item 1: one run per folder; checkpoints carry their run's config --------------------------------------
def test_busy_run_folder_is_refused_naming_the_holder(finished, tiny_dataset, tmp_path, capsys):
    from cryobench_lab.cli import check_overrides

    out = _copy(finished, tmp_path)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with open(out / ".lock", "a+") as held:  # another process holds the folder (an OS-level lock)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("otherhost pid 4242")
        held.flush()
        with pytest.raises(InputError, match="in use by otherhost pid 4242") as err:
            _run([*HYDRA_SMALL, *_data(tiny_dataset), "seed=1", "resume=false"], out)
        with pytest.raises(SystemExit):  # the entry point refuses before Hydra writes into the folder
            check_overrides(["model=backproject", f"hydra.run.dir={out}"])
        assert "in use by otherhost pid 4242" in capsys.readouterr().err
    assert "\n" not in str(err.value)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing of the holder's run moved
    _run([*HYDRA_SMALL, *_data(tiny_dataset)], out)  # released: the folder is usable again


def test_checkpoint_of_another_seed_is_refused_on_resume(finished, tiny_dataset, tmp_path):
    """The race of issue 26: config.yaml says seed 1 but last.ckpt holds seed 0's weights."""
    out = _copy(finished, tmp_path)
    stored = OmegaConf.load(out / "config.yaml")
    stored.seed = 1
    OmegaConf.save(stored, out / "config.yaml")
    with pytest.raises(InputError, match=r"last.ckpt was written by a run with seed=0 \(now 1\)"):
        _run([*HYDRA_SMALL, *_data(tiny_dataset), "seed=1"], out)


SLOW_START = """
import runpy, sys, time
import lightning as L

class SlowStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        time.sleep(4)

init = L.Trainer.__init__
def patched(self, *args, callbacks=None, **kwargs):
    init(self, *args, callbacks=[*(callbacks or []), SlowStart()], **kwargs)
L.Trainer.__init__ = patched
sys.argv = ["cryobench_lab", *sys.argv[1:]]
runpy.run_module("cryobench_lab", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_runs_started_at_once_into_one_folder(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", SLOW_START, "model=backproject", *_data(tiny_dataset), f"seed={seed}",
                          f"hydra.run.dir={out}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for seed in (0, 1)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, err in results]
    refused = next(err for code, err in results if code == 2)
    assert re.search(r"^error: run folder .* is in use by \S+ pid \d+", refused, re.M), refused[-2000:]
    assert "Traceback" not in refused
    winner = next(seed for seed, (code, _) in enumerate(results) if code == 0)
    assert OmegaConf.load(out / "config.yaml").seed == winner
    assert json.loads((out / "metrics.json").read_text())["seed"] == winner
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["cryobench_lab"]["run_config"]["seed"] == winner


# ---- item 5: a completeness marker written last, checked by skip_finished ---------------------------------
def test_kill_while_writing_class_outputs_leaves_the_job_unfinished(tiny_dataset, tmp_path, monkeypatch):
    def killed_half_way(self, out_dir, datamodule):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "class_000.mrc").write_bytes(b"")
        raise Killed

    monkeypatch.setattr(MixtureOfFields, "write_outputs", killed_half_way)
    out = tmp_path / "run"
    overrides = [*HYDRA_SMALL, *_data(tiny_dataset), "model.epochs=1"]
    with pytest.raises(Killed):
        _run(overrides, out)
    assert finished_metrics(out, _compose(overrides, out)) is None


def test_skip_finished_checks_every_listed_output(finished, tiny_dataset, tmp_path):
    out = _copy(finished, tmp_path)
    cfg = _compose([*HYDRA_SMALL, *_data(tiny_dataset)], out)
    assert finished_metrics(out, cfg) is not None
    listed = json.loads((out / "complete.json").read_text())["files"]
    assert {"metrics.json", "config.yaml", "classes/z.pkl", "classes/particles_classes.star"} <= set(listed)
    (out / "classes" / "z.pkl").unlink()
    assert finished_metrics(out, cfg) is None


# ---- item 7: a broken checkpoint ------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_last_checkpoint_falls_back_to_the_newest_intact_one(finished, tiny_dataset, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    _truncate(out / "checkpoints" / "last.ckpt")
    log = _csv(out)
    metrics = _run([*HYDRA_SMALL, *_data(tiny_dataset)], out)
    err = capsys.readouterr().err
    assert re.search(r"last.ckpt is unreadable .*; resuming from .*epoch=1-step=12.ckpt", err), err[-2000:]
    for key in set(metrics) - set(TIMING):
        assert metrics[key] == finished[0][key], key
    pd.testing.assert_frame_equal(_csv(out), log)  # the history is kept, the rescored summary replaces its twin


def test_no_intact_checkpoint_is_one_line_and_keeps_the_log(finished, tiny_dataset, tmp_path):
    out = _copy(finished, tmp_path)
    for ckpt in (out / "checkpoints").glob("*.ckpt"):
        _truncate(ckpt)
    log = (out / "csv" / "metrics.csv").read_bytes()
    with pytest.raises(InputError, match="no intact checkpoint in .*checkpoints.*resume=false") as err:
        _run([*HYDRA_SMALL, *_data(tiny_dataset)], out)
    assert "\n" not in str(err.value)
    assert (out / "csv" / "metrics.csv").read_bytes() == log


# ---- item 8: the log history survives resumes ----------------------------------------------------------
def test_csv_history_survives_two_crashes(finished, tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    overrides = [*HYDRA_SMALL, *_data(tiny_dataset)]
    _crash_at(monkeypatch, epoch=1, batch=1)
    with pytest.raises(Killed):
        _run(overrides, out)
    monkeypatch.undo()
    _crash_at(monkeypatch, epoch=1, batch=2)
    with pytest.raises(Killed):
        _run(overrides, out)
    monkeypatch.undo()
    _run(overrides, out)
    pd.testing.assert_frame_equal(_csv(out), _csv(finished[1]))  # the uninterrupted run's log, row for row




@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_then_resume_keeps_one_wandb_run_and_the_csv_history(finished, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS=str(torch.get_num_threads()))
    args = [*HYDRA_SMALL, *_data(tiny_dataset, logger="wandb"), f"hydra.run.dir={out}"]
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = subprocess.run([sys.executable, "-m", "cryobench_lab", *args], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs
    pd.testing.assert_frame_equal(_csv(out), _csv(finished[1]))


# ---- item 9: resume=false moves the whole previous run aside ----------------------------------------------
def test_resume_false_moves_the_whole_previous_run_aside(finished, tiny_dataset, tmp_path):
    out = _copy(finished, tmp_path)
    _run(["model=backproject", *_data(tiny_dataset), "resume=false"], out)
    # hydra's class outputs are not mixed with the oracle's run (which writes its own class maps, no latents)
    assert not (out / "classes" / "z.pkl").exists()
    assert json.loads((out / "metrics.json").read_text())["method"] == "backproject"
    assert sorted(p.name for p in (out / "volumes").iterdir()) == ["state_000.mrc", "state_001.mrc"]
    assert "train/loss_epoch" not in pd.read_csv(out / "csv" / "metrics.csv").columns
    (aside,) = out.glob("replaced-*")
    assert json.loads((aside / "metrics.json").read_text())["method"] == "hydra"
    assert (aside / "classes" / "z.pkl").is_file() and (aside / "checkpoints" / "last.ckpt").is_file()


# ---- item 10: divergence advice that works --------------------------------------------------------------
class NaNFromEpochOne(MixtureOfFields):
    """The tiny mixture whose field gradients turn NaN from the second epoch on."""

    def on_after_backward(self) -> None:
        if self.current_epoch >= 1:
            next(p for p in self.field.parameters() if p.grad is not None).grad.fill_(float("nan"))


def test_every_command_the_divergence_message_suggests_is_accepted(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    overrides = [*HYDRA_SMALL, f"model._target_={__name__}.NaNFromEpochOne", *_data(tiny_dataset)]
    with pytest.raises(TrainingError) as err:
        _run(overrides, out)
    suggested = re.findall(r"`([^`]+)`", str(err.value))
    assert len(suggested) == 2, str(err.value)
    skip, lower_lr = (s.split() for s in suggested)
    assert "resume=true" in skip and "resume=false" in lower_lr
    metrics = _run([*overrides, *skip], out)  # continues from the last finite checkpoint, skipping the NaN steps
    assert metrics["train/skipped_steps"] == 3
    with pytest.raises(TrainingError):  # accepted (this toy model diverges at any learning rate)
        _run([*overrides, *lower_lr], out)
    assert list(out.glob("replaced-*/metrics.json"))  # the skipped run was moved aside, not mixed in


# ---- item 11: config values validated before anything is written -----------------------------------------
@pytest.mark.parametrize("override,match", [
    ("data.batch_size=0", "data.batch_size=0: must be a positive integer"),
    ("data.batch_size=-4", "data.batch_size=-4: must be a positive integer"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1: must be a positive integer or null"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0: must be a positive integer or null"),
])
def test_bad_values_fail_at_start_up_in_one_line(override, match, capsys):
    from cryobench_lab.cli import check_overrides

    with pytest.raises(SystemExit) as exit_:
        check_overrides(["model=backproject", override])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(f"error: {match}", err), err


def test_run_folder_under_a_file_fails_before_hydra_creates_it(tmp_path, capsys):
    from cryobench_lab.cli import check_overrides

    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit):
        check_overrides(["model=backproject", f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hydra.run.dir" in err and "a_file is not a folder" in err, err


def test_bad_batch_size_leaves_no_run_folder(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(InputError, match="data.batch_size=0"):
        _run(["model=backproject", *_data(tiny_dataset), "data.batch_size=0"], out)
    assert not out.exists()


def test_entry_point_bad_batch_size_is_one_line(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "cryobench_lab", "model=backproject", *_data(tiny_dataset),
                           "data.batch_size=0", f"hydra.run.dir={out}"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, WANDB_MODE="disabled"), timeout=300, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: data.batch_size=0"), done.stderr[-2000:]
    assert not out.exists()
