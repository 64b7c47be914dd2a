"""Reliability (issue 10): resume after SIGKILL, determinism, divergence guard, provenance, hostile inputs.

Training runs use the mixture of fields shrunk to seconds (model=hydra, 2 epochs of 3 batches on the tiny
two-state dataset); input checks use the oracle (model=backproject), which stops at the first bad file.
Every hostile input must fail with one InputError line and leave no run folder behind.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from hydra import compose, initialize_config_dir

from cryobench_lab.cli import CONF_DIR
from cryobench_lab.config import register_configs
from cryobench_lab.errors import InputError, TrainingError
from cryobench_lab.models.mixture_of_fields import MixtureOfFields

register_configs()

HYDRA_SMALL = ["model=hydra", "model.hidden_dim=32", "model.n_layers=1", "+model.n_features=16", "model.epochs=2",
               "data.batch_size=100"]
# wall time and throughput differ between runs; everything else must not
TIMING = {"train/wall_time_s", "train/images_per_s"}


def _data(tiny: Path, particles: Path | None = None) -> list[str]:
    return [
        "data=custom", f"data.particles={particles or tiny / 'particles.star'}", f"data.labels={tiny / 'labels.npy'}",
        f"data.gt_volumes={tiny / 'gt_volumes'}", "logger=none", "metrics=fast", "trainer.enable_progress_bar=false",
    ]


def _compose(overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, f"output_dir={out}"])


def _run(overrides: list[str], out: Path) -> dict:
    from cryobench_lab.run import run

    return run(_compose(overrides, out))


def _env() -> dict:
    # the same intra-op thread count as this process, so float sums happen in the same order
    return dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS=str(torch.get_num_threads()))


def _entry(args: list[str], cwd: Path, wrapper: str | None = None) -> subprocess.CompletedProcess:
    code = ["-m", "cryobench_lab"] if wrapper is None else ["-c", wrapper]
    return subprocess.run([sys.executable, *code, *args], check=False, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=600)


def _same_metrics(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in set(a) - TIMING:
        if key == "val/per_state":  # name the entry that differs
            for x, y in zip(a[key], b[key]):
                assert x == y, {k: (x.get(k), y.get(k)) for k in set(x) | set(y) if x.get(k) != y.get(k)}
        assert a[key] == b[key], key


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """An uninterrupted tiny hydra run: (metrics, run folder)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return _run([*HYDRA_SMALL, *_data(tiny_dataset)], out), out


# ---- reproducibility ---------------------------------------------------------------------------------
def test_same_seed_same_metrics_and_volumes(reference, tiny_dataset, tmp_path):
    metrics, first = reference
    again = _run([*HYDRA_SMALL, *_data(tiny_dataset)], tmp_path / "run")
    _same_metrics(metrics, again)
    for vol in sorted((first / "volumes").glob("*.mrc")):  # the headers hold a creation time
        with mrcfile.open(vol) as a, mrcfile.open(tmp_path / "run" / "volumes" / vol.name) as b:
            assert np.array_equal(a.data, b.data), vol.name


def test_run_folder_records_provenance(reference):
    _, out = reference
    record = json.loads((out / "provenance.json").read_text())
    versions = record["versions"]
    for key in ("cryobench_lab", "git_commit", "torch", "lightning", "wandb", "python"):
        assert key in versions, key
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__
    assert len(record["dataset"]) == 64 and record["ground_truth"]["n_states"] == 2
    assert "model" in (out / "config.yaml").read_text()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["cryobench_lab"]["dataset"] == record["dataset"]
    assert {"torch", "numpy", "python"} <= set(ckpt["cryobench_lab"]["rng"])


# ---- resume ------------------------------------------------------------------------------------------
def cli_with_callback(prelude: str, callback: str) -> str:
    """``python -c`` source that runs the CLI with ``callback()`` (a Lightning callback class defined in
    ``prelude``, which imports os, runpy, signal, sys and lightning as L) added to the Trainer."""
    return prelude + f"""
init = L.Trainer.__init__
def patched(self, *args, callbacks=None, **kwargs):
    init(self, *args, callbacks=[*(callbacks or []), {callback}()], **kwargs)
L.Trainer.__init__ = patched
sys.argv = ["cryobench_lab", *sys.argv[1:]]
runpy.run_module("cryobench_lab", run_name="__main__")
"""


