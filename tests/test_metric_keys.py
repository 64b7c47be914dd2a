"""One scorer, one key set: every method writes the same scalar metric keys (README "Results of a run").

A two-state AdK dataset (closed, and the LID domain moved 8 Å) with per-state atomic models and domains is
written with the project's own writers; backproject (classes, no latent, no atoms), hydra (classes and
latents) and segvae (latents and atoms) train a few steps through ``run`` and the keys of their
``metrics.json`` are compared. A metric a method cannot produce must be NaN, not missing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from cryobench_lab.config import register_configs

REPO = Path(__file__).resolve().parents[1]
ADK = REPO / "src" / "cryobench_lab" / "structures" / "adk" / "adk_closed.pdb.gz"
D, APIX, N_PER = 32, 3.0, 40
DOMAINS = "{NMP:[30,59],LID:[122,159]}"


@pytest.fixture(scope="module")
def adk_dataset(tmp_path_factory) -> Path:
    """particles.mrcs/.star, labels.npy, gt_volumes/, gt_structures/ of closed AdK and AdK with LID +8 Å x."""
    from cryobench_lab.io.mrc import write_mrc, write_stack
    from cryobench_lab.io.star import write_particle_star
    from cryobench_lab.io.structures import read_structure, write_structure
    from cryobench_lab.physics.ctf import ctf_image
    from cryobench_lab.physics.fft import fft2_center, ifft2_center
    from cryobench_lab.physics.gaussians import project_gaussians, voxelize_gaussians
    from cryobench_lab.physics.rotations import random_rotations

    out = tmp_path_factory.mktemp("adk_keys")
    (out / "gt_volumes").mkdir()
    (out / "gt_structures").mkdir()
    st = read_structure(ADK)
    atoms = st.atom_coords - st.residue_coords.mean(0)  # centred in the box
    lid = (st.atom_residue_numbers >= 122) & (st.atom_residue_numbers <= 159)
    g = torch.Generator().manual_seed(0)
    images, rots, trans, ctfs = [], [], [], []
    for s, shift in enumerate((0.0, 8.0)):
        xyz = atoms.copy()
        xyz[lid, 0] += shift
        write_structure(out / "gt_structures" / f"state_{s:03d}.pdb", st, xyz)
        res = torch.from_numpy(read_structure(out / "gt_structures" / f"state_{s:03d}.pdb").residue_coords)
        amp = torch.from_numpy(st.residue_electrons.astype(np.float32))
        sig = torch.full((len(res),), 2.0)
        write_mrc(out / "gt_volumes" / f"state_{s:03d}.mrc", voxelize_gaussians(res, sig, amp, D, APIX).numpy(), apix=APIX)
        rot = random_rotations(N_PER, generator=g)
        t = (torch.rand(N_PER, 2, generator=g) - 0.5) * 2  # px
        ctf = torch.tensor([D, APIX, 15000.0, 14800.0, 0.0, 300.0, 2.7, 0.1, 0.0]).expand(N_PER, 9).clone()
        proj = project_gaussians(res.expand(N_PER, -1, -1), sig, amp, rot, D, APIX, -t)
        images.append(-ifft2_center(fft2_center(proj) * ctf_image(ctf, D)).real)
        rots.append(rot), trans.append(t), ctfs.append(ctf)
    clean = torch.cat(images)
    noisy = clean + clean.std() * torch.randn(clean.shape, generator=g)
    write_stack(out / "particles.mrcs", noisy.numpy().astype(np.float32), apix=APIX)
    write_particle_star(out / "particles.star", [f"{i + 1}@particles.mrcs" for i in range(len(noisy))],
                        torch.cat(rots).numpy(), torch.cat(trans).numpy(), torch.cat(ctfs).numpy(), apix=APIX, D=D)
    np.save(out / "labels.npy", np.repeat(np.arange(2), N_PER).astype(np.int64))
    return out


MODELS = {
    "backproject": [],
    "hydra": ["model.hidden_dim=16", "model.n_layers=1", "model.n_classes=2"],
    "segvae": ["model.encoder_hidden=32", "model.decoder_hidden=32", "model.encoder_layers=1",
               "model.decoder_layers=1", "model.n_segments=4"],
}


def _run(name: str, data: Path, out: Path) -> dict:
    """Compose the config as the CLI does, train one step, score with the shared scorer → metrics."""
    import lightning as L

    from cryobench_lab.callbacks.evaluation import ScoreOptions, score_model
    from cryobench_lab.data.particles import ParticleDataModule
    from cryobench_lab.run import build_model

    register_configs()
    overrides = [
        f"model={name}", *MODELS[name], "data=custom", f"data.particles={data / 'particles.star'}",
        f"data.labels={data / 'labels.npy'}", f"data.gt_volumes={data / 'gt_volumes'}",
        f"data.gt_structures={data / 'gt_structures'}", f"data.structure={data / 'gt_structures' / 'state_000.pdb'}",
        f"data.domains={DOMAINS}", "data.batch_size=40",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    dm = ParticleDataModule(cfg.data, seed=0)
    dm.setup()
    model = build_model(cfg, dm.info)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(out))
    trainer.fit(model, datamodule=dm)
    metrics, _ = score_model(model, dm, out, ScoreOptions(per_image_n=0, save_volumes=False, figures=False))
    return json.loads(json.dumps(metrics))  # what metrics.json holds (NaN round-trips)


@pytest.fixture(scope="module")
def metrics(adk_dataset, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    return {name: _run(name, adk_dataset, root / name) for name in MODELS}


def _scalar_keys(m: dict) -> set:
    return {k for k, v in m.items() if k.startswith("val/") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_every_method_writes_the_same_scalar_keys(metrics):
    keys = {name: _scalar_keys(m) for name, m in metrics.items()}
    reference = keys["backproject"]
    for name, k in keys.items():
        assert k == reference, (name, sorted(k ^ reference))
    expected = {"val/dist_corr_NMP_CORE", "val/dist_corr_LID_CORE", "val/distance_corr", "val/clashes_mean",
                "val/clashes_median", "val/clashes_true_median", "val/segmentation_ari", "val/ari", "val/nmi",
                "val/n_empty_classes", "val/fsc_auc_mean"}
    assert expected <= reference
    from cryobench_lab.metrics.protocols import METRIC_KEYS  # every key documented (pattern for the pairs)

    assert all(k[4:] in METRIC_KEYS or k.startswith("val/dist_corr_") for k in reference), sorted(reference)


def test_every_run_reports_the_floor_the_oracle_and_the_ground_truth_mask(metrics):
    """Method vs floor vs oracle in every metrics.json: the references depend on the data only, so their
    numbers are identical for every method; the ground-truth-support mask variants exist beside them."""
    keys = ("val/floor_fsc_auc_mean", "val/oracle_fsc_auc_mean", "val/floor_fsc_auc_mean_gtmask",
            "val/oracle_fsc_auc_mean_gtmask", "val/fsc_auc_mean_gtmask", "val/fsc_res_0.5_gtmask")
    for k in keys[:4]:
        values = {name: m[k] for name, m in metrics.items()}
        assert len(set(values.values())) == 1 and 0 < values["backproject"] < 0.5, (k, values)
    for m in metrics.values():
        assert all(k in m for k in keys)
    # per state, two states: the consensus is one volume scored against both
    assert len(metrics["hydra"]["val/references"]["floor"]) == 2


def test_absent_values_are_nan_and_present_ones_are_numbers(metrics):
    bp, hydra, seg = metrics["backproject"], metrics["hydra"], metrics["segvae"]
    # no atoms: atom metrics NaN, but the truth's own clash count is a dataset fact, the same for all
    assert math.isnan(bp["val/dist_corr_LID_CORE"]) and math.isnan(hydra["val/clashes_median"])
    assert bp["val/clashes_true_median"] == seg["val/clashes_true_median"] == hydra["val/clashes_true_median"]
    # no classes: classification NaN
    assert math.isnan(seg["val/ari"]) and not math.isnan(bp["val/ari"])
    # the segment VAE's atoms are scored by the scorer: clashes counted, segmentation compared with domains
    assert seg["val/clashes_median"] >= 0 and -1 <= seg["val/segmentation_ari"] <= 1
    assert math.isnan(bp["val/segmentation_ari"])


def test_atom_metrics_of_the_truth_are_perfect(adk_dataset):
    """The scorer's atom path on a model whose ``structure`` returns each image's true state: r = 1."""
    from types import SimpleNamespace

    from cryobench_lab.callbacks.evaluation import atom_scores, load_gt_structures

    labels = np.repeat(np.arange(2), N_PER)
    info = SimpleNamespace(gt_structures=str(adk_dataset / "gt_structures"), labels=labels, n_states=2,
                           domains={"NMP": [30, 59], "LID": [122, 159]})
    truth = torch.from_numpy(np.stack([s.residue_coords for s in load_gt_structures(info)]))

    class Oracle:
        def structure(self, latent):  # latent: the image's state, (M, 1)
            return truth[latent[:, 0].long()]

    out = atom_scores(Oracle(), torch.from_numpy(labels)[:, None].float(), None, info)
    assert out["dist_corr_LID_CORE"] > 0.99  # the LID moved between the states
    assert math.isnan(out["dist_corr_NMP_CORE"])  # the NMP-CORE distance never changed: r undefined
    assert out["clashes_median"] == out["clashes_true_median"]
    assert math.isnan(out["segmentation_ari"])
