"""io.structures: every real model opens with the residue counts SOURCES.md gives; round trips; bad files."""

import gzip

import numpy as np
import pytest

from cryobench_lab.errors import InputError
from cryobench_lab.io.structures import read_models, read_structure, write_structure
from shared_data import SHARED, needs_shared

STRUCT = SHARED / "structures"
TRAJ = SHARED / "trajectories"

# (file, polymer residues with CA/C1', of which nucleotides, heavy atoms kept, chains) — residue counts from
# SOURCES.md. Heavy atoms: first altloc only; pdb1ake lists 1661 atoms because ARG 167's side chain appears
# twice without altloc labels, gemmi keeps one copy (1656, the same as the all-atom AdK files minus H).
STRUCTURES = [
    ("adk/4akeA_alg_fixed.pdb", 214, 0, 1656, {"A"}),
    ("adk/adk_closed.pdb", 214, 0, 1656, {""}),
    ("adk/adk_open.pdb", 214, 0, 1656, {""}),
    ("adk/mmcif_1ake_chimerax.cif", 428, 0, 3312, {"A", "B"}),  # 2 x 214 aa; AP5 and waters dropped
    ("adk/pdb1ake.pdb", 214, 0, 1656, {"A"}),
    ("mmcif_7cth.cif", 2157, 0, 16591, {"A", "B", "C", "D", "E", "F", "H", "I", "L", "M"}),
    ("pdb3hsy.pdb", 730, 0, 5785, {"A", "B"}),  # chain C holds only non-polymer residues
    ("pdb4v8r_hex.pdb.gz", 16716, 0, 127756, None),
    ("pdb7pbl.pdb", 1948, 30, 15702, {"A", "B", "C", "D", "E", "F", "G", "U", "V"}),  # 1918 aa + 2 x 15 nt
]


@needs_shared
@pytest.mark.parametrize("name,n_res,n_nt,n_atoms,chains", STRUCTURES)
def test_real_structures(name, n_res, n_nt, n_atoms, chains):
    s = read_structure(STRUCT / name)
    assert s.n_residues == n_res and int(s.residue_is_nucleotide.sum()) == n_nt
    assert s.n_atoms == n_atoms
    assert s.atom_coords.shape == (n_atoms, 3) and s.atom_coords.dtype == np.float32
    assert s.residue_coords.shape == (n_res, 3)
    if chains is not None:
        assert set(s.atom_chain_ids) == chains
    else:
        assert len(set(s.atom_chain_ids)) == 32
    assert "H" not in set(s.atom_elements)
    assert set(s.atom_elements) <= {"C", "N", "O", "S", "P", "Se"}
    # representative atoms: CA of amino acids, C1' of nucleotides
    rep_names = s.atom_names[s.residue_atom_index]
    assert set(rep_names[~s.residue_is_nucleotide]) <= {"CA"}
    assert set(rep_names[s.residue_is_nucleotide]) <= {"C1'"}
    np.testing.assert_array_equal(s.residue_coords, s.atom_coords[s.residue_atom_index])
    assert (s.atom_residue_index[s.residue_atom_index] == np.arange(n_res)).all()
    # electron counts: sum of heavy-atom atomic numbers per residue, totals agree with the atoms
    assert s.residue_electrons.sum() == s.atom_numbers[s.atom_residue_index >= 0].sum()


@needs_shared
def test_7pbl_dna_chains_are_nucleotides():
    s = read_structure(STRUCT / "pdb7pbl.pdb")
    nt_chains = s.residue_chain_ids[s.residue_is_nucleotide]
    assert sorted(set(nt_chains)) == ["U", "V"]
    assert (nt_chains == "U").sum() == 15 and (nt_chains == "V").sum() == 15


@needs_shared
def test_electron_counts_closed_form():
    s = read_structure(STRUCT / "adk/pdb1ake.pdb")
    z = {"C": 6, "N": 7, "O": 8, "S": 16}
    expected = {"GLY": 2 * z["C"] + z["N"] + z["O"],  # N CA C O
                "ALA": 3 * z["C"] + z["N"] + z["O"],
                "MET": 5 * z["C"] + z["N"] + z["O"] + z["S"]}
    for name, electrons in expected.items():
        # interior residues (no OXT)
        values = s.residue_electrons[(s.residue_names == name) & (s.residue_numbers < 214)]
        assert len(values) and (values == electrons).all(), name


@needs_shared
def test_elements_fixed_for_files_without_element_column():
    # adk_closed.pdb has no element column: gemmi alone would read 'CA' as calcium and 'HG1' as mercury
    closed = read_structure(STRUCT / "adk/adk_closed.pdb")
    ref = read_structure(STRUCT / "adk/pdb1ake.pdb")
    np.testing.assert_array_equal(closed.residue_electrons, ref.residue_electrons)
    with_h = read_structure(STRUCT / "adk/adk_closed.pdb", keep_hydrogens=True)
    assert with_h.n_atoms == 3341 and set(with_h.atom_elements) == {"C", "N", "O", "S", "H"}
    np.testing.assert_array_equal(with_h.residue_electrons, ref.residue_electrons)  # H never counts


