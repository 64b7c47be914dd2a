"""The particle simulator and its presets, checked against the physics core and real files.

Everything runs at D=32 with a few dozen particles; the bundled structures (inside the package) are used,
and the DCD reader is additionally checked against the shared CA-only trajectory when it is present.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryobench_lab.data import presets
from cryobench_lab.data import simulate as sim
from cryobench_lab.data.presets import STRUCTURES_DIR, build_preset, ensure_dataset, hinge_states, read_dcd
from cryobench_lab.data.simulate import (
    SNR_DEFINITION,
    auto_apix,
    frame_origins,
    read_states,
    simulate_dataset,
)
from cryobench_lab.errors import InputError
from cryobench_lab.io.pickles import load_ctf, load_poses
from cryobench_lab.io.star import ctf_from_star, poses_from_star, read_star
from cryobench_lab.io.structures import read_structure
from cryobench_lab.physics.ctf import ctf_image
from cryobench_lab.physics.fft import fft2_center, ifft2_center
from cryobench_lab.physics.gaussians import project_gaussians
from cryobench_lab.physics.slicing import project_volume
from shared_data import SHARED

D = 32
N_PER = 24


@pytest.fixture(scope="module")
def two_states():
    """Two distinct bundled complexes (compositional): 3HSY and closed AdK, each centred on itself."""
    return [
        read_states(STRUCTURES_DIR / "pdb3hsy.pdb.gz")[0],
        read_states(STRUCTURES_DIR / "adk" / "adk_closed.pdb.gz")[0],
    ]


@pytest.fixture(scope="module")
def datasets(two_states, tmp_path_factory):
    """The same recipe simulated with noise (SNR 0.5) and without (snr=None), same seed."""
    root = tmp_path_factory.mktemp("sim")
    kw = {"box_size": D, "n_particles_per_state": N_PER, "seed": 3, "progress": False}
    noisy = simulate_dataset(two_states, root / "noisy", snr=0.5, **kw)
    clean = simulate_dataset(two_states, root / "clean", snr=None, **kw)
    return noisy, clean


def _stack(folder: Path) -> np.ndarray:
    with mrcfile.open(folder / "particles.mrcs", permissive=True) as m:
        return np.array(m.data), float(m.voxel_size.x)


def _ctf_modulate(proj: torch.Tensor, ctf: np.ndarray, invert: bool) -> torch.Tensor:
    out = ifft2_center(fft2_center(proj) * ctf_image(torch.as_tensor(ctf), proj.shape[-1])).real
    return -out if invert else out


def _corr(a, b) -> np.ndarray:
    """Per-image Pearson correlation of ``(B, D, D)`` arrays."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def test_layout_and_meta(datasets, two_states):
    noisy, _ = datasets
    names = sorted(p.name for p in noisy.iterdir())
    assert names == sorted(
        [
            "particles.mrcs",
            "particles.star",
            "poses.pkl",
            "ctf.pkl",
            "labels.npy",
            "gt_volumes",
            "gt_structures",
            "meta.json",
        ]
    )
    assert sorted(p.name for p in (noisy / "gt_volumes").iterdir()) == ["state_000.mrc", "state_001.mrc"]
    assert not [p for p in noisy.parent.iterdir() if ".partial-" in p.name]  # temp folders renamed/removed
    meta = json.loads((noisy / "meta.json").read_text())
    assert meta["snr_definition"] == SNR_DEFINITION and meta["snr"] == 0.5
    assert meta["invert"] is True and "negated" in meta["sign_convention"]
    assert meta["state_names"] == ["pdb3hsy", "adk_closed"] and meta["n_particles"] == 2 * N_PER
    assert meta["noise_sigma"] == pytest.approx(math.sqrt(meta["signal_variance"] / 0.5))
    assert meta["seed"] == 3 and meta["package_version"]
    images, apix = _stack(noisy)
    assert images.shape == (2 * N_PER, D, D) and images.dtype == np.float32
    assert apix == pytest.approx(meta["apix"], abs=1e-4)
    labels = np.load(noisy / "labels.npy")
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [N_PER, N_PER]
    # Volumes: positive e/Å³ whose integral is the electron count of each state.
    for k, state in enumerate(two_states):
        with mrcfile.open(noisy / "gt_volumes" / f"state_{k:03d}.mrc") as m:
            vol, vapix = np.array(m.data), float(m.voxel_size.x)
        assert vapix == pytest.approx(meta["apix"], abs=1e-4) and vol.min() >= 0
        assert vol.sum() * vapix**3 == pytest.approx(state.atomic_numbers.sum(), rel=1e-3)
        # the atoms are written in the volume frame and read back by io.structures unchanged
        written = read_structure(noisy / meta["states"][k]["structure"], keep_ligands=True)
        origin = np.asarray(meta["states"][k]["origin_A"])
        np.testing.assert_allclose(written.atom_coords, state.coords - origin, atol=2e-3)
        np.testing.assert_array_equal(written.atom_numbers, state.atomic_numbers)
    assert meta["structure"] == str(noisy / "gt_structures" / "state_000.pdb")


