"""Every real file in the shared data that io/ can read is listed here, read with the project's reader and
compared with what ``SOURCES.md`` (written with other tools: mrcfile, starfile, gemmi, numpy) states about
it: shapes, dtypes, header voxel sizes, means and standard deviations, STAR block shapes, row counts, pixel
sizes, chains and residues. A file added to the shared data without being listed fails
``test_manifest_covers_every_file``."""

import re

import numpy as np
import pytest

from cryobench_lab.io.cryosparc import read_cs
from cryobench_lab.io.mrc import read_mrc
from cryobench_lab.io.pickles import load_pickle
from cryobench_lab.io.star import read_star, read_star_blocks, star_apix, star_box_size
from cryobench_lab.io.structures import read_models, read_structure
from shared_data import SHARED, needs_shared


# file (relative to shared/data) -> reader
MANIFEST = {
    "cryoem/maps/1ake.mrc": "mrc",
    "cryoem/maps/EMD-3197.map": "mrc",
    "cryoem/maps/clean70SRibosome_vol_65p.mrc": "mrc",
    "cryoem/synthetic_toy/toymodel_small_nocenter.mrc": "mrc",
    "cryoem/synthetic_hand/hand-vol.mrc": "mrc",
    "cryoem/real_particles/aspire_empiar10017/sample.mrcs": "mrc",
    "cryoem/real_particles/empiar10076/empiar_10076_7.mrc": "mrc",
    "cryoem/real_particles/relion31/relion31.mrcs": "mrc",
    "cryoem/real_tomo_sta/ay19102021_L3_position6_ribo_it09_bin8_1.82A.mrcs": "mrc",
    "cryoem/synthetic_hand/hand.mrcs": "mrc",
    "cryoem/synthetic_toy/toy_projections.mrcs": "mrc",
    "cryoem/real_particles/aspire_empiar10017/sample_relion_data.star": "star",
    "cryoem/real_particles/empiar10076/empiar_10076_7.star": "star",
    "cryoem/real_particles/metadata_only/FinalRefinement-OriginalParticles-PfCRT.star": "star",
    "cryoem/real_particles/metadata_only/relion31.6opticsgroups.star": "star",
    "cryoem/real_particles/relion31/relion31.star": "star",
    "cryoem/real_particles/relion31/relion31.v2.star": "star",
    "cryoem/real_tomo_sta/sta_testing_bin8.star": "star",
    "cryoem/synthetic_toy/toy_projections.star": "star",
    "cryoem/star_examples/relion5.star": "star",
    "cryoem/star_examples/one_loop.star": "star",
    "cryoem/star_examples/default_pipeline.star": "star",
    "cryoem/star_examples/postprocess.star": "star",
    "cryoem/star_examples/rln3.1_data_style.star": "star",
    "cryoem/star_examples/run_it025_optimiser_2D.star": "star",
    "cryoem/star_examples/run_it025_optimiser_3D.star": "star",
    "cryoem/star_examples/run_it025_sampling_2D.star": "star",
    "cryoem/star_examples/run_it025_sampling_3D.star": "star",
    "cryoem/real_particles/cryosparc/cryosparc_P12_J24_001_particles.cs": "cs",
    "cryoem/real_particles/empiar10076/empiar_10076_7.cs": "cs",
    "cryoem/real_particles/cryosparc/ctf2.pkl": "pkl",
    "cryoem/real_particles/cryosparc/pose.cs.pkl": "pkl",
    "cryoem/real_particles/metadata_only/ctf1.pkl": "pkl",
    "cryoem/real_particles/metadata_only/pose.star.pkl": "pkl",
    "cryoem/real_tomo_sta/ind_39_sta_testing_bin8.pkl": "pkl",
    "cryoem/real_tomo_sta/sta_ctf.pkl": "pkl",
    "cryoem/real_tomo_sta/sta_pose.pkl": "pkl",
    "cryoem/synthetic_hand/hand_rot.pkl": "pkl",
    "cryoem/synthetic_hand/hand_rot_trans.pkl": "pkl",
    "cryoem/synthetic_toy/test_ctf.pkl": "pkl",
    "cryoem/synthetic_toy/toy_angles.pkl": "pkl",
    "cryoem/synthetic_toy/toy_rot_trans.pkl": "pkl",
    "structures/adk/4akeA_alg_fixed.pdb": "structure",
    "structures/adk/adk_closed.pdb": "structure",
    "structures/adk/adk_open.pdb": "structure",
    "structures/adk/mmcif_1ake_chimerax.cif": "structure",
    "structures/adk/pdb1ake.pdb": "structure",
    "structures/mmcif_7cth.cif": "structure",
    "structures/pdb3hsy.pdb": "structure",
    "structures/pdb4v8r_hex.pdb.gz": "structure",
    "structures/pdb7pbl.pdb": "structure",
    "trajectories/adk_dims_CA_98models.pdb": "structure",
}

