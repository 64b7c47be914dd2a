"""Multiclass EM and focused classification: EM ascent, signal subtraction, masks, outputs."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import torch

from cryobench_lab.data.particles import DatasetInfo
from cryobench_lab.io.mrc import write_mrc
from cryobench_lab.metrics.classes import classification_metrics
from cryobench_lab.models.focused import FocusedClassification
from cryobench_lab.models.multiclass import MulticlassEM, local_rotation_grid, local_shift_grid
from cryobench_lab.physics.ctf import ctf_image
from cryobench_lab.physics.fft import fft2_center, ifft2_center
from cryobench_lab.physics.gaussians import project_gaussians, voxelize_gaussians
from cryobench_lab.physics.rotations import random_rotations
from cryobench_lab.physics.shift import phase_ramp

D, APIX, SIGMA_A = 24, 3.0, 5.0
CONF = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "conf")


def _ctf_params(n: int, g: torch.Generator, box: int = D) -> torch.Tensor:
    ctf = torch.zeros(n, 9)
    ctf[:, 0], ctf[:, 1] = box, APIX
    ctf[:, 2] = 8000 + 4000 * torch.rand(n, generator=g)
    ctf[:, 3] = ctf[:, 2] - 200
    ctf[:, 4] = 180 * torch.rand(n, generator=g)
    ctf[:, 5], ctf[:, 6], ctf[:, 7] = 300.0, 2.7, 0.1
    return ctf


def _render(centres: torch.Tensor, rot, t, ctf, box: int = D, sigma: float = SIGMA_A) -> torch.Tensor:
    """Observed images CTF ⊛ analytic projection of unit blobs moved by −t (docs/conventions.md), (B, box, box)."""
    c = centres.double()
    proj = project_gaussians(c, torch.full((len(c),), sigma, dtype=torch.float64), torch.ones(len(c), dtype=torch.float64),
                             rot.double(), box, APIX, shifts=-t.double()).float()
    return ifft2_center(fft2_center(proj) * ctf_image(ctf, box)).real


def _batches(images, rot, t, ctf, labels, size=40):
    n = len(images)
    for s in range(0, n, size):
        sl = slice(s, s + size)
        yield {"images": images[sl], "rot": rot[sl], "trans": t[sl], "ctf": ctf[sl],
               "index": torch.arange(n)[sl], "label": labels[sl]}


def _two_state_data(n_per=60, snr=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = [torch.tensor([[-12.0, 0, 0], [12, 0, 0], [0, 12, 6]]),
              torch.tensor([[-12.0, 0, 0], [9, -12, 9], [0, 0, -18], [12, 15, 0]])]
    imgs, rots, ts, ctfs, labels = [], [], [], [], []
    for s, centres in enumerate(states):
        rot = random_rotations(n_per, generator=g)
        t = (torch.rand(n_per, 2, generator=g) - 0.5) * 2
        ctf = _ctf_params(n_per, g)
        imgs.append(_render(centres, rot, t, ctf))
        rots.append(rot), ts.append(t), ctfs.append(ctf), labels.append(torch.full((n_per,), s))
    clean = torch.cat(imgs)
    noisy = clean + clean.std() / math.sqrt(snr) * torch.randn(clean.shape, generator=g)
    noisy = noisy / noisy.std()
    info = DatasetInfo(n_particles=len(noisy), box_size=D, apix=APIX, has_poses=True)
    return info, (noisy, torch.cat(rots), torch.cat(ts), torch.cat(ctfs), torch.cat(labels))


def _fit(model, data, iterations):
    for _ in range(1 + model.n_pca + iterations):  # initialisation (consensus, PCA passes) + EM iterations
        model.on_train_epoch_start()
        for i, batch in enumerate(_batches(*data)):
            model.training_step(batch, i)
        model.m_step()
    model.on_train_epoch_start()
    for batch in _batches(*data):  # one more E-step records the objective of the last parameters
        model._em_step(batch)
    model.log_likelihood.append(float(model.loglik_sum) + float(model.log_prior_volumes()))
    return model


def _assert_ascent(trace):
    diffs = np.diff(trace)
    assert (diffs >= -1e-6 * np.abs(trace[1:])).all(), trace


@pytest.mark.parametrize("noise", ["image", "global"])
def test_em_objective_increases_every_iteration(noise):
    info, data = _two_state_data()
    model = _fit(MulticlassEM(info, n_classes=2, noise=noise, prior_update=False), data, iterations=6)
    _assert_ascent(model.log_likelihood)
    assert model.log_likelihood[-1] > model.log_likelihood[0]


@pytest.mark.slow
def test_em_with_local_pose_search_ascends_and_classifies():
    info, data = _two_state_data(n_per=150)
    model = _fit(MulticlassEM(info, n_classes=2, prior_update=False, pose_search="local"), data, iterations=3)
    _assert_ascent(model.log_likelihood)
    probs = torch.cat([model.embed(b)["class_probs"] for b in _batches(*data)])
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-4)
    assert classification_metrics(probs.argmax(1), data[4], n_classes=2)["ari"] > 0.9


def _default(name: str, info: DatasetInfo, *overrides: str):
    """``model=name`` at its conf/model/<name>.yaml defaults, with ``overrides`` (Hydra syntax)."""
    from hydra import compose, initialize_config_dir

    from cryobench_lab.config import register_configs
    from cryobench_lab.run import build_model

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("train", overrides=[f"model={name}", "logger=none", *overrides])
    return build_model(cfg, info)


def _fit_all(model, data):
    """The model's own schedule: its ``default_epochs`` (initialisation + EM iterations)."""
    return _fit(model, data, iterations=model.default_epochs - 1 - model.n_pca)


