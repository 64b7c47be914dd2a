"""CryoBench datasets: the reader of the published layout (on a simulator-written replica), its errors, the
experiment configs and their +smoke shrink, the masked / per-image protocol details, and the leaderboard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cryobench_lab.config import DataConfig
from cryobench_lab.data.ground_truth import VolumeFiles, load_gt_volumes
from cryobench_lab.data.particles import ParticleDataModule
from cryobench_lab.errors import InputError
from cryobench_lab.io.cryobench import STORED_GRID_FACTOR, load_cryobench, write_cryobench_layout
from cryobench_lab.io.pickles import load_ctf, load_pickle, save_ctf, save_pickle
from cryobench_lab.metrics.fsc import fsc, fsc_auc

D, N_STATES, PER_STATE = 32, 3, 40
CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    """3 distinct atom clouds × 40 noise-free images at D=32 (with CTF and shifts), in CryoBench's layout."""
    from cryobench_lab.data.simulate import State, simulate_dataset

    rng = np.random.default_rng(0)
    states = [State(f"cloud{k}", rng.normal(scale=[9, 6, 4], size=(150, 3)) @ _rotation(k), np.full(150, 6))
              for k in range(N_STATES)]
    tmp = tmp_path_factory.mktemp("cryobench")
    folder = simulate_dataset(states, tmp / "sim", box_size=D, apix=2.5, n_particles_per_state=PER_STATE,
                              snr=None, seed=1, progress=False)
    return write_cryobench_layout(folder, tmp / "IgG-1D")


def _rotation(k: int) -> np.ndarray:
    a = np.pi / 3 * k
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def _datamodule(root, **kw) -> ParticleDataModule:
    cfg = OmegaConf.structured(DataConfig(name="cryobench_igg1d", layout="cryobench", root=str(root), **kw))
    dm = ParticleDataModule(cfg)
    dm.setup()
    return dm


def test_layout_written_like_the_download(replica):
    assert (replica / "images" / "snrinf" / f"sorted_particles.{D}.txt").is_file()
    names = (replica / "images" / "snrinf" / f"sorted_particles.{D}.txt").read_text().split()
    assert len(names) == N_STATES and all((replica / "images" / "snrinf" / n).is_file() for n in names)
    labels = load_pickle(replica / "gt_latents.pkl")
    assert np.array_equal(labels, np.repeat(np.arange(N_STATES), PER_STATE))  # state-contiguous, label order
    ctf = load_ctf(replica / "combined_ctfs.pkl")
    assert np.all(ctf[:, 0] == STORED_GRID_FACTOR * D) and np.allclose(ctf[:, 1], 2.5 / STORED_GRID_FACTOR)
    assert len(list((replica / "vols" / f"{D}_org").glob("*.mrc"))) == N_STATES
    assert (replica / "init_mask" / "mask.mrc").is_file()


