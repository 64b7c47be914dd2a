"""Outputs the field's own tools read (issue 28 items 7-10): FSC text files, z.pkl, RELION's run_model.star and
particle star, ChimeraX script and frame, and the analyze step.

One tiny ``model=hydra`` run (2 epochs, the tiny two-state dataset copied into a dataset cache) produces the
files most tests read; the atomic-frame test writes a map and a model with the project's writers.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pytest
import starfile
import torch

REPO = Path(__file__).resolve().parents[1]
HYDRA = ["model=hydra", "model.hidden_dim=16", "model.n_layers=1", "model.n_classes=2", "trainer.max_epochs=2",
         "metrics.latents_every=1", "metrics.per_image_n=0", "logger=none", "trainer.enable_progress_bar=false"]


def _env(cache: Path) -> dict:
    return dict(os.environ, WANDB_MODE="disabled", CRYOBENCH_LAB_CACHE=str(cache), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def hydra_run(tiny_dataset, tmp_path_factory) -> dict:
    """A finished tiny hydra run whose particles live in the dataset cache; returns its paths."""
    root = tmp_path_factory.mktemp("exports")
    cache = root / "cache"
    data = cache / "tiny"
    shutil.copytree(tiny_dataset, data)
    out = root / "run"
    args = ["data=custom", f"data.particles={data / 'particles.star'}", f"data.labels={data / 'labels.npy'}",
            f"data.gt_volumes={data / 'gt_volumes'}", *HYDRA, f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "cryobench_lab", *args], cwd=root, env=_env(cache),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "cache": cache, "data": data, "root": root}


def _metrics(run: Path) -> dict:
    import json

    return json.loads((run / "metrics.json").read_text())


def test_fsc_text_files_hold_the_scored_curves(hydra_run):
    """Item 10: fsc/state_XXX.txt beside metrics.json, columns resolution (1/Å) and FSC, equal to per_state."""
    run = hydra_run["out"]
    metrics = _metrics(run)
    apix = metrics["apix"]
    for state in metrics["val/per_state"]:
        table = np.loadtxt(run / "fsc" / f"state_{state['state']:03d}.txt")
        assert table.shape == (len(state["curve"]), 2)
        np.testing.assert_allclose(table[:, 0], np.asarray(state["freq"]) / apix, atol=1e-6)
        np.testing.assert_allclose(table[:, 1], state["curve"], atol=1e-6)
        # the AUC of the text curve (in cycles/px) is the reported one
        assert np.trapezoid(table[:, 1], table[:, 0] * apix) == pytest.approx(state["auc"], abs=1e-4)


def test_latents_as_cryodrgn_pickles(hydra_run):
    """Item 7: z.pkl is a pickled float32 (N, zdim) array; z.<epoch>.pkl per epoch, the last equal to z.pkl."""
    run = hydra_run["out"]
    with open(run / "z.pkl", "rb") as f:
        z = pickle.load(f)
    assert isinstance(z, np.ndarray) and z.dtype == np.float32 and z.shape == (300, 2)
    with open(run / "z.0.pkl", "rb") as f:
        z0 = pickle.load(f)
    with open(run / "z.1.pkl", "rb") as f:
        z1 = pickle.load(f)
    assert z0.shape == z.shape and not np.allclose(z0, z1)  # the first epoch's latents moved on
    np.testing.assert_allclose(z1, z, atol=1e-6)
    assert not (run / "z.2.pkl").exists()


def test_run_model_star_classes_and_resolutions(hydra_run):
    """Item 8: run_model.star lists the class maps, their share of the images and their resolution vs truth."""
    from cryobench_lab.io.mrc import read_mrc
    from cryobench_lab.metrics.fsc import fsc_summary

    run = hydra_run["out"]
    model = starfile.read(run / "run_model.star", always_dict=True)
    classes = model["model_classes"]
    metrics = _metrics(run)
    sizes = np.asarray(metrics["val/class_sizes"], float)
    np.testing.assert_allclose(classes["rlnClassDistribution"].to_numpy(), sizes / sizes.sum(), atol=1e-6)
    assert model["model_general"]["rlnNrClasses"] == 2
    assigned = pickle.loads((run / "classes" / "classes.pkl").read_bytes())
    labels = np.load(hydra_run["data"] / "labels.npy")
    for k, row in classes.iterrows():
        vol, apix = read_mrc(run / row["rlnReferenceImage"])
        state = np.bincount(labels[assigned == k]).argmax()
        gt, _ = read_mrc(hydra_run["data"] / "gt_volumes" / f"state_{state:03d}.mrc")
        expected = fsc_summary(vol, gt, apix)["res_0.143"]
        assert row["rlnEstimatedResolution"] == pytest.approx(expected, rel=1e-4)
        assert 2 * apix <= row["rlnEstimatedResolution"] < 999


def test_particle_star_survives_a_cache_move_and_has_max_probabilities(hydra_run):
    """Item 8: particles_classes.star's image paths resolve after the cache folder is moved away, its images
    are the input's, and rlnMaxValueProbDistribution is the largest class posterior (≥ 1/K)."""
    from cryobench_lab.io.mrc import read_mrc
    from cryobench_lab.io.star import image_locations, read_star

    run = hydra_run["out"]
    original, _ = read_mrc(hydra_run["data"] / "particles.mrcs")
    moved = hydra_run["root"] / "cache_moved"
    hydra_run["cache"].rename(moved)
    try:
        star = run / "classes" / "particles_classes.star"
        df = read_star(star)
        paths, indices = image_locations(df, star)
        assert all(Path(p).is_file() for p in set(paths)), set(paths)
        assert not any(str(moved) in p or "cache" in p for p in set(paths))
        stack, _ = read_mrc(paths[0])
        np.testing.assert_array_equal(stack[indices], original)
        p = df["rlnMaxValueProbDistribution"].to_numpy()
        assert np.all((p >= 0.5 - 1e-6) & (p <= 1 + 1e-6))
        assigned = pickle.loads((run / "classes" / "classes.pkl").read_bytes())
        np.testing.assert_array_equal(df["rlnClassNumber"].to_numpy(), assigned + 1)
    finally:
        moved.rename(hydra_run["cache"])