@needs_shared
def test_keep_waters_and_ligands():
    base = read_structure(STRUCT / "adk/mmcif_1ake_chimerax.cif")
    waters = read_structure(STRUCT / "adk/mmcif_1ake_chimerax.cif", keep_waters=True)
    ligands = read_structure(STRUCT / "adk/mmcif_1ake_chimerax.cif", keep_ligands=True)
    assert waters.n_atoms > base.n_atoms and "HOH" in set(waters.atom_residue_names)
    assert "AP5" in set(ligands.atom_residue_names) and "AP5" not in set(base.atom_residue_names)
    # the residue view stays the polymer residues
    assert waters.n_residues == ligands.n_residues == base.n_residues == 428
    assert (ligands.atom_residue_index[ligands.atom_residue_names == "AP5"] == -1).all()


def _kabsch_rmsd(a, b):
    a = a - a.mean(0)
    b = b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    R = u @ np.diag([1, 1, d]) @ vt
    return float(np.sqrt(((a @ R - b) ** 2).sum(1).mean()))


@needs_shared
def test_trajectory_models():
    models = read_models(TRAJ / "adk_dims_CA_98models.pdb")
    assert len(models) == 98 and all(m.shape == (214, 3) for m in models)
    closed = read_structure(STRUCT / "adk/adk_closed.pdb").residue_coords.astype(np.float64)
    opened = read_structure(STRUCT / "adk/adk_open.pdb").residue_coords.astype(np.float64)
    # SOURCES.md: CA RMSD to closed 0.46 -> 6.92 Å, to open 6.81 -> 0.50 Å (first -> last frame)
    assert _kabsch_rmsd(models[0], closed) == pytest.approx(0.46, abs=0.02)
    assert _kabsch_rmsd(models[-1], closed) == pytest.approx(6.92, abs=0.02)
    assert _kabsch_rmsd(models[0], opened) == pytest.approx(6.81, abs=0.02)
    assert _kabsch_rmsd(models[-1], opened) == pytest.approx(0.50, abs=0.02)
    one = read_structure(TRAJ / "adk_dims_CA_98models.pdb", model=97)
    np.testing.assert_array_equal(one.residue_coords, models[-1])
    assert read_models(TRAJ / "adk_dims_CA_98models.pdb", level="atom")[5].shape == (214, 3)
    with pytest.raises(InputError, match=r"98 model.*model 98"):
        read_structure(TRAJ / "adk_dims_CA_98models.pdb", model=98)


@needs_shared
@pytest.mark.parametrize("suffix", [".pdb", ".cif"])
def test_write_moved_structure_round_trip(tmp_path, suffix):
    s = read_structure(STRUCT / "pdb7pbl.pdb")
    a = np.deg2rad(30)
    R = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    moved = s.atom_coords.astype(np.float64) @ R.T + np.array([1.0, -2.0, 3.0])
    write_structure(tmp_path / f"moved{suffix}", s, moved)
    back = read_structure(tmp_path / f"moved{suffix}")
    assert back.n_atoms == s.n_atoms and back.n_residues == s.n_residues
    np.testing.assert_allclose(back.atom_coords, moved, atol=1e-3)  # files keep 3 decimals
    np.testing.assert_array_equal(back.atom_names, s.atom_names)
    np.testing.assert_array_equal(back.residue_electrons, s.residue_electrons)
    np.testing.assert_array_equal(back.residue_is_nucleotide, s.residue_is_nucleotide)
    # residue-level coordinates write a CA/C1' trace
    trace = s.residue_coords + 5.0
    write_structure(tmp_path / f"trace{suffix}", s, trace)
    t = read_structure(tmp_path / f"trace{suffix}")
    assert t.n_atoms == t.n_residues == s.n_residues
    np.testing.assert_allclose(t.residue_coords, trace, atol=1e-3)
    with pytest.raises(ValueError, match="coords must be"):
        write_structure(tmp_path / "bad.pdb", s, np.zeros((7, 3)))


def test_bad_structure_files(tmp_path):
    with pytest.raises(InputError, match="absent.pdb"):
        read_structure(tmp_path / "absent.pdb")
    empty = tmp_path / "empty.pdb"
    empty.write_text("")
    with pytest.raises(InputError, match=r"empty.pdb.*no atoms"):
        read_structure(empty)
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("this is not mmCIF\n")
    with pytest.raises(InputError, match="garbage.cif"):
        read_structure(garbage)
    water_only = tmp_path / "water.pdb"
    water_only.write_text("HETATM    1  O   HOH A   1       0.000   0.000   0.000  1.00  0.00           O\nEND\n")
    with pytest.raises(InputError, match=r"water.pdb.*no atoms left"):
        read_structure(water_only)
    gz = tmp_path / "broken.pdb.gz"
    gz.write_bytes(gzip.compress(b"")[:5])
    with pytest.raises(InputError, match="broken.pdb.gz"):
        read_structure(gz)