KILLER = cli_with_callback("""
import os, runpy, signal, sys
import lightning as L

class KillMidEpoch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGKILL)

""", "KillMidEpoch")


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(reference, tiny_dataset, tmp_path):
    """SIGKILL at batch 1 of epoch 1 (of 0..1); the rerun with resume=true continues from the epoch-0
    checkpoint (weights, both Adam states, the per-image tables, epoch, random states) and ends with the
    uninterrupted run's metrics exactly."""
    metrics, _ = reference
    out = tmp_path / "run"
    args = [*HYDRA_SMALL, *_data(tiny_dataset), f"hydra.run.dir={out}"]
    killed = _entry(args, tmp_path, wrapper=KILLER)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert not (out / "metrics.json").exists() and not (out / "volumes").exists()
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["epoch"] == 0 and len(saved["optimizer_states"]) == 2
    assert "tables.logits.weight" in saved["state_dict"]
    resumed = _entry([*args, "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    after = json.loads((out / "metrics.json").read_text())
    _same_metrics(metrics, after)
    assert len(json.loads((out / "provenance.json").read_text())["resumes"]) == 1
    assert 0 < after["train/images_per_s"] < float("inf")  # the resumed session's one epoch


def test_resume_refuses_other_config_and_missing_checkpoint(reference, tiny_dataset, tmp_path):
    _, out = reference
    with pytest.raises(InputError, match="model.hidden_dim=32 .now 48"):
        _run([*HYDRA_SMALL, *_data(tiny_dataset), "model.hidden_dim=48"], out)
    with pytest.raises(InputError, match="resume=true but .* does not exist"):
        _run([*HYDRA_SMALL, *_data(tiny_dataset), "resume=true"], tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


# ---- divergence ----------------------------------------------------------------------------------------
class NaNFromEpochOne(MixtureOfFields):
    """The tiny mixture whose field gradients turn NaN from the second epoch on."""

    def on_after_backward(self) -> None:
        if self.current_epoch >= 1:
            next(p for p in self.field.parameters() if p.grad is not None).grad.fill_(float("nan"))


NAN_MODEL = [*HYDRA_SMALL, f"model._target_={__name__}.NaNFromEpochOne"]


def test_nan_gradient_stops_within_one_step(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        _run([*NAN_MODEL, *_data(tiny_dataset)], out)
    message = str(err.value)
    assert "\n" not in message
    assert "NaN/Inf gradient of field." in message and "epoch 1, batch 0 " in message
    assert f"last finite checkpoint: {out / 'checkpoints' / 'last.ckpt'}" in message
    assert not (out / "metrics.json").exists() and not (out / "volumes").exists()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_nan_gradient_skipped_with_counter(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    metrics = _run([*NAN_MODEL, *_data(tiny_dataset), "on_nonfinite=skip"], out)
    assert metrics["train/skipped_steps"] == 3  # every batch of epoch 1
    assert json.loads((out / "metrics.json").read_text())["train/skipped_steps"] == 3
    for vol in (out / "volumes").glob("*.mrc"):
        with mrcfile.open(vol) as m:
            assert np.isfinite(m.data).all()


def test_nan_volume_is_never_written(tmp_path):
    from cryobench_lab.io.mrc import write_mrc

    vol = np.zeros((8, 8, 8), np.float32)
    vol[1, 2, 3] = np.nan
    with pytest.raises(TrainingError, match="1 NaN/Inf"):
        write_mrc(tmp_path / "state_000.mrc", vol, apix=1.0)
    assert list(tmp_path.iterdir()) == []


# ---- output folder -----------------------------------------------------------------------------------
def test_full_disk_fails_before_training(tiny_dataset, tmp_path, monkeypatch):
    import cryobench_lab.run as run_module

    monkeypatch.setattr(run_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(InputError, match="0.00 GB free but the run needs about"):
        _run(["model=backproject", *_data(tiny_dataset)], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_output_folder_under_a_file(tiny_dataset, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(InputError, match="is not writable .Not a directory."):
        _run(["model=backproject", *_data(tiny_dataset)], tmp_path / "a_file" / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(tiny_dataset, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(InputError, match="is not writable"):
        _run(["model=backproject", *_data(tiny_dataset)], locked / "run")


# ---- eval refuses other data -------------------------------------------------------------------------
def test_eval_refuses_other_data_unless_forced(tiny_dataset, tmp_path):
    from cryobench_lab.eval import evaluate_run

    out = tmp_path / "run"
    _run(["model=backproject", *_data(tiny_dataset)], out)
    swapped = tmp_path / "labels.npy"
    np.save(swapped, 1 - np.load(tiny_dataset / "labels.npy"))  # the same two states, swapped
    with pytest.raises(InputError, match="ground truth fingerprint"):
        evaluate_run(out, overrides=[f"data.labels={swapped}"])
    reordered = tmp_path / "particles.star"
    df = starfile.read(tiny_dataset / "particles.star", always_dict=True)
    df["particles"] = df["particles"].iloc[::-1].reset_index(drop=True)
    starfile.write(df, reordered)
    shutil.copy(tiny_dataset / "particles.mrcs", tmp_path / "particles.mrcs")
    with pytest.raises(InputError, match="dataset fingerprint"):
        evaluate_run(out, overrides=[f"data.particles={reordered}"])
    forced = evaluate_run(out, overrides=[f"data.labels={swapped}"], force=True)
    assert forced["forced_fingerprint_mismatch"] == ["ground_truth"]
    assert evaluate_run(out)["val/fsc_auc_mean"] > 0.2  # its own data still scores


# ---- hostile inputs ----------------------------------------------------------------------------------
def _refused(tiny: Path, out: Path, *extra: str, particles: Path | None = None, match: str) -> str:
    with pytest.raises(InputError, match=match) as err:
        _run(["model=backproject", *_data(tiny, particles), *extra], out)
    assert "\n" not in str(err.value)
    assert not out.exists()
    return str(err.value)


def _tiny_arrays(tiny: Path):
    from cryobench_lab.io.particles import load_particles

    return load_particles(tiny / "particles.star")


def test_pose_pickle_in_another_order_is_refused(tiny_dataset, tmp_path):
    from cryobench_lab.io.pickles import save_poses

    meta = _tiny_arrays(tiny_dataset)
    order = np.random.default_rng(0).permutation(meta.n)
    save_poses(tmp_path / "poses.pkl", meta.rot[order], meta.trans_px[order], meta.D)
    line = _refused(tiny_dataset, tmp_path / "run", f"data.poses={tmp_path / 'poses.pkl'}",
                    match="poses are the rows of .* in another order")
    assert f"is pickle row {int(np.argsort(order)[0]) + 1}" in line
    # the same pickle in the star's order is accepted, and so are refined poses that differ
    save_poses(tmp_path / "same.pkl", meta.rot, meta.trans_px, meta.D)
    from cryobench_lab.io.particles import load_particles

    load_particles(tiny_dataset / "particles.star", poses=tmp_path / "same.pkl")
    tilted = meta.rot @ np.array([[1, 0, 0], [0, 0.995, -0.0998], [0, 0.0998, 0.995]], np.float32)
    save_poses(tmp_path / "refined.pkl", tilted, meta.trans_px, meta.D)
    load_particles(tiny_dataset / "particles.star", poses=tmp_path / "refined.pkl")


def test_ctf_pickle_in_another_order_is_refused(tiny_dataset, tmp_path):
    from cryobench_lab.io.pickles import save_ctf

    meta = _tiny_arrays(tiny_dataset)
    save_ctf(tmp_path / "ctf.pkl", meta.ctf[::-1])
    _refused(tiny_dataset, tmp_path / "run", f"data.ctf={tmp_path / 'ctf.pkl'}",
             match="CTF parameters are the rows of .* in another order")


def _star_copy(tiny: Path, folder: Path, edit) -> Path:
    """The tiny star (blocks optics, particles) edited by ``edit(blocks)``, next to a copy of its stack."""
    blocks = starfile.read(tiny / "particles.star", always_dict=True)
    edit(blocks)
    folder.mkdir(exist_ok=True)
    if not (folder / "particles.mrcs").exists():
        shutil.copy(tiny / "particles.mrcs", folder / "particles.mrcs")
    starfile.write(blocks, folder / "particles.star")
    return folder / "particles.star"


def test_duplicate_image_is_refused(tiny_dataset, tmp_path):
    def duplicate(blocks):
        p = blocks["particles"]
        p.loc[7, "rlnImageName"] = p.loc[3, "rlnImageName"]

    star = _star_copy(tiny_dataset, tmp_path / "data", duplicate)
    _refused(tiny_dataset, tmp_path / "run", particles=star, match="rows 4 and 8 both name image 4 of")


@pytest.mark.parametrize("column,value,match", [
    ("rlnImagePixelSize", 3.5, "different rlnImagePixelSize"),
    ("rlnImageSize", 64, "different rlnImageSize"),
])
def test_optics_groups_that_differ_are_refused(tiny_dataset, tmp_path, column, value, match):
    def second_group(blocks):
        optics = blocks["optics"]
        extra = optics.iloc[[0]].copy()
        extra["rlnOpticsGroup"], extra["rlnOpticsGroupName"], extra[column] = 2, "opticsGroup2", value
        blocks["optics"] = pd.concat([optics, extra], ignore_index=True)
        blocks["particles"].loc[150:, "rlnOpticsGroup"] = 2

    star = _star_copy(tiny_dataset, tmp_path / "data", second_group)
    _refused(tiny_dataset, tmp_path / "run", particles=star, match=match)


def _cs_file(path: Path, stack: Path, n: int, idx, D: int) -> Path:
    dtype = [("uid", "<u8"), ("blob/path", "S200"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
             ("blob/psize_A", "<f4")]
    cs = np.zeros(n, dtype=dtype)
    cs["uid"], cs["blob/path"], cs["blob/idx"] = np.arange(n), str(stack).encode(), idx
    cs["blob/shape"], cs["blob/psize_A"] = D, 3.0
    with open(path, "wb") as fh:  # np.save would append .npy
        np.save(fh, cs)
    return path


def test_cs_from_another_job_is_refused(tiny_dataset, tmp_path):
    stack = tiny_dataset / "particles.mrcs"
    longer = _cs_file(tmp_path / "J12_particles.cs", stack, 300, np.arange(300) + 100, 32)
    _refused(tiny_dataset, tmp_path / "run", "data.labels=null", "data.gt_volumes=null", particles=longer,
             match="row 201 asks for image 301 .1-based. of .* which holds 300 images")
    bigger_box = _cs_file(tmp_path / "J13_particles.cs", stack, 300, np.arange(300), 64)
    _refused(tiny_dataset, tmp_path / "run", "data.labels=null", "data.gt_volumes=null", particles=bigger_box,
             match="blob/shape says 64 px but the images are 32 px")


@pytest.mark.parametrize("dtype", [np.float16, np.int8])
def test_float16_and_int8_stacks_load(tiny_dataset, tmp_path, dtype):
    from cryobench_lab.data.particles import ParticleDataModule

    with mrcfile.open(tiny_dataset / "particles.mrcs") as m:
        images = m.data.copy()
    stored = (images / np.abs(images).max() * 100).astype(dtype)
    folder = tmp_path / "data"
    folder.mkdir()
    with mrcfile.new(folder / "particles.mrcs") as m:
        m.set_data(stored)
        m.set_image_stack()
        m.voxel_size = 3.0
    shutil.copy(tiny_dataset / "particles.star", folder / "particles.star")
    cfg = _compose(["model=backproject", *_data(tiny_dataset, folder / "particles.star")], tmp_path / "run").data
    dm = ParticleDataModule(cfg, seed=0)
    dm.setup()
    assert dm.info.n_particles == 300
    raw = dm.dataset.meta.images.read(np.arange(300))
    assert raw.dtype == np.float32 and np.array_equal(raw, stored.astype(np.float32))


@pytest.mark.parametrize("key", ["particles", "poses", "labels"])
def test_zero_byte_file_is_refused(tiny_dataset, tmp_path, key):
    empty = tmp_path / {"particles": "particles.star", "poses": "poses.pkl", "labels": "labels.npy"}[key]
    empty.touch()
    _refused(tiny_dataset, tmp_path / "run", f"data.{key}={empty}", match=f"data.{key}: .* is empty .0 bytes.")


def test_zero_byte_stack_is_refused(tiny_dataset, tmp_path):
    star = _star_copy(tiny_dataset, tmp_path / "data", lambda blocks: None)
    (tmp_path / "data" / "particles.mrcs").write_bytes(b"")
    _refused(tiny_dataset, tmp_path / "run", particles=star, match="particles.mrcs: file is empty")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused(tiny_dataset, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "poses.pkl"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    _refused(tiny_dataset, tmp_path / "run", f"data.poses={evil}", match="poses.pkl: pickle refers to posix.system, which is not a numpy array")
    assert not marker.exists()


def test_more_gpus_than_exist_is_refused(tiny_dataset, tmp_path):
    available = torch.cuda.device_count()
    _refused(tiny_dataset, tmp_path / "run", "trainer=gpu", f"trainer.devices={available + 1}",
             match=f"asks for {available + 1} GPU.s. but this machine has {available}")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while a checkpoint is written (here: torch.save fails half-way) leaves the previous one."""
    from cryobench_lab.callbacks.reliability import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, target)

    def crash(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, target)
    assert torch.load(target, weights_only=True)["w"].sum() == 3
    assert list(tmp_path.iterdir()) == [target]


def test_pose_star_in_another_order_is_paired_by_image_name(tiny_dataset, tmp_path):
    """A refinement's star names its images, so its rows pair with the particles by name in any order."""
    from cryobench_lab.io.particles import load_particles

    meta = _tiny_arrays(tiny_dataset)
    blocks = starfile.read(tiny_dataset / "particles.star", always_dict=True)
    shuffled = blocks["particles"].sample(frac=1.0, random_state=0).reset_index(drop=True)
    starfile.write({"optics": blocks["optics"], "particles": shuffled}, tmp_path / "refined.star")
    paired = load_particles(tiny_dataset / "particles.star", poses=tmp_path / "refined.star")
    np.testing.assert_allclose(paired.rot, meta.rot, atol=1e-6)
    np.testing.assert_allclose(paired.trans_px, meta.trans_px, atol=1e-5)
    starfile.write({"optics": blocks["optics"], "particles": shuffled.iloc[1:]}, tmp_path / "fewer.star")
    _refused(tiny_dataset, tmp_path / "run", f"data.poses={tmp_path / 'fewer.star'}",
             match="fewer.star: has no row for image .*particles.mrcs .particle [0-9]+; 1 of 300 particles unmatched")