def test_chimerax_script_opens_existing_files(hydra_run):
    """Item 9: chimerax.cxc opens the state maps, the class maps and each class's traversal as a series; every
    path it names exists (relative ones from the script's folder, as ChimeraX resolves them)."""
    run = hydra_run["out"]
    lines = (run / "chimerax.cxc").read_text().splitlines()
    opened = [line.split()[1:] for line in lines if line.startswith("open ")]
    files = [f for args in opened for f in args if f.endswith((".mrc", ".pdb", ".cif"))]
    assert "volumes/state_000.mrc" in files and "classes/class_001.mrc" in files
    assert any(line.endswith("vseries true") for line in lines)
    for f in files:
        assert (run / f).is_file(), f
    with mrcfile.open(run / "volumes" / "state_000.mrc") as m:  # the box centre at (0, 0, 0) Å
        assert [float(m.header.origin[a]) for a in "xyz"] == [-16 * 3.0] * 3


def test_maps_and_models_share_one_frame(tmp_path):
    """Item 9: a model written in the box frame lies inside its map's bounding box, and the map's density
    centroid (from the header's origin and voxel size) is the model's centroid, read as ChimeraX reads both."""
    from cryobench_lab.io.mrc import write_mrc
    from cryobench_lab.io.structures import read_structure, write_structure
    from cryobench_lab.physics.gaussians import voxelize_gaussians

    st = read_structure(REPO / "src" / "cryobench_lab" / "structures" / "adk" / "adk_closed.pdb.gz")
    atoms = st.atom_coords - st.atom_coords.mean(0) + np.array([6.0, -4.0, 3.0])  # off centre on purpose
    write_structure(tmp_path / "model.pdb", st, atoms)
    D, apix = 48, 2.0
    res = torch.from_numpy(read_structure(tmp_path / "model.pdb").atom_coords).float()
    vol = voxelize_gaussians(res, torch.full((len(res),), 2.0), torch.ones(len(res)), D, apix)
    write_mrc(tmp_path / "map.mrc", vol.numpy(), apix=apix)

    with mrcfile.open(tmp_path / "map.mrc") as m:
        origin = np.array([float(m.header.origin[a]) for a in "xyz"])
        step = float(m.voxel_size.x)
        data = np.asarray(m.data, float)
    xyz = gemmi.read_structure(str(tmp_path / "model.pdb"))
    coords = np.array([a.pos.tolist() for chain in xyz[0] for r in chain for a in r])
    lo, hi = origin, origin + step * (np.array(data.shape[::-1]) - 1)
    assert np.all(coords >= lo) and np.all(coords <= hi)
    k, j, i = np.indices(data.shape)
    centroid = np.array([(data * g).sum() / data.sum() for g in (i, j, k)]) * step + origin  # x, y, z
    np.testing.assert_allclose(centroid, coords.mean(0), atol=0.05)