def test_measured_snr_matches_request(datasets):
    noisy, clean = datasets
    y, _ = _stack(noisy)
    x, _ = _stack(clean)
    noise = y.astype(np.float64) - x
    assert x.var() / noise.var() == pytest.approx(0.5, rel=0.1)
    assert abs(noise.mean()) < 0.05 * noise.std()
    # noise-free re-simulation reproduces the poses and CTF of the noisy run
    r1, t1 = load_poses(noisy / "poses.pkl", D=D)
    r2, t2 = load_poses(clean / "poses.pkl", D=D)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(t1, t2)
    assert json.loads((clean / "meta.json").read_text())["noise_sigma"] == 0.0


def test_star_equals_pickles(datasets):
    noisy, _ = datasets
    meta = json.loads((noisy / "meta.json").read_text())
    rot, trans = load_poses(noisy / "poses.pkl", D=D)
    ctf = load_ctf(noisy / "ctf.pkl")
    df = read_star(noisy / "particles.star")
    rot_s, trans_s = poses_from_star(df, meta["apix"])
    np.testing.assert_allclose(rot_s, rot, atol=1e-5)
    np.testing.assert_allclose(trans_s, trans, atol=1e-4)
    np.testing.assert_allclose(ctf_from_star(df, D, meta["apix"]), ctf, rtol=1e-5, atol=1e-3)
    assert df["rlnImageName"].tolist() == [f"{i + 1}@particles.mrcs" for i in range(len(df))]
    np.testing.assert_array_equal(df["rlnClassNumber"].to_numpy(), np.load(noisy / "labels.npy") + 1)
    assert np.abs(trans).max() <= D / 16 + 1e-5  # default shift range D/16 px
    assert ctf[:, 2].min() >= 10000 and ctf[:, 2].max() <= 25000
    np.testing.assert_allclose(ctf[:, 2] - ctf[:, 3], 200.0, atol=1e-2)


def test_images_match_ground_truth(datasets, two_states):
    """Noise-free images = −CTF ⊛ (projection of the state with the stored pose, shifted by −t), both for
    the Fourier-slice projection of the written volume and for the exact projection of the atoms."""
    _, clean = datasets
    meta = json.loads((clean / "meta.json").read_text())
    apix, sigma = meta["apix"], meta["density_model"]["sigma_A"]
    images, _ = _stack(clean)
    rot, trans = load_poses(clean / "poses.pkl", D=D)
    ctf = load_ctf(clean / "ctf.pkl")
    labels = np.load(clean / "labels.npy")
    origins = frame_origins(two_states)
    for k, state in enumerate(two_states):
        idx = np.flatnonzero(labels == k)[:8]
        R, t = torch.as_tensor(rot[idx]), torch.as_tensor(trans[idx])
        with mrcfile.open(clean / "gt_volumes" / f"state_{k:03d}.mrc") as m:
            vol = torch.as_tensor(np.array(m.data))
        from_volume = _ctf_modulate(project_volume(vol, R, shifts=-t, apix=apix), ctf[idx], invert=True)
        c, s, a = sim.state_gaussians(state, origins[k], sigma, dtype=torch.float32)
        exact = _ctf_modulate(project_gaussians(c, s, a, R, D, apix, shifts=-t), ctf[idx], invert=True)
        assert _corr(from_volume, images[idx]).min() > 0.99
        assert _corr(exact, images[idx]).min() > 0.98
        # same scale: e/Å² line integrals, not just the same shape
        assert np.linalg.norm(images[idx]) == pytest.approx(float(exact.norm()), rel=0.05)
        assert np.allclose(meta["states"][k]["origin_A"], origins[k], atol=1e-3)


