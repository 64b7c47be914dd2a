"""Issue 26 items 2, 3, 4, 6: ground truth and inputs are checked at set-up, before any training.

Each case builds a variant of the tiny dataset (tests/conftest.py) and checks what the DataModule does with it:
pair ground-truth volumes with states by their numbers, refuse volumes on another grid than the particles,
refuse particles without CTF unless ``data.ctf=none``, and warn (one logged line) when defocus or poses look
wrong.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cryobench_lab.config import DataConfig
from cryobench_lab.data.particles import ParticleDataModule
from cryobench_lab.errors import InputError
from cryobench_lab.io.mrc import read_mrc, write_mrc

CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
               "rlnAmplitudeContrast", "rlnPhaseShift")


def _cfg(tiny, **kw):
    base = OmegaConf.structured(DataConfig(name="tiny"))
    base.particles = str(tiny / "particles.star")
    base.labels = str(tiny / "labels.npy")
    base.gt_volumes = str(tiny / "gt_volumes")
    base.datadir = str(tiny)
    return OmegaConf.merge(base, kw)


def _setup(tiny, **kw) -> ParticleDataModule:
    dm = ParticleDataModule(_cfg(tiny, **kw))
    dm.setup()
    return dm


def _state_volume(tiny, s: int = 0) -> np.ndarray:
    return read_mrc(tiny / "gt_volumes" / f"state_{s:03d}.mrc")[0]  # (32, 32, 32), 3 Å


def _fourier_pad(vol: np.ndarray, D: int) -> np.ndarray:
    """The same map sampled on a finer grid (box D, same field of view)."""
    from cryobench_lab.physics.fft import fourier_pad_3d

    return fourier_pad_3d(torch.from_numpy(vol), D).numpy()


def _corr(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def _volumes(folder, named: dict) -> str:
    """Write ``{file name: (volume, voxel size Å)}`` into ``folder``; returns its path."""
    folder.mkdir()
    for name, (vol, apix) in named.items():
        write_mrc(folder / name, vol, apix)
    return str(folder)


def _star_variant(tiny, out, edit) -> str:
    """The tiny star file with ``edit(df)`` applied to its particle table, written to ``out``."""
    from cryobench_lab.io.star import read_star, write_star

    df = read_star(tiny / "particles.star")
    df = edit(df)
    write_star(out, df)
    return str(out)


# ---------------------------------------------------------------------------------------------------------
# Item 2: ground-truth volumes paired with states by the numbers in their names


def test_gt_volumes_pair_with_states_in_numeric_order(tiny_dataset, tmp_path):
    base = _state_volume(tiny_dataset)
    n_states = 12  # vol_10, vol_11 sort between vol_1 and vol_2 in name order
    np.save(tmp_path / "labels.npy", np.arange(300, dtype=np.int64) % n_states)
    folder = _volumes(tmp_path / "vols", {f"vol_{k}.mrc": (base * (k + 1), 3.0) for k in range(n_states)})
    dm = _setup(tiny_dataset, labels=str(tmp_path / "labels.npy"), gt_volumes=folder)
    scale = [float(dm.info.gt_volumes[k].abs().max() / base.max()) for k in range(n_states)]
    assert scale == pytest.approx(list(range(1, n_states + 1)), rel=1e-4)

    from cryobench_lab.provenance import ground_truth_pairing

    pairing = ground_truth_pairing(dm.info)
    assert pairing["volumes"] == {str(k): f"vol_{k}.mrc" for k in range(n_states)}
    assert pairing["folder"] == folder


@pytest.mark.parametrize("names, problem", [
    (["vol_1.mrc", "vol_01.mrc"], "zero padding"),
    (["closed.mrc", "open.mrc"], "pattern"),
    (["a_0.mrc", "b_1.mrc"], "pattern"),
    (["vol_0.mrc", "vol_2.mrc"], "missing"),
    (["run1_vol0.mrc", "run2_vol1.mrc"], "several numbers"),
])
def test_ambiguous_gt_volume_names_are_refused(tiny_dataset, tmp_path, names, problem):
    base = _state_volume(tiny_dataset)
    folder = _volumes(tmp_path / "vols", {name: (base, 3.0) for name in names})
    with pytest.raises(InputError, match=problem) as err:
        _setup(tiny_dataset, gt_volumes=folder)
    assert "vols" in str(err.value) and "\n" not in str(err.value)


def test_one_based_gt_volume_names_pair_in_order(tiny_dataset, tmp_path):
    v0, v1 = _state_volume(tiny_dataset, 0), _state_volume(tiny_dataset, 1)
    folder = _volumes(tmp_path / "vols", {"vol_2.mrc": (v1, 3.0), "vol_1.mrc": (v0, 3.0)})
    dm = _setup(tiny_dataset, gt_volumes=folder)
    assert _corr(dm.info.gt_volumes[0], v0) > 0.9999 and _corr(dm.info.gt_volumes[1], v1) > 0.9999


# ---------------------------------------------------------------------------------------------------------
# Item 3: box and voxel size of the ground truth checked against the particles (32 px at 3 Å)


def _bad_grids(base):
    padded = np.zeros((48, 48, 48), np.float32)
    padded[8:40, 8:40, 8:40] = base
    return {
        "64 px at the particles' 3 Å": (np.pad(base, 16), 3.0),
        "zero-padded into 48 px at 3 Å": (padded, 3.0),
        "cropped to 24 px at 3 Å": (np.ascontiguousarray(base[4:28, 4:28, 4:28]), 3.0),
        "32 px at 1.5 Å": (base, 1.5),
        "64 px, no voxel size in the header": (_fourier_pad(base, 64), 0.0),
    }


@pytest.mark.parametrize("case", list(_bad_grids(np.zeros((32, 32, 32), np.float32))))
def test_gt_volume_on_another_grid_is_refused(tiny_dataset, tmp_path, case):
    vol, apix = _bad_grids(_state_volume(tiny_dataset))[case]
    folder = _volumes(tmp_path / "vols", {"state_000.mrc": (vol, apix), "state_001.mrc": (vol, apix)})
    with pytest.raises(InputError, match=r"state_00[01]\.mrc.*particles") as err:
        _setup(tiny_dataset, gt_volumes=folder)
    assert "\n" not in str(err.value)


def test_gt_volume_at_same_field_of_view_is_resampled(tiny_dataset, tmp_path):
    v0, v1 = _state_volume(tiny_dataset, 0), _state_volume(tiny_dataset, 1)
    fine = {"state_000.mrc": (_fourier_pad(v0, 64), 1.5), "state_001.mrc": (_fourier_pad(v1, 64), 1.5)}
    dm = _setup(tiny_dataset, gt_volumes=_volumes(tmp_path / "vols", fine))
    assert dm.info.gt_volumes.shape == (2, 32, 32, 32)
    assert _corr(dm.info.gt_volumes[0], v0) > 0.9999 and _corr(dm.info.gt_volumes[1], v1) > 0.9999


def test_gt_volume_coarser_than_training_box_is_refused(tiny_dataset, tmp_path):
    """Same field of view at 16 px / 6 Å: right scale, but it cannot be scored at the 32-px training box."""
    coarse = _state_volume(tiny_dataset)[::2, ::2, ::2]
    folder = _volumes(tmp_path / "vols", {"state_000.mrc": (coarse, 6.0), "state_001.mrc": (coarse, 6.0)})
    with pytest.raises(InputError, match=r"state_000\.mrc.*data\.box_size"):
        _setup(tiny_dataset, gt_volumes=folder)
    assert _setup(tiny_dataset, gt_volumes=folder, box_size=16).info.gt_volumes.shape == (2, 16, 16, 16)


def test_gt_volume_without_voxel_size_on_the_particle_box_warns(tiny_dataset, tmp_path, caplog):
    v0, v1 = _state_volume(tiny_dataset, 0), _state_volume(tiny_dataset, 1)
    folder = _volumes(tmp_path / "vols", {"state_000.mrc": (v0, 0.0), "state_001.mrc": (v1, 0.0)})
    with caplog.at_level(logging.WARNING, logger="cryobench_lab"):
        dm = _setup(tiny_dataset, gt_volumes=folder)
    assert _corr(dm.info.gt_volumes[0], v0) > 0.9999
    lines = [r.getMessage() for r in caplog.records if "voxel size" in r.getMessage()]
    assert len(lines) == 1 and "state_000.mrc" in lines[0] and "\n" not in lines[0]


# ---------------------------------------------------------------------------------------------------------
# Item 4: particles without any CTF need data.ctf=none


def _no_ctf_star(tiny, tmp_path):
    return _star_variant(tiny, tmp_path / "noctf.star", lambda df: df.drop(columns=list(CTF_COLUMNS)))


def _no_ctf_cs(tiny, tmp_path):
    """A cryoSPARC file with blob fields and poses but no ctf/* fields."""
    from cryobench_lab.io.particles import load_particles
    from cryobench_lab.physics.rotations import matrix_to_axis_angle

    meta = load_particles(tiny / "particles.star")
    n = meta.n
    cs = np.zeros(n, dtype=[("blob/path", "S64"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                            ("blob/psize_A", "<f4"), ("alignments3D/pose", "<f4", (3,)),
                            ("alignments3D/shift", "<f4", (2,))])
    cs["blob/path"] = b"particles.mrcs"
    cs["blob/idx"] = np.arange(n)
    cs["blob/shape"] = 32
    cs["blob/psize_A"] = 3.0
    cs["alignments3D/pose"] = matrix_to_axis_angle(torch.from_numpy(meta.rot).transpose(-1, -2)).numpy()
    cs["alignments3D/shift"] = meta.trans_px
    path = tmp_path / "noctf.cs"
    with open(path, "wb") as fh:
        np.save(fh, cs)
    return str(path)


@pytest.mark.parametrize("writer", [_no_ctf_star, _no_ctf_cs])
def test_particles_without_ctf_are_refused(tiny_dataset, tmp_path, writer):
    particles = writer(tiny_dataset, tmp_path)
    with pytest.raises(InputError, match=r"noctf\.(star|cs).*data\.ctf=none") as err:
        _setup(tiny_dataset, particles=particles)
    assert "\n" not in str(err.value)
    dm = _setup(tiny_dataset, particles=particles, ctf="none")
    assert dm.dataset.ctf is None and "ctf" not in dm.dataset[[0, 1]]


def test_ctf_none_drops_the_files_ctf(tiny_dataset):
    dm = _setup(tiny_dataset, ctf="none")
    assert dm.dataset.ctf is None and "ctf" not in dm.dataset[[0, 1]]

    from cryobench_lab.provenance import fingerprints

    assert fingerprints(dm)["dataset"] != fingerprints(_setup(tiny_dataset))["dataset"]


# ---------------------------------------------------------------------------------------------------------
# Item 6: ground truth that looks wrong is named in one logged warning line


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("cryobench_lab")]


def test_correct_data_raises_no_warning(tiny_dataset, caplog):
    with caplog.at_level(logging.WARNING, logger="cryobench_lab"):
        _setup(tiny_dataset)
    assert _warnings(caplog) == []


def test_defocus_in_micrometres_warns(tiny_dataset, tmp_path, caplog):
    def to_um(df):
        for col in ("rlnDefocusU", "rlnDefocusV"):
            df[col] = df[col] / 1e4
        return df

    particles = _star_variant(tiny_dataset, tmp_path / "um.star", to_um)
    with caplog.at_level(logging.WARNING, logger="cryobench_lab"):
        _setup(tiny_dataset, particles=particles)
    lines = _warnings(caplog)
    assert len(lines) == 1 and "defocus" in lines[0] and "µm" in lines[0] and "um.star" in lines[0]
    assert "\n" not in lines[0]


def _pose_variant(tiny, out, change) -> str:
    from cryobench_lab.io.particles import load_particles
    from cryobench_lab.io.star import write_particle_star

    meta = load_particles(tiny / "particles.star")
    rot = change(meta.rot)
    names = [f"{i + 1}@particles.mrcs" for i in range(meta.n)]
    write_particle_star(out, names, rot, meta.trans_px, meta.ctf, apix=meta.apix, D=meta.D)
    return str(out)


@pytest.mark.parametrize("change", {
    "transposed": lambda rot: np.ascontiguousarray(np.swapaxes(rot, 1, 2)),
    "shuffled": lambda rot: rot[np.random.default_rng(0).permutation(len(rot))],
}.values(), ids=["transposed", "shuffled"])
def test_wrong_poses_warn(tiny_dataset, tmp_path, caplog, change):
    particles = _pose_variant(tiny_dataset, tmp_path / "poses.star", change)
    with caplog.at_level(logging.WARNING, logger="cryobench_lab"):
        _setup(tiny_dataset, particles=particles)
    lines = _warnings(caplog)
    assert len(lines) == 1 and "poses" in lines[0] and "poses.star" in lines[0] and "\n" not in lines[0]


def test_rewritten_correct_poses_raise_no_warning(tiny_dataset, tmp_path, caplog):
    particles = _pose_variant(tiny_dataset, tmp_path / "same.star", lambda rot: rot)
    with caplog.at_level(logging.WARNING, logger="cryobench_lab"):
        _setup(tiny_dataset, particles=particles)
    assert _warnings(caplog) == []


# ---------------------------------------------------------------------------------------------------------
# The entry point: one line, non-zero exit, no run folder


def _run(args, tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", CRYOBENCH_LAB_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "cryobench_lab", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("case", ["gt_grid", "no_ctf"])
def test_entry_point_refuses_before_training(tiny_dataset, tmp_path, case):
    args = ["model=backproject", "data=custom", f"data.particles={tiny_dataset / 'particles.star'}",
            f"data.labels={tiny_dataset / 'labels.npy'}", f"data.gt_volumes={tiny_dataset / 'gt_volumes'}",
            "logger=csv", "trainer.enable_progress_bar=false"]
    if case == "gt_grid":
        vol = _fourier_pad(_state_volume(tiny_dataset), 64)
        folder = _volumes(tmp_path / "vols", {"state_000.mrc": (vol, 3.0), "state_001.mrc": (vol, 3.0)})
        args.append(f"data.gt_volumes={folder}")
        expected = "state_000.mrc"
    else:
        args += [f"data.particles={_no_ctf_star(tiny_dataset, tmp_path)}", f"data.datadir={tiny_dataset}"]
        expected = "data.ctf=none"
    out = tmp_path / "run"
    proc = _run([*args, f"hydra.run.dir={out}"], tmp_path)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert expected in lines[0]
    assert not out.exists()