# Files io/ does not read: CHARMM topology and binary trajectory (the CA PDB above is their readable copy).
NOT_IO = {"trajectories/adk.psf", "trajectories/adk_dims.dcd"}
SUFFIXES = (".mrc", ".mrcs", ".map", ".star", ".cs", ".pkl", ".pdb", ".cif", ".gz")


@needs_shared
def test_manifest_covers_every_file():
    found = {str(p.relative_to(SHARED)) for p in SHARED.rglob("*") if p.is_file() and p.name != "SOURCES.md"}
    assert found - NOT_IO == set(MANIFEST), "add new shared files to MANIFEST with a test that checks them"
    assert all(name.endswith(SUFFIXES) for name in MANIFEST)


def _sources() -> dict:
    """``SOURCES.md`` rows: path relative to shared/data → (content column, verified column)."""
    rows, folder = {}, ""
    for line in (SHARED / "SOURCES.md").read_text().splitlines():
        if line.startswith("## "):
            folder = line[3:].split(" (")[0].strip()  # "## trajectories/ (derived)"
        elif line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[folder + cells[0].strip("`")] = (cells[6], cells[7])
    return rows


def _stated(text: str) -> tuple[float, float]:
    """A number as SOURCES.md prints it → (value, half a unit of its last printed digit)."""
    mantissa, _, exponent = text.partition("e")
    decimals = len(mantissa.partition(".")[2])
    return float(text), 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def _shape(text: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", text))


# Facts of the content column (pixel sizes, boxes, voltages, Cs, row counts) for particle metadata.
# star file -> (rows, Å/px, box or None where the file does not state it, kV, Cs mm)
STAR_FACTS = {
    "cryoem/real_particles/relion31/relion31.star": (5, 2.806, 256, 300.0, 0.01),
    "cryoem/real_particles/relion31/relion31.v2.star": (5, 2.806, 256, 300.0, 0.01),
    "cryoem/real_particles/metadata_only/relion31.6opticsgroups.star": (139, 1.25, 196, 200.0, None),
    "cryoem/real_particles/metadata_only/FinalRefinement-OriginalParticles-PfCRT.star": (5, 1.035, None, None, None),
    # 5 µm detector pixel / magnification: 5e4 / 38168 and 5e4 / 37369 Å
    "cryoem/real_particles/empiar10076/empiar_10076_7.star": (7, 5e4 / 38168, None, 300.0, 2.7),
    "cryoem/real_particles/aspire_empiar10017/sample_relion_data.star": (17, 5e4 / 37369, None, 300.0, None),
    "cryoem/star_examples/relion5.star": (17, 0.89, 448, 100.0, None),
    "cryoem/real_tomo_sta/sta_testing_bin8.star": (219, None, None, 300.0, 2.7),
    "cryoem/synthetic_toy/toy_projections.star": (1000, None, None, None, None),
}
# .cs -> (rows, box, Å/px, kV, Cs mm); box of empiar_10076_7 from its images (320 px)
CS_FACTS = {
    "cryoem/real_particles/cryosparc/cryosparc_P12_J24_001_particles.cs": (2019, 180, 2.95, 200.0, 2.0),
    "cryoem/real_particles/empiar10076/empiar_10076_7.cs": (7, 320, 1.31, 300.0, 2.7),
}
# CTF pickle -> (box D, Å/px) of its first two columns
CTF_FACTS = {
    "cryoem/synthetic_toy/test_ctf.pkl": (30, 1.0),
    "cryoem/real_particles/metadata_only/ctf1.pkl": (300, 1.035),
    "cryoem/real_tomo_sta/sta_ctf.pkl": (512, 1.82),
}
# structure -> (chains, polymer residues in the residue view, atoms with H/waters/ligands kept or None, models).
# Atoms are compared where the file has no alternative conformations (the reader keeps the first only).
STRUCTURE_FACTS = {
    "structures/adk/4akeA_alg_fixed.pdb": (1, 214, 3341, 1),
    "structures/adk/adk_closed.pdb": (1, 214, 3341, 1),
    "structures/adk/adk_open.pdb": (1, 214, 3341, 1),
    "structures/adk/mmcif_1ake_chimerax.cif": (2, 2 * 214, None, 1),
    "structures/adk/pdb1ake.pdb": (1, 214, None, 1),
    "structures/mmcif_7cth.cif": (10, 2157, None, 1),
    "structures/pdb3hsy.pdb": (3, 730, None, 1),
    "structures/pdb4v8r_hex.pdb.gz": (32, 16716, 128780, 1),
    "structures/pdb7pbl.pdb": (9, None, 31396, 1),  # "~313 aa" per RuvB chain: exact counts for G, U, V below
    "trajectories/adk_dims_CA_98models.pdb": (1, 214, 214, 98),
}


@needs_shared
def test_every_listed_file_has_a_sources_entry_with_what_it_was_verified_to_hold():
    rows = _sources()
    assert set(MANIFEST) <= set(rows), sorted(set(MANIFEST) - set(rows))
    assert set(STAR_FACTS) | set(CS_FACTS) | set(CTF_FACTS) | set(STRUCTURE_FACTS) <= set(MANIFEST)


@needs_shared
@pytest.mark.parametrize("name", sorted(n for n, r in MANIFEST.items() if r == "mrc"))
def test_maps_and_stacks_match_sources(name):
    verified = _sources()[name][1]  # "mrcfile OK: shape=(…) dtype=float32 voxel=(x, y, z) mean=… std=…"
    data, apix = read_mrc(SHARED / name)
    assert data.shape == _shape(re.search(r"shape=\(([^)]*)\)", verified).group(1))
    assert data.dtype == np.dtype(re.search(r"dtype=(\w+)", verified).group(1))
    voxel = float(re.search(r"voxel=\(([^,]*),", verified).group(1))
    assert apix == pytest.approx(voxel, rel=1e-5)  # the header's own value, 0.0 where unset
    for stat, value in (("mean", data.mean(dtype=np.float64)), ("std", data.std(dtype=np.float64))):
        stated, half_digit = _stated(re.search(rf"{stat}=(\S+)", verified).group(1))
        assert abs(value - stated) <= half_digit, (stat, value, stated)


@needs_shared
@pytest.mark.parametrize("name", sorted(n for n, r in MANIFEST.items() if r == "star"))
def test_star_blocks_match_sources(name):
    verified = _sources()[name][1]  # "starfile OK: optics:(1, 9), particles:(5, 26)" or "<unnamed>:(…)"
    stated = dict(re.findall(r"([\w<>]+):(\([^)]*\)|dict)", verified.partition(":")[2]))
    blocks = read_star_blocks(SHARED / name)
    got = {k or "<unnamed>": ("dict" if isinstance(v, dict) else v.shape) for k, v in blocks.items()}
    assert list(got) == list(stated)  # block order too (relion31.v2 has particles first)
    for block, shape in stated.items():
        assert got[block] == (shape if shape == "dict" else _shape(shape)), block
    if name in STAR_FACTS:
        rows, apix, box, kv, cs = STAR_FACTS[name]
        df = read_star(SHARED / name)
        assert len(df) == rows
        if apix is not None:
            assert star_apix(df) == pytest.approx(apix, rel=1e-3)
        if box is not None:
            assert star_box_size(df) == box
        if kv is not None:
            assert set(df["rlnVoltage"].astype(float)) == {kv}
        if cs is not None:
            assert set(df["rlnSphericalAberration"].astype(float)) == {cs}


@needs_shared
@pytest.mark.parametrize("name", sorted(n for n, r in MANIFEST.items() if r == "cs"))
def test_cryosparc_files_match_sources(name):
    rows, box, apix, kv, cs_mm = CS_FACTS[name]
    assert _shape(re.search(r"structured \((\d+),\)", _sources()[name][1]).group(1)) == (rows,)
    cs = read_cs(SHARED / name)
    assert cs["n"] == rows and cs["D"] == box and cs["apix"] == pytest.approx(apix, rel=1e-3)
    assert len(cs["paths"]) == rows and cs["indices"].shape == (rows,)
    assert cs["ctf"].shape == (rows, 9)
    np.testing.assert_allclose(cs["ctf"][:, [0, 1, 5, 6]], np.tile([box, apix, kv, cs_mm], (rows, 1)), rtol=1e-3)


@needs_shared
@pytest.mark.parametrize("name", sorted(n for n, r in MANIFEST.items() if r == "pkl"))
def test_pickles_match_sources(name):
    verified = _sources()[name][1]  # "safe-unpickle OK: ndarray(5, 9) float32" or "tuple[ndarray(…) …, …]"
    stated = re.findall(r"ndarray\(([^)]*)\) (\w+)", verified)
    obj = load_pickle(SHARED / name)
    arrays = obj if isinstance(obj, tuple) else (obj,)
    assert [(a.shape, a.dtype) for a in arrays] == [(_shape(s), np.dtype(t)) for s, t in stated]
    if name in CTF_FACTS:
        box, apix = CTF_FACTS[name]
        np.testing.assert_allclose(obj[:, :2], np.tile([box, apix], (len(obj), 1)), rtol=1e-4)
    if name == "cryoem/real_particles/cryosparc/ctf2.pkl":  # "dfU matches the .cs"
        cs = read_cs(SHARED / "cryoem/real_particles/cryosparc/cryosparc_P12_J24_001_particles.cs")
        np.testing.assert_allclose(obj[:, 2], cs["ctf"][:, 2], rtol=1e-6)
    if name.endswith("rot_trans.pkl") or name.endswith("pose.pkl") or name.endswith("pose.cs.pkl"):
        rot = arrays[0].astype(np.float64)  # rotations: orthonormal, determinant +1
        np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-4)
        np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-4)