def test_interrupted_run_leaves_nothing(two_states, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sim, "render_images", boom)
    with pytest.raises(KeyboardInterrupt):
        simulate_dataset(two_states, tmp_path / "ds", box_size=D, n_particles_per_state=4, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_raise_one_line(two_states, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [{"box_size": 33}, {"snr": -1.0}, {"apix": 0.5}, {"n_particles_per_state": [1, 2, 3]}]
    for kw in cases:
        args = {"box_size": D, "n_particles_per_state": 2, "progress": False} | kw
        with pytest.raises(InputError) as err:
            simulate_dataset(two_states, tmp_path / "new", **args)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="not empty"):
        simulate_dataset(two_states, tmp_path / "full", box_size=D, n_particles_per_state=2, progress=False)


@pytest.mark.parametrize("name", ["tomotwin3", "assembly", "ribosplike"])
def test_auto_apix_fits_every_state(name):
    states, names = build_preset(name)
    assert names == [s.name for s in states] and len(set(names)) == len(names)
    origins = frame_origins(states)
    apix = auto_apix(states, D, origins)
    assert apix == pytest.approx(round(apix, 2))
    radii = [np.linalg.norm(s.coords - o, axis=1).max() for s, o in zip(states, origins)]
    assert 2 * max(radii) <= sim.FILL_FRACTION * D * apix + 1e-6
    # render the largest state and the one reaching farthest in any axis direction
    reach = [np.abs(s.coords - o).max() for s, o in zip(states, origins)]
    for k in {int(np.argmax(radii)), int(np.argmax(reach))}:
        vol = sim.render_volume(states[k], origins[k], D, apix, sim.blur_sigma(apix)).numpy()
        faces = np.concatenate([vol[[0, -1]].ravel(), vol[:, [0, -1]].ravel(), vol[:, :, [0, -1]].ravel()])
        # at D=32 the 10 % margin is 3.2 px ≈ 4σ: the faces see only the far tails of the blur
        assert faces.max() < 2e-3 * vol.max() and faces.sum() < 1e-5 * vol.sum()


def test_frames_shared_or_own():
    """Conformations share one origin (motion is kept); distinct complexes are centred on themselves."""
    states, _ = build_preset("ribosplike", n_frames=3, hinge_angles=[0, 10])
    origins = frame_origins(states)
    np.testing.assert_allclose(origins[:3], origins[[0]].repeat(3, 0))  # AdK frames
    np.testing.assert_allclose(origins[3:], origins[[3]].repeat(2, 0))  # 3HSY hinge
    assert np.linalg.norm(origins[0] - origins[3]) > 1.0
    tomo, _ = build_preset("tomotwin3")
    for s, o in zip(tomo, frame_origins(tomo)):
        np.testing.assert_allclose(np.average(s.coords, 0, s.atomic_numbers), o)


def test_assembly_states_are_nested_chain_subsets():
    states, names = build_preset("assembly")
    chains = "ABCDEUVGF"
    assert names == [f"pdb7pbl_{chains[:k]}" for k in range(1, 10)]
    assert [sorted(set(s.chain_ids)) for s in states] == [sorted(chains[:k]) for k in range(1, 10)]
    counts = [len(s.coords) for s in states]
    assert counts == sorted(counts) and len(set(counts)) == 9
    auto, _ = build_preset("assembly", structures=[str(STRUCTURES_DIR / "pdb3hsy.pdb.gz")], n_states=2)
    assert [sorted(set(s.chain_ids)) for s in auto] == [["A", "B"], ["A", "B", "C"]]  # C: glycans


def test_hinge_is_rigid_and_opens():
    base = read_states(STRUCTURES_DIR / "pdb3hsy.pdb.gz")[0]
    s0, s1, s2 = hinge_states(base, ["B"], [0.0, 10.0, 20.0])
    moving = base.chain_ids == "B"
    np.testing.assert_allclose(s0.coords, base.coords, atol=1e-9)
    np.testing.assert_allclose(s2.coords[~moving], base.coords[~moving])
    d0 = np.linalg.norm(base.coords[moving][:50, None] - base.coords[moving][None, :50], axis=-1)
    d2 = np.linalg.norm(s2.coords[moving][:50, None] - s2.coords[moving][None, :50], axis=-1)
    np.testing.assert_allclose(d2, d0, atol=1e-6)  # rigid body
    rmsd = [np.sqrt(((s.coords - base.coords)[moving] ** 2).sum(1).mean()) for s in (s1, s2)]
    assert 0 < rmsd[0] < rmsd[1]


def test_adk_frames_all_atom():
    states, names = build_preset("adk", n_states=3)
    assert names == ["adk_f000", "adk_f048", "adk_f097"]
    assert all(len(s.coords) == 1656 for s in states)  # heavy atoms of the 3341-atom CHARMM system
    assert set(np.unique(states[0].atomic_numbers)) == {6, 7, 8, 16}
    ca = [s.coords[s.atom_names == "CA"] for s in states]
    closed = read_states(STRUCTURES_DIR / "adk" / "adk_closed.pdb.gz")[0]
    # SOURCES.md: CA RMSD to the closed structure is 0.46 Å for the first frame, ~6.9 Å for the last
    assert _rmsd_superposed(ca[0], closed.coords[closed.atom_names == "CA"]) < 0.6
    assert _rmsd_superposed(ca[2], closed.coords[closed.atom_names == "CA"]) > 6.0
    assert np.sqrt(((ca[2] - ca[0]) ** 2).sum(1).mean()) > 4.0  # moved in the common frame, not re-fitted


def _rmsd_superposed(a: np.ndarray, b: np.ndarray) -> float:
    """RMSD (Å) of ``(n, 3)`` point sets after optimal superposition (Kabsch)."""
    a, b = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    sign = np.sign(np.linalg.det(u @ vt))
    R = u @ np.diag([1, 1, sign]) @ vt
    return float(np.sqrt((((a @ R) - b) ** 2).sum(1).mean()))


@pytest.mark.skipif(not SHARED.exists(), reason="shared data folder not present")
def test_read_dcd_matches_shared_ca_models():
    import gemmi

    traj = read_dcd(STRUCTURES_DIR / "adk" / "adk_dims.dcd.gz")
    assert traj.shape == (98, 3341, 3) and traj.dtype == np.float32
    np.testing.assert_array_equal(traj, read_dcd(SHARED / "trajectories" / "adk_dims.dcd"))
    st = gemmi.read_structure(str(SHARED / "trajectories" / "adk_dims_CA_98models.pdb"))
    ca_ref = np.array(
        [[a.pos.tolist() for ch in model for res in ch for a in res] for model in st]
    )  # (98, 214, 3)
    top = gemmi.read_structure(str(STRUCTURES_DIR / "adk" / "adk_closed.pdb.gz"))
    ca_rows = [i for i, a in enumerate(a for ch in top[0] for res in ch for a in res) if a.name == "CA"]
    np.testing.assert_allclose(traj[:, ca_rows], ca_ref, atol=6e-4)  # the PDB rounds to 0.001 Å


def test_read_dcd_rejects_other_files(tmp_path):
    bad = tmp_path / "x.dcd"
    bad.write_bytes(b"\x00" * 200)
    with pytest.raises(InputError, match="not a CHARMM/NAMD DCD"):
        read_dcd(bad)


def test_ensure_dataset_caches(tmp_path, monkeypatch, capsys):
    overrides = {"box_size": D, "n_particles": 3, "n_states": 2}
    first = ensure_dataset("adk", tmp_path, overrides, progress=False)
    assert "Simulating dataset 'adk'" in capsys.readouterr().out
    assert json.loads((first / "meta.json").read_text())["recipe"]["n_states"] == 2

    def fail(*args, **kwargs):
        raise AssertionError("simulated again")

    monkeypatch.setattr(presets, "simulate_dataset", fail)
    assert ensure_dataset("adk", tmp_path, dict(overrides, snr=None), progress=False) == first
    assert "Using cached dataset 'adk'" in capsys.readouterr().out
    monkeypatch.undo()
    other = ensure_dataset("adk", tmp_path, dict(overrides, seed=1), progress=False)
    assert other != first and (other / "meta.json").is_file()
    monkeypatch.setenv(presets.CACHE_ENV, str(tmp_path / "env"))
    assert presets.default_cache_dir() == tmp_path / "env"


def test_presets_reject_unknown_names_and_keys(tmp_path):
    with pytest.raises(InputError, match="unknown"):
        presets.resolve_recipe("nope")
    with pytest.raises(InputError, match="unknown override"):
        presets.resolve_recipe("adk", {"n_sates": 3})
    with pytest.raises(InputError, match="not found"):
        presets.resolve_recipe("tomotwin3", {"structures": [str(tmp_path / "missing.pdb")]})


def test_custom_structures_and_cli(tmp_path, capsys):
    from cryobench_lab.simulate import main

    src = STRUCTURES_DIR / "pdb3hsy.pdb.gz"
    out = tmp_path / "cli"
    assert (
        main(
            [
                "--structures",
                str(src),
                "--out",
                str(out),
                "--box-size",
                str(D),
                "--n-particles",
                "4",
                "--snr",
                "1",
                "--quiet",
                "--set",
                "shift_range_px=1.5",
            ]
        )
        == 0
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["state_names"] == ["pdb3hsy"] and meta["n_particles"] == 4 and meta["shift_range_px"] == 1.5
    assert meta["recipe"]["preset"] == "tomotwin3"
    assert main(["--structures", str(tmp_path / "missing.pdb"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing.pdb" in err


def test_structure_round_trip_keeps_insertion_codes(tmp_path):
    """7CTH's scFv uses Kabat numbering (52A, 82A-C, …): residues must not merge when written back."""
    state = read_states(STRUCTURES_DIR / "mmcif_7cth.cif.gz")[0]
    assert (state.insertion_codes != " ").sum() > 0
    path = sim.write_state_structure(tmp_path, "x", state, np.zeros(3))
    back = read_structure(path, keep_ligands=True)
    assert back.n_atoms == len(state.coords) == 16647
    np.testing.assert_allclose(back.atom_coords, state.coords, atol=2e-3)