def _ari(model, data, labels) -> float:
    probs = torch.cat([model.embed(b)["class_probs"] for b in _batches(*data)])
    return classification_metrics(probs.argmax(1), labels, n_classes=2)["ari"]


# Two independent changes about a static core (Å): blob A 12 Å up or down in z (inside the mask, the
# variable region of interest), blob B present or absent far from it (outside the mask, a distractor).
CORE = torch.tensor([[0.0, 0, 0], [0, 10, 0], [0, -10, 0]])
A_STATES = (torch.tensor([[16.0, 0, 6]]), torch.tensor([[16.0, 0, -6]]))
B_BLOB = torch.tensor([[-16.0, 6, 0]])


def _focus_data(n=200, snr=1.0, seed=0, distractor=True):
    """Images of the core, A in state a = i % 2 and (with ``distractor``) B where b = (i // 2) % 2 is 1."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.arange(n) % 2, (torch.arange(n) // 2) % 2
    rot, t, ctf = random_rotations(n, generator=g), (torch.rand(n, 2, generator=g) - 0.5) * 2, _ctf_params(n, g)
    imgs = torch.cat([_render(torch.cat([CORE, A_STATES[int(a[i])]] + ([B_BLOB] if distractor and b[i] else [])),
                              rot[i : i + 1], t[i : i + 1], ctf[i : i + 1]) for i in range(n)])
    noisy = imgs + imgs.std() / math.sqrt(snr) * torch.randn(imgs.shape, generator=g)
    info = DatasetInfo(n_particles=n, box_size=D, apix=APIX, has_poses=True)
    return info, (noisy / noisy.std(), rot, t, ctf, a), b


def _mask_around_a(path) -> str:
    """1 within 12 Å of A's mid-point (both of A's positions), cosine edge to 0 at 18 Å; B is 33 Å away."""
    ax = (torch.arange(D) - D // 2).float() * APIX
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    r = torch.sqrt((x - 16.0) ** 2 + y**2 + z**2)
    write_mrc(path, (0.5 * (1 + torch.cos(math.pi * ((r - 12.0) / 6.0).clamp(0, 1)))).numpy(), apix=APIX)
    return str(path)


def test_default_multiclass_classifies_two_states():
    """conf/model/multiclass.yaml as shipped (K = 2 for two states), 300 images at SNR 0.5: ARI 1.0 measured
    (chance 0); the default K = 3 would have to be scored differently."""
    info, data = _two_state_data(n_per=150, snr=0.5)
    model = _fit_all(_default("multiclass", info, "model.n_classes=2"), data)
    assert model.hparams.prior_update and model.hparams.noise == "image" and model.hparams.pose_search == "none"
    assert _ari(model, data, data[4]) > 0.9


def test_focused_classifies_the_masked_region_not_the_stronger_change_outside(tmp_path):
    """A moves under the mask, B comes and goes outside it, independently. Focused classification finds A
    (ARI 0.98 measured; 0.96 on data seed 1) and ignores B; plain multiclass on the same images and settings
    does not find A (ARI 0.00 measured) — the mask and the subtraction are what make it work.

    ``prior_update=false``: at the default (τ² re-estimated every iteration) both collapse to one class on
    these data (see the xfail test below)."""
    info, data, b = _focus_data()
    mask = _mask_around_a(tmp_path / "mask.mrc")
    focused = _default("focused", info, f"model.mask={mask}", "model.n_classes=2", "model.prior_update=false")
    focused.prepare_consensus(list(_batches(*data)))  # Lightning's on_train_start does this in a run
    _fit_all(focused, data)
    assert _ari(focused, data, data[4]) > 0.9
    assert abs(_ari(focused, data, b)) < 0.1
    plain = _fit_all(_default("multiclass", info, "model.n_classes=2", "model.prior_update=false"), data)
    assert _ari(plain, data, data[4]) < 0.5


@pytest.mark.xfail(strict=True, reason="issue 25: with prior_update=true (the default) the first EM iterations "
                   "inflate σ_i and the moment estimate floors τ² of one class, which then empties")
def test_default_multiclass_classifies_a_moving_blob():
    """One blob of four moves 12 Å, 200 images at SNR 1: the default config puts every image in one class
    (measured; also at 300 and 400 images), ``prior_update=false`` separates the states."""
    info, data, _ = _focus_data(distractor=False)
    model = _fit_all(_default("multiclass", info, "model.n_classes=2"), data)
    assert _ari(model, data, data[4]) > 0.9


def test_local_grids_contain_the_given_pose():
    R = local_rotation_grid(2.0)
    assert R.shape == (27, 3, 3)
    assert torch.allclose(R[13], torch.eye(3))
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(27, 3, 3), atol=1e-6)
    assert torch.equal(local_shift_grid(1.5)[4], torch.zeros(2))


def test_subtraction_of_exact_outside_density_leaves_masked_signal(tmp_path):
    """Noise-free: images of inside + outside blobs (analytic projections); subtracting the CTF-modulated
    projection of the voxelised consensus times (1 − mask) leaves the inside blob's image."""
    box, sigma = 32, 4.0
    g = torch.Generator().manual_seed(1)
    inside = torch.tensor([[18.0, 12.0, 0.0]])  # Å
    outside = torch.tensor([[-18.0, -12.0, 6.0], [-6.0, -24.0, -12.0], [18.0, -24.0, 9.0]])  # ≥ 37 Å away
    everything = torch.cat([inside, outside])
    # mask: 1 within 14 Å (3.5 σ) of the inside blob, cosine edge to 0 at 20 Å, so the blobs' tails on the
    # wrong side of the mask hold < 1 % of their mass
    a = (torch.arange(box) - box // 2).float() * APIX
    z, y, x = torch.meshgrid(a, a, a, indexing="ij")
    r = torch.sqrt((x - inside[0, 0]) ** 2 + (y - inside[0, 1]) ** 2 + (z - inside[0, 2]) ** 2)
    mask = 0.5 * (1 + torch.cos(math.pi * ((r - 14.0) / 6.0).clamp(0, 1)))
    write_mrc(tmp_path / "mask.mrc", mask.numpy(), apix=APIX)
    n = 12
    rot, t = random_rotations(n, generator=g), (torch.rand(n, 2, generator=g) - 0.5) * 4
    ctf = _ctf_params(n, g, box)
    batch = {"images": _render(everything, rot, t, ctf, box, sigma), "rot": rot, "trans": t, "ctf": ctf,
             "index": torch.arange(n), "label": torch.zeros(n, dtype=torch.long)}
    consensus = APIX * voxelize_gaussians(everything.double(), torch.full((4,), sigma, dtype=torch.float64),
                                          torch.ones(4, dtype=torch.float64), box, APIX).float()
    info = DatasetInfo(n_particles=n, box_size=box, apix=APIX, has_poses=True)
    model = FocusedClassification(info, mask=str(tmp_path / "mask.mrc"), n_classes=1)
    model.prepare_consensus([batch], consensus=consensus)
    got = model.subtracted_spectra(batch)  # re-centred
    expected = fft2_center(_render(inside, rot, t, ctf, box, sigma)) * phase_ramp(t, box)
    before = fft2_center(batch["images"]) * phase_ramp(t, box)
    err = (got - expected).abs().norm() / expected.abs().norm()
    # what remains is the voxelised-vs-analytic projection difference (3 % for one blob, measured)
    assert err < 0.05, float(err)
    assert (before - expected).abs().norm() / expected.abs().norm() > 1.5  # there was much to subtract


def test_focused_requires_mask():
    from cryobench_lab.errors import InputError

    info = DatasetInfo(n_particles=4, box_size=D, apix=APIX, has_poses=True)
    with pytest.raises(InputError, match="model.mask"):
        FocusedClassification(info)


def test_mask_from_chains_covers_the_chain(tmp_path):
    from cryobench_lab.data.simulate import read_states
    from cryobench_lab.make_mask import main, mask_from_chains

    pdb = next((p for p in (__import__("cryobench_lab").__path__[0],)), None) + "/structures/pdb3hsy.pdb.gz"
    state = read_states(pdb)[0]
    centre = np.average(state.coords, axis=0, weights=state.atomic_numbers)
    box, apix = 48, 3.0
    mask = mask_from_chains(pdb, ["B"], box, apix, center=tuple(centre))
    idx = np.round((state.coords - centre) / apix).astype(int) + box // 2  # [x, y, z] voxel of each atom
    values = mask.numpy()[idx[:, 2], idx[:, 1], idx[:, 0]]
    chain_b = state.chain_ids == "B"
    assert (values[chain_b] > 0.99).mean() > 0.99
    assert values[~chain_b].mean() < 0.5  # chain A is mostly outside
    main(["--structure", pdb, "--chains", "B", "--box-size", str(box), "--apix", str(apix),
          "--center", *map(str, centre), "--out", str(tmp_path / "m.mrc")])
    with mrcfile.open(tmp_path / "m.mrc") as m:
        assert np.allclose(m.data, mask.numpy(), atol=1e-6)
        assert float(m.voxel_size.x) == pytest.approx(apix)
