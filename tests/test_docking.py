"""Rigid docking of an atomic model into a map (metrics.alignment.fit_atoms, python -m cryobench_lab.dock)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cryobench_lab
from cryobench_lab.io.mrc import write_mrc
from cryobench_lab.io.structures import read_structure
from cryobench_lab.metrics.alignment import fit_atoms
from cryobench_lab.physics.gaussians import atom_amplitudes, band_limited_sigma, voxelize_gaussians
from cryobench_lab.physics.rotations import geodesic_distance, random_rotations

PDB_1AKE = Path(cryobench_lab.__file__).parent / "structures" / "adk" / "pdb1ake.pdb.gz"
D, APIX = 32, 3.0


def _own_map(coords: np.ndarray, numbers: np.ndarray) -> torch.Tensor:
    s = band_limited_sigma(APIX)
    return voxelize_gaussians(torch.from_numpy(coords).float(), torch.full((len(coords),), s),
                              atom_amplitudes(torch.from_numpy(numbers).float(), s), D, APIX)


def _rmsd(a, b) -> float:
    return float(np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).sum(1).mean()))


def test_fit_atoms_undoes_a_known_rigid_transform():
    st = read_structure(PDB_1AKE)
    x = st.atom_coords.astype(np.float64)
    x = x - x.mean(0) + np.array([3.0, -2.0, 4.0])  # off the box centre, so centring alone is not the answer
    density = _own_map(x, st.atom_numbers)
    Q = random_rotations(1, torch.Generator().manual_seed(3), dtype=torch.float64)[0].numpy()
    moved = x @ Q.T + np.array([5.0, 7.0, -4.0])
    fit = fit_atoms(torch.from_numpy(moved), torch.from_numpy(st.atom_numbers).double(), density, APIX)
    docked = moved @ fit["rotation"].double().numpy().T + fit["translation"].double().numpy()
    assert _rmsd(moved, x) > 10.0
    assert _rmsd(docked, x) < 0.5  # Å; AdK is ~45 Å across, so also < ~0.7° of rotation
    assert float(geodesic_distance(fit["rotation"].double(), torch.from_numpy(Q.T))) < 1.0  # degrees
    assert fit["score"] > 0.95


def test_dock_cli_writes_the_docked_model_in_the_file_frame(tmp_path):
    from cryobench_lab.dock import main

    st = read_structure(PDB_1AKE)
    centre = np.array([10.0, 20.0, 30.0])  # the map's centre voxel in the file's frame
    x = st.atom_coords.astype(np.float64)
    target = x - x.mean(0) + centre + np.array([2.0, 0.0, -3.0])
    write_mrc(tmp_path / "map.mrc", _own_map(target - centre, st.atom_numbers).numpy(), apix=APIX)
    main(["--model", str(PDB_1AKE), "--map", str(tmp_path / "map.mrc"), "--center", *map(str, centre),
          "--out", str(tmp_path / "docked.pdb")])
    docked = read_structure(tmp_path / "docked.pdb")
    assert docked.n_atoms == st.n_atoms
    assert _rmsd(docked.atom_coords, target) < 0.5


def test_dock_cli_help_and_one_line_errors(tmp_path, capsys):
    from cryobench_lab.dock import main

    assert subprocess.run([sys.executable, "-m", "cryobench_lab.dock", "--help"], capture_output=True).returncode == 0
    write_mrc(tmp_path / "flat.mrc", np.zeros((4, 8, 8), np.float32), apix=APIX)
    for bad in (["--map", str(tmp_path / "missing.mrc")], ["--map", str(tmp_path / "flat.mrc")]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(PDB_1AKE), *bad, "--out", str(tmp_path / "o.pdb")])
        assert exit_info.value.code != 0
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
        assert Path(bad[1]).name in err or "shape" in err
    assert not (tmp_path / "o.pdb").exists()