@needs_shared
@pytest.mark.parametrize("name", sorted(n for n, r in MANIFEST.items() if r == "structure"))
def test_structures_match_sources(name):
    chains, residues, atoms, models = STRUCTURE_FACTS[name]
    verified = _sources()[name][1]  # "gemmi OK: models=1 chains=1 residues=214 atoms/model=3341"
    assert int(re.search(r"models=(\d+)", verified).group(1)) == models
    if atoms is not None:
        assert int(re.search(r"atoms/model=(\d+)", verified).group(1)) == atoms
    s = read_structure(SHARED / name, keep_hydrogens=True, keep_waters=True, keep_ligands=True)
    assert len(set(s.atom_chain_ids)) == chains == int(re.search(r"chains=(\d+)", verified).group(1))
    if residues is not None:
        assert s.n_residues == residues
    if name == "structures/pdb7pbl.pdb":  # RuvA fragment G 48 aa, DNA strands U, V 15 nt each
        counts = {c: int((s.residue_chain_ids == c).sum()) for c in "GUV"}
        assert counts == {"G": 48, "U": 15, "V": 15}
        assert s.residue_is_nucleotide[s.residue_chain_ids == "U"].all()
    if atoms is not None:
        assert s.n_atoms == atoms
    if models > 1:
        frames = read_models(SHARED / name)
        assert len(frames) == models and all(f.shape == (residues, 3) for f in frames)