def test_reader_pairs_images_poses_ctf_and_labels(replica):
    """Per-state backprojection from what the reader serves matches each state's own ground truth and not the
    others': a mis-paired image, pose, CTF or label would blur or swap the reconstructions."""
    from cryobench_lab.models.backproject import Backprojection

    dm = _datamodule(replica, snr=None)
    info = dm.info
    assert info.apix == pytest.approx(2.5, rel=1e-5)  # 1.25 Å at the stored 64 px grid → 2.5 Å at 32 px
    assert info.n_states == N_STATES and info.mask.shape == (D, D, D)
    model = Backprojection(info)
    for i, batch in enumerate(dm.all_dataloader()):
        assert torch.all(batch["ctf"][:, 0] == D) and torch.allclose(batch["ctf"][:, 1], torch.tensor(2.5))
        model.training_step(batch, i)
    model.solve()
    auc = np.array([[fsc_auc(*fsc(model.volumes[s], info.gt_volumes[t])) for t in range(N_STATES)]
                    for s in range(N_STATES)])
    perfect = (D // 2 - 1) / D
    assert np.all(np.diag(auc) > 0.75 * perfect), auc
    off = auc[~np.eye(N_STATES, dtype=bool)].reshape(N_STATES, -1)
    assert np.all(np.diag(auc)[:, None] > off + 0.05), auc


def test_reader_matches_an_explicit_stack_list_and_snr_folder(replica):
    bench = load_cryobench(replica, snr=float("inf"))
    assert bench.particles.n == N_STATES * PER_STATE and bench.particles.D == D
    with pytest.raises(InputError, match="snr0.01.*set data.snr"):
        load_cryobench(replica, snr=0.01)


def _broken(replica: Path, tmp_path: Path, how) -> Path:
    root = tmp_path / "IgG-1D"
    shutil.copytree(replica, root)
    how(root)
    return root


def _rows_changed(root: Path, name: str, rows: int):
    value = load_pickle(root / name)
    if name == "combined_ctfs.pkl":
        save_ctf(root / name, value[:rows])
    else:
        save_pickle(root / name, value[:rows])


BREAKS = {
    "images/snrinf/sorted_particles.32.txt": lambda r: (r / "images/snrinf/sorted_particles.32.txt").unlink(),
    "combined_poses.pkl": lambda r: (r / "combined_poses.pkl").unlink(),
    "combined_ctfs.pkl": lambda r: _rows_changed(r, "combined_ctfs.pkl", 7),
    "gt_latents.pkl": lambda r: (r / "gt_latents.pkl").unlink(),
    "labels": lambda r: save_pickle(r / "gt_latents.pkl", np.random.default_rng(0).normal(size=(120, 8))),
    "vols/32_org": lambda r: (r / "vols/32_org/002.mrc").unlink(),
    "init_mask/mask.mrc": lambda r: (r / "init_mask/mask.mrc").unlink(),
}


@pytest.mark.parametrize("piece", sorted(BREAKS))
def test_missing_or_malformed_piece_names_the_file_and_the_layout(replica, tmp_path, piece):
    root = _broken(replica, tmp_path, BREAKS[piece])
    with pytest.raises(InputError) as err:
        _datamodule(root)
    message = str(err.value)
    assert "\n" not in message and "expected CryoBench layout" in message
    assert piece.split("/")[-1] in message or "gt_latents.pkl" in message, message


def test_published_vols_folder_serves_downsampled_stacks_and_a_wrong_mask_box_fails(replica, tmp_path):
    root = _broken(replica, tmp_path, lambda r: (r / "vols" / f"{D}_org").rename(r / "vols" / "128_org"))
    assert load_cryobench(root).volume_files[0].endswith("vols/128_org/000.mrc")
    from cryobench_lab.io.mrc import write_mrc

    write_mrc(root / "init_mask" / "mask.mrc", np.ones((D // 2,) * 3, np.float32), 2.5)
    with pytest.raises(InputError, match="mask.mrc: mask has shape"):
        load_cryobench(root)


def test_gt_volumes_beyond_the_memory_cap_are_read_on_access(replica):
    files = sorted((replica / "vols" / f"{D}_org").glob("*.mrc"))
    eager = load_gt_volumes([str(f) for f in files], N_STATES, 16)
    lazy = load_gt_volumes([str(f) for f in files], N_STATES, 16, memory_cap_gb=1e-9)
    assert isinstance(lazy, VolumeFiles) and lazy.shape == tuple(eager.shape) and len(lazy) == N_STATES
    assert all(torch.equal(a, b) for a, b in zip(lazy, eager))


# ---- configs ---------------------------------------------------------------------------------------------

# The 43 former experiment=cryobench_<dataset>_<method> files, resolved full and +smoke=true at commit b9b5b34
# (by tests/data/record_cryobench_experiments.py, removed with them): experiment=cryobench must reproduce them.
RECORDED = json.loads((Path(__file__).parent / "data" / "cryobench_experiments.json").read_text())
OLD_NAMES = sorted({key.split("/")[0] for key in RECORDED})
MODEL_OF_METHOD = {"segvae": "segvae_paper"}  # the old segvae experiments ran the cryoSPHERE paper's settings


def _new_form(old_name: str) -> list[str]:
    _, dataset, method = old_name.split("_")
    return ["experiment=cryobench", f"data=cryobench_{dataset}", f"model={MODEL_OF_METHOD.get(method, method)}"]


@pytest.fixture(scope="module")
def compose_train():
    """``compose_train(overrides)`` → the train config, composed as the command line does."""
    from hydra import compose, initialize_config_dir

    from cryobench_lab.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides: compose(config_name="train", overrides=[*overrides, "output_dir=."])


def _resolved(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def _typed_leaves(node, path=""):
    """{dotted path: (type name, value)}: 1 and True, or 2 and 2.0, must not pass for each other."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _typed_leaves(value, f"{path}{key}.").items()}
    return {path.rstrip("."): (type(node).__name__, node)}


@pytest.mark.parametrize("old_name", OLD_NAMES)
def test_composition_resolves_like_the_recorded_experiment(compose_train, old_name):
    for mode, extra in (("full", []), ("smoke", ["+smoke=true"])):
        recorded = RECORDED[f"{old_name}/{mode}"]
        new = _resolved(compose_train([*_new_form(old_name), *extra]))
        assert new["data"].pop("hints") is not None  # the one key the recorded runs did not have
        was, now = _typed_leaves(recorded), _typed_leaves({k: new[k] for k in recorded})
        # keys added to the schema since the recording (with their defaults) are new features, not changes
        assert {k: now[k] for k in was} == was, (old_name, mode)


def _smoke_pairs(node, path=""):
    """Every ``${smoke:<full>,<smoke>}`` value of a config file → {path: (full, smoke)} (strings)."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_smoke_pairs(value, f"{path}{key}."))
        elif isinstance(value, str) and value.startswith("${smoke:"):
            full, small = value[len("${smoke:"):-1].split(",", 1)
            out[f"{path}{key}"] = (full, small)
    return out


def test_every_method_block_belongs_to_a_model_and_shrinks_in_smoke():
    import yaml

    blocks = {p.stem: p for p in (CONF / "experiment" / "cryobench").glob("*.yaml")}
    assert {_new_form(name)[2].split("=")[1] for name in OLD_NAMES} == set(blocks)
    for model, path in blocks.items():  # files only: the compositions are checked above
        assert (CONF / "model" / f"{model}.yaml").is_file(), path
        for key, (full, small) in _smoke_pairs(yaml.safe_load(path.read_text())).items():
            if full.isdigit() and key != "data.batch_size":  # a smoke batch may be larger (CPU throughput)
                assert int(small) <= int(full), (model, key)


def test_experiment_composes_full_and_smoke(compose_train):
    run = ["experiment=cryobench", "data=cryobench_igg1d", "model=cryodrgn", "data.root=/x"]
    full, smoke = _resolved(compose_train(run)), _resolved(compose_train([*run, "+smoke=true"]))
    assert full["data"]["layout"] == "cryobench" and full["data"]["name"] == "cryobench_igg1d"
    assert full["trainer"]["accelerator"] == "gpu" and full["data"]["box_size"] is None
    # CryoBench ran cryoDRGN as `train_vae -n 50 --zdim 8` with cryoDRGN's 3x1024 networks and batch 8
    assert full["model"]["hidden_dim"] == 1024 and full["model"]["latent_dim"] == 8
    assert full["model"]["epochs"] == 50 and full["data"]["batch_size"] == 8
    assert smoke["trainer"]["accelerator"] == "cpu" and smoke["data"]["box_size"] == 32
    assert smoke["model"]["hidden_dim"] == 64 and smoke["model"]["epochs"] == 2 and smoke["trainer"]["max_steps"] > 0
    assert smoke["metrics"]["per_image_n"] < full["metrics"]["per_image_n"] and smoke["logger"]["backends"] == ["csv"]
    # command-line overrides win over the experiment, the method block and the dataset hints
    tuned = _resolved(compose_train(["experiment=cryobench", "data=cryobench_tomotwin100", "model=hydra", "+smoke=true",
                                     "data.box_size=64", "model.n_classes=5", "data.hints.mixture_latent_dim=4"]))
    assert (tuned["data"]["box_size"], tuned["model"]["n_classes"], tuned["model"]["latent_dim"]) == (64, 5, 4)


def test_experiment_on_a_dataset_without_hints_fails_in_one_line_naming_them(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "cryobench_lab", "experiment=cryobench", "data=tomotwin3", "model=hydra",
                          f"hydra.run.dir={run}"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "reads data.hints.mixture_classes" in out.stderr and "data=cryobench_<dataset>" in out.stderr
    assert not run.exists()


def test_experiment_on_a_dataset_outside_the_cryobench_layout_fails_at_once(compose_train):
    """Where the command-line check does not run (a sweep's jobs), the data are refused before the model, whose
    sizes would read the missing hints."""
    cfg = compose_train(["experiment=cryobench", "data=tomotwin3", "model=hydra", "+smoke=true"])
    with pytest.raises(InputError, match="data.layout=cryobench"):
        ParticleDataModule(cfg.data).setup()


# ---- protocols -------------------------------------------------------------------------------------------

def test_per_image_sampling_is_cryobench_arange_and_masked_variant_uses_the_mask():
    from cryobench_lab.metrics.protocols import per_conformation_fsc, per_image_fsc

    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 8, 8, 8, generator=g)
    mask = torch.zeros(8, 8, 8)
    mask[2:6, 2:6, 2:6] = 1.0
    N = 335  # as Ribosembly's 335,240 images with n=100: N // n = 3, arange gives 112 images here
    labels = torch.arange(N) % 2

    def decode(z, classes):
        return gt[classes] + 0.3 * torch.rand(len(classes), 8, 8, 8, generator=g)

    probs = torch.nn.functional.one_hot(labels, 2).float()
    img = per_image_fsc(decode, labels, None, probs, gt, 3.0, n=100, variants={"masked": mask})
    assert [p["image"] for p in img["per_image"]] == np.arange(0, N, N // 100).tolist()
    p = img["per_image"][0]
    assert "auc_masked" in p and p["auc_masked"] != p["auc"]
    conf = per_conformation_fsc(lambda z, c: gt[c], labels, None, probs, gt, 3.0, variants={"masked": mask})
    freq, curve = fsc(gt[0] * mask, gt[0] * mask)
    assert conf["fsc_auc_mean_masked"] == pytest.approx(fsc_auc(freq, curve))


# ---- leaderboard -----------------------------------------------------------------------------------------

def test_leaderboard_puts_runs_beside_published_numbers(tmp_path):
    from cryobench_lab.leaderboard import PUBLISHED_LABEL, write_leaderboard

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"method": "cryodrgn", "box_size": 128, "n_particles": 100000,
                                                  "val/fsc_auc_mean": 0.3712, "val/fsc_auc_std": 0.01,
                                                  "val/fsc_auc_mean_masked": 0.4012, "val/ari": float("nan")}))
    OmegaConf.save(OmegaConf.create({"data": {"name": "cryobench_igg1d", "root": "/data/IgG-1D"},
                                     "model": {"name": "cryodrgn"}}), run / "config.yaml")
    out = write_leaderboard([run], tmp_path / "board.md", tmp_path / "board.csv")
    lines = out.read_text().splitlines()
    published = next(i for i, line in enumerate(lines) if line.startswith("| cryoDRGN |"))
    assert PUBLISHED_LABEL in lines[published] and "0.366" in lines[published]
    assert lines[published + 1].startswith("| cryodrgn | this project, run here (D=128, 100000 images)")
    assert "0.371 (masked 0.401)" in lines[published + 1]
    assert "published, not re-run" in (tmp_path / "board.csv").read_text()
    with pytest.raises(InputError, match="metrics.json"):
        write_leaderboard([tmp_path / "nothing"], tmp_path / "x.md")


@pytest.mark.slow
def test_smoke_experiment_runs_end_to_end_and_enters_the_leaderboard(replica, tmp_path):
    """`experiment=cryobench data=cryobench_igg1d model=backproject +smoke=true` on the replica, then the
    leaderboard (≈ 30 s)."""
    import subprocess
    import sys

    from cryobench_lab.leaderboard import write_leaderboard

    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "cryobench_lab", "experiment=cryobench", "data=cryobench_igg1d",
                    "model=backproject", "+smoke=true", f"data.root={replica}", "data.snr=null", f"hydra.run.dir={run}",
                    "trainer.enable_progress_bar=false"], check=True, capture_output=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["box_size"] == 32 and metrics["val/fsc_auc_mean"] > 0.75 * (32 // 2 - 1) / 32
    assert metrics["val/fsc_auc_mean_masked"] > 0 and metrics["val/ari"] == 1.0
    board = write_leaderboard([run], tmp_path / "board.md").read_text()
    assert "simulated replica" in board and "published, not re-run" in board