def _map_frame(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(density [z, y, x], lower corner (x, y, z) Å, upper corner) of a map read with its header."""
    with mrcfile.open(path) as m:
        origin = np.array([float(m.header.origin[a]) for a in "xyz"])
        data = np.asarray(m.data, float)
        step = float(m.voxel_size.x)
    return data, origin, origin + step * (np.array(data.shape[::-1]) - 1)


def test_simulated_ground_truth_model_sits_in_its_map(tmp_path):
    """Item 9 on files the dataset writer produced: each state's ground-truth PDB lies inside its ground-truth
    map's box, and the map's density centroid (header origin and voxel size) is the atoms' centroid."""
    from cryobench_lab.data.simulate import read_states, simulate_dataset

    state = read_states(REPO / "src" / "cryobench_lab" / "structures" / "adk" / "adk_closed.pdb.gz")[0]
    out = tmp_path / "sim"
    simulate_dataset([state], out, box_size=32, n_particles_per_state=2, seed=0, progress=False)
    data, lo, hi = _map_frame(out / "gt_volumes" / "state_000.mrc")
    st = gemmi.read_structure(str(next((out / "gt_structures").glob("state_000.*"))))
    xyz = np.array([a.pos.tolist() for chain in st[0] for r in chain for a in r])
    weight = np.array([a.element.atomic_number for chain in st[0] for r in chain for a in r], float)
    assert np.all(xyz >= lo) and np.all(xyz <= hi)
    step = (hi - lo) / (np.array(data.shape[::-1]) - 1)
    k, j, i = np.indices(data.shape)
    centroid = np.array([(data * g).sum() / data.sum() for g in (i, j, k)]) * step + lo
    np.testing.assert_allclose(centroid, (xyz * weight[:, None]).sum(0) / weight.sum(), atol=0.3)


def test_analyze_writes_embeddings_and_volumes(hydra_run, tmp_path, monkeypatch):
    """Item 7: analyze (its command line, in this process) writes z.pkl (= the run's), the side-by-side PCA,
    k-means / PC / given-latent volumes; a latent given with --class is decoded exactly as the class map the
    run wrote at that latent."""
    from cryobench_lab.analyze import main
    from cryobench_lab.io.mrc import read_mrc

    run = hydra_run["out"]
    monkeypatch.setenv("CRYOBENCH_LAB_CACHE", str(hydra_run["cache"]))
    z = pickle.loads((run / "z.pkl").read_bytes())
    assigned = pickle.loads((run / "classes" / "classes.pkl").read_bytes())
    centre = z[assigned == 1].mean(0)
    out = tmp_path / "analysis"
    main([f"run_dir={run}", f"out={out}", "ksample=3", "n_per_pc=3", "umap=false",
          "--z", ",".join(f"{v:.9g}" for v in centre), "--class", "1"])
    np.testing.assert_allclose(pickle.loads((out / "z.pkl").read_bytes()), z, atol=1e-6)
    assert (out / "pca.png").stat().st_size > 10_000
    assert len(list((out / "kmeans3").glob("vol_*.mrc"))) == 3
    assert len(list((out / "pc1").glob("vol_*.mrc"))) == 3 and len(list((out / "pc2").glob("vol_*.mrc"))) == 3
    given, _ = read_mrc(out / "z_given" / "vol_000.mrc")
    class_map, _ = read_mrc(run / "classes" / "class_001.mrc")
    np.testing.assert_allclose(given, class_map, atol=1e-4 * np.abs(class_map).max())


def test_analyze_refuses_bad_latents_in_one_line(tmp_path, monkeypatch, capsys):
    """A latent of the wrong dimension: one line naming --z, exit 2, nothing written."""
    import cryobench_lab.eval
    from cryobench_lab.analyze import main

    model, dm = _fake_inputs()
    monkeypatch.setattr(cryobench_lab.eval, "load_trained", lambda *a, **k: (None, dm, model, []))
    with pytest.raises(SystemExit) as exit_info:
        main([f"run_dir={tmp_path}", f"out={tmp_path / 'bad'}", "umap=false", "--z", "1,2,3"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --z") and "2 numbers" in lines[0]
    assert not (tmp_path / "bad").exists()


class _FakeLatentModel:
    """Latents (N, 2) and two classes; decode returns a constant map per class (enough for the file logic)."""

    method_name, K, device = "fake", 2, "cpu"

    def __init__(self, z, probs):
        self.z, self.probs = z, probs

    def eval(self):
        return self

    def embed_all(self, loader):
        return {"latent": self.z, "class_probs": self.probs, "index": torch.arange(len(self.z))}

    def decode(self, latent, classes):
        return torch.ones(len(classes), 8, 8, 8) * (classes.float()[:, None, None, None] + 1)


def _fake_inputs(n=40):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, generator=g)
    probs = torch.nn.functional.one_hot(torch.arange(n) % 2, 2).float()
    dm = SimpleNamespace(info=SimpleNamespace(labels=np.arange(n) % 2, apix=2.0), all_dataloader=lambda: None)
    return _FakeLatentModel(z, probs), dm


def test_analyze_umap_is_optional(tmp_path, monkeypatch, capsys):
    """Without umap-learn: PCA only and a one-line note; with it: umap.png beside pca.png."""
    import cryobench_lab.analyze as analyze

    model, dm = _fake_inputs()
    monkeypatch.setattr(analyze, "umap_embedding", lambda z: None)
    written = analyze.analyze(model, dm, tmp_path / "a", ksample=2, n_per_pc=2)
    assert "umap" not in written and not (tmp_path / "a" / "umap.png").exists()
    assert "umap-learn is not installed: PCA only" in capsys.readouterr().err
    monkeypatch.setattr(analyze, "umap_embedding", lambda z: z[:, :2] * 2)
    written = analyze.analyze(model, dm, tmp_path / "b", ksample=2, n_per_pc=2)
    assert (tmp_path / "b" / "umap.png").stat().st_size > 10_000 and (tmp_path / "b" / "pca.png").exists()
    vol = mrcfile.read(tmp_path / "b" / "pc1" / "vol_000.mrc")
    assert vol.shape == (8, 8, 8)


def test_parse_latents_from_arguments_and_files(tmp_path):
    from cryobench_lab.analyze import parse_latents
    from cryobench_lab.errors import InputError

    np.testing.assert_allclose(parse_latents(["0.5,-1", "2 3"], 2), [[0.5, -1], [2, 3]])
    np.savetxt(tmp_path / "z.txt", np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert parse_latents([str(tmp_path / "z.txt")], 2).shape == (3, 2)
    with pytest.raises(InputError, match="dimension 3"):
        parse_latents(["1,2,3"], 2)
