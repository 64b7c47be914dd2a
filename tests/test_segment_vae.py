"""Segment VAE (cryoSPHERE) and its ablations: rendering, transforms, segmentation, training, configs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from cryobench_lab.config import register_configs
from cryobench_lab.data.particles import DatasetInfo
from cryobench_lab.models.components import atoms
from cryobench_lab.models.components.atoms import (
    local_frames,
    move_by_segments,
    move_per_residue,
    project_residues,
    quaternion_vector_to_matrix,
)
from cryobench_lab.models.components.segmentation import FixedSegmentation, GMMSegmentation, block_labels
from cryobench_lab.models.segment_vae import SegmentVAE, write_models
from cryobench_lab.physics.ctf import ctf_from_params
from cryobench_lab.physics.fft import fft2_center, ifft2_center
from cryobench_lab.physics.gaussians import atom_amplitudes, band_limited_sigma, project_gaussians, voxelize_gaussians
from cryobench_lab.physics.lattice import freq_grid_2d
from cryobench_lab.physics.rotations import random_rotations
from cryobench_lab.run import build_model

ADK = Path(__file__).resolve().parents[1] / "src" / "cryobench_lab" / "structures" / "adk" / "adk_closed.pdb.gz"
CONF = Path(__file__).resolve().parents[1] / "conf"
D, APIX = 32, 2.5
EXACT = "donot_use_mm_for_euclid_dist"  # cdist without the |x|² + |y|² − 2xy shortcut (float32 cancellation)


def _info(n: int = 64) -> DatasetInfo:
    return DatasetInfo(n_particles=n, box_size=D, apix=APIX, has_poses=True, labels=np.arange(n) % 2, structure=str(ADK))


def _ctf_params(B: int) -> torch.Tensor:
    row = torch.tensor([D, APIX, 15000.0, 14500.0, 30.0, 300.0, 2.7, 0.1, 0.0])
    return row.expand(B, 9).clone()


def _two_conformation_batch(model: SegmentVAE, B: int = 64, seed: int = 0, views: int | None = None) -> dict:
    """Noisy CTF images of the base and of the base with its last third moved 6 Å along x, unit std; label 1
    for the moved one. Poses uniform, or drawn from a fixed set of ``views`` random rotations."""
    g = torch.Generator().manual_seed(seed)
    n = model.coords0.shape[0]
    moved = model.coords0.clone()
    moved[2 * n // 3 :, 0] += 6.0
    labels = torch.arange(B) % 2
    coords = torch.where(labels[:, None, None] == 1, moved, model.coords0) + model.offset  # (B, n, 3)
    if views is None:
        rot = random_rotations(B, generator=g)
    else:
        rot = random_rotations(views, generator=torch.Generator().manual_seed(123))[torch.randint(0, views, (B,), generator=g)]
    trans = (torch.rand(B, 2, generator=g) - 0.5) * 4
    ctf = _ctf_params(B)
    img = project_gaussians(coords, model.sigmas, model.amplitudes, rot, D, APIX, -trans)
    img = ifft2_center(fft2_center(img) * ctf_from_params(freq_grid_2d(D, APIX)[None], ctf)).real
    img = img + 0.3 * img.std() * torch.randn(img.shape, generator=g)
    img = img / img.std()
    return {"images": img, "rot": rot, "trans": trans, "ctf": ctf, "index": torch.arange(B), "label": labels}


@pytest.fixture(scope="module")
def model() -> SegmentVAE:
    return SegmentVAE(_info(), n_segments=6, encoder_hidden=64, decoder_hidden=64, encoder_layers=1, decoder_layers=2)


def test_undeformed_rendering_is_project_gaussians(model):
    """At z with zero transforms (the decoder's initial state), render = CTF · project_gaussians(base)."""
    batch = _two_conformation_batch(model, B=4)
    coords = model.deform(torch.zeros(4, 8))
    torch.testing.assert_close(coords, model.coords0.expand(4, -1, -1))
    base = torch.from_numpy(model.base.structure.residue_coords)
    ref = project_gaussians(base, torch.full((len(base),), 2.0), model.amplitudes, batch["rot"], D, APIX, -batch["trans"])
    ref = ifft2_center(fft2_center(ref) * model.ctf(batch)).real
    torch.testing.assert_close(model.render(coords, batch), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_identity_transforms_leave_coordinates_unchanged():
    x = torch.randn(50, 3) * 10
    B, K = 3, 4
    rot = quaternion_vector_to_matrix(torch.zeros(B, K, 3))
    torch.testing.assert_close(rot, torch.eye(3).expand(B, K, 3, 3))
    w = torch.softmax(torch.randn(50, K), 1)
    torch.testing.assert_close(move_by_segments(x, w, rot, torch.zeros(B, K, 3)), x.expand(B, -1, -1))
    origins, axes = local_frames(x)
    torch.testing.assert_close(axes.transpose(1, 2) @ axes, torch.eye(3).expand(50, 3, 3), atol=1e-5, rtol=0)
    rot_r = quaternion_vector_to_matrix(torch.zeros(B, 50, 3))
    torch.testing.assert_close(move_per_residue(x, origins, axes, rot_r, torch.zeros(B, 50, 3)), x.expand(B, -1, -1), atol=1e-4, rtol=0)


def test_one_segment_moves_rigidly():
    """A rotation of the only segment rotates every residue about the origin; translations add."""
    x = torch.randn(20, 3) * 10
    v = torch.tensor([[[0.0, 0.0, 1.0]]])  # quaternion (1, 0, 0, 1): 90° about z
    R = quaternion_vector_to_matrix(v)
    out = move_by_segments(x, torch.ones(20, 1), R, torch.tensor([[[1.0, 2.0, 3.0]]]))
    expected = torch.stack([-x[:, 1], x[:, 0], x[:, 2]], 1) + torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)


def test_segmentation_is_a_partition():
    seg = GMMSegmentation(214, 20)
    for sample in (False, True):
        w = seg(sample)
        assert w.shape == (214, 20) and (w >= 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones(214))
    # starts at contiguous equal blocks, like the fixed segmentation
    assert (seg.labels() == block_labels(214, 20)).float().mean() > 0.95
    assert (FixedSegmentation(214, 20).labels() == block_labels(214, 20)).all()
    assert torch.bincount(block_labels(214, 20)).min() >= 10
    assert float(seg.kl().detach()) >= 0 and FixedSegmentation(214, 20).kl() == 0


def test_clash_term_finite_and_zero_without_clash(model):
    spread = model.coords0[None] * 10.0  # every pair far apart
    assert float(model.clash(spread)) == 0.0
    collapsed = torch.zeros(1, *model.coords0.shape, requires_grad=True)  # every pair at d = 0
    c = model.clash(collapsed)
    c.backward()
    assert torch.isfinite(c) and torch.isfinite(collapsed.grad).all() and float(c) > 0
    assert float(model.continuity(model.coords0[None])) == 0.0


def test_clash_term_equals_the_all_pairs_sum(model):
    """The sparse evaluation (close pairs found without gradient) equals the dense formula, value and gradient."""
    g = torch.Generator().manual_seed(3)
    squeezed = (model.coords0[None] * 0.45 + 0.3 * torch.randn(2, *model.coords0.shape, generator=g)).requires_grad_()
    c2 = model.hparams.clash_threshold**2
    d2 = ((squeezed[:, :, None] - squeezed[:, None]) ** 2).sum(-1)  # (B, n, n)
    dense = (torch.relu(c2 - d2[:, model.clash_pairs]) ** 2 / c2**2).mean()
    (g_dense,) = torch.autograd.grad(dense, squeezed)
    sparse = model.clash(squeezed)
    (g_sparse,) = torch.autograd.grad(sparse, squeezed)
    assert float(dense) > 0
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=0)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-6 * float(g_dense.abs().max()))


@pytest.mark.parametrize("mode", ["learned", "fixed", "per_residue"])
def test_training_lowers_the_loss(mode):
    torch.manual_seed(0)
    m = SegmentVAE(_info(), mode=mode, n_segments=3, encoder_hidden=64, decoder_hidden=64, encoder_layers=1,
                   decoder_layers=2, lr=2e-3, seg_lr=2e-3, kl_warmup=0.0, clash_weight=0.1, continuity_weight=0.01)
    batch = _two_conformation_batch(m, B=32)
    opt = m.configure_optimizers()
    m.eval()
    first = float(m.losses(batch)["loss"])
    m.train()
    for _ in range(15):
        loss = m.losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    last = float(m.losses(batch)["loss"])
    assert last < first - 1e-3, (first, last)
    if m.segmentation is not None:
        torch.testing.assert_close(m.segmentation(True).sum(1), torch.ones(m.coords0.shape[0]))


def test_latent_separates_two_conformations():
    """Two conformations of AdK (last third moved 6 Å), four views: after 100 steps on 256 images, 2-means on
    the posterior means of 128 held-out images recovers the conformations (ARI 1.0 measured at 90 steps;
    −0.01 before training). Uniform poses need far more data or steps than a test has (ARI 0.3 here): the
    encoder must learn to ignore the view."""
    from cryobench_lab.metrics.classes import classification_metrics
    from cryobench_lab.models.components.parts import kmeans_pp

    torch.manual_seed(0)
    m = SegmentVAE(_info(256), n_segments=3, encoder_hidden=64, decoder_hidden=64, encoder_layers=1,
                   decoder_layers=2, lr=2e-3, seg_lr=2e-3, kl_warmup=0.0)
    train = [_two_conformation_batch(m, B=64, seed=s, views=4) for s in range(4)]
    held_out = _two_conformation_batch(m, B=128, seed=99, views=4)
    opt = m.configure_optimizers()
    m.train()
    for step in range(100):
        loss = m.losses(train[step % 4])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        z = m.embed(held_out)["latent"]  # (128, 8)
    clusters, _ = kmeans_pp(z.numpy(), 2, seed=0)
    assert classification_metrics(torch.as_tensor(clusters), held_out["label"], n_classes=2)["ari"] > 0.9


def test_decode_and_structure_contract(model):
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    coords = model.structure(z)
    assert coords.shape == (2, model.coords0.shape[0], 3)
    residues = SegmentVAE(_info(), n_segments=6, encoder_hidden=64, decoder_hidden=64, encoder_layers=1,
                          decoder_layers=2, volume="residues")
    residues.load_state_dict(model.state_dict())
    vols = residues.decode(z, None)
    assert vols.shape == (2, D, D, D)
    torch.testing.assert_close(vols[0], voxelize_gaussians(coords[0], model.sigmas, model.amplitudes, D, APIX))
    atoms = model.structure(z, atoms=True)  # (2, n_atoms, 3)
    sigma = band_limited_sigma(APIX)
    ref = voxelize_gaussians(atoms[1], torch.full_like(model.atom_numbers, sigma), atom_amplitudes(model.atom_numbers, sigma), D, APIX)
    torch.testing.assert_close(model.decode(z, None)[1], ref)
    emb = model.embed(_two_conformation_batch(model, B=3))
    assert emb["latent"].shape == (3, 8) and emb["class_probs"] is None


@pytest.mark.parametrize("mode", ["learned", "per_residue"])
def test_atoms_move_rigidly_with_their_residues(mode):
    m = SegmentVAE(_info(), mode=mode, n_segments=6, encoder_hidden=64, decoder_hidden=64, encoder_layers=1, decoder_layers=2)
    with torch.no_grad():  # large motions, so that a wrong residue or frame per atom shows
        m.decoder[-1].weight.mul_(20.0)
        m.decoder[-1].bias.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(1))
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    atoms, residues = m.structure(z, atoms=True), m.structure(z)
    # the representative atoms (Cα) land exactly on the residue coordinates
    torch.testing.assert_close(atoms[:, torch.from_numpy(m.base.structure.residue_atom_index)], residues, atol=1e-4, rtol=0)
    assert (residues - (m.coords0 + m.offset)).norm(dim=-1).median() > 2.0
    # within a segment (per_residue: within a residue), interatomic distances are those of the base
    if mode == "per_residue":
        group, sharp = m.atom_residue, torch.ones(len(m.atom_residue), dtype=torch.bool)
    else:  # residues with one dominant segment (boundary residues blend two transforms)
        w = m.segmentation(False)[m.atom_residue]  # (n_atoms, K)
        group, sharp = w.argmax(1), w.max(1).values > 1 - 1e-6
    same = (group[:, None] == group[None, :]) & sharp[:, None] & sharp[None, :]
    assert same.sum() > 4 * len(group)  # not just each atom with itself
    base = torch.cdist(m.atom_coords0, m.atom_coords0, compute_mode=EXACT)[same]
    for frame in atoms:
        torch.testing.assert_close(torch.cdist(frame, frame, compute_mode=EXACT)[same], base, atol=2e-3, rtol=0)


@pytest.mark.parametrize("mode", ["learned", "per_residue"])
def test_identity_transforms_give_the_simulators_volume_of_the_base(mode):
    from cryobench_lab.data.simulate import blur_sigma, read_states, render_volume

    m = SegmentVAE(_info(), mode=mode, n_segments=6, encoder_hidden=64, decoder_hidden=64, encoder_layers=1, decoder_layers=2)
    with torch.no_grad():
        m.decoder[-1].weight.zero_()
        m.decoder[-1].bias.zero_()  # quaternion vector part 0, translation 0: every segment stays put
    truth = render_volume(read_states(ADK, frame="t")[0], np.zeros(3), D, APIX, blur_sigma(APIX))
    vol = m.decode(torch.zeros(1, 8), None)[0]
    assert float((vol - truth).abs().max()) < 1e-4 * float(truth.max())


def test_models_written_with_every_atom_and_its_segment(model, tmp_path):
    import gemmi

    coords = model.structure(torch.randn(3, 8, generator=torch.Generator().manual_seed(3)), atoms=True).numpy()
    labels = model.segment_labels()[model.base.atom_residue].astype(float)
    write_models(tmp_path / "t.pdb", model.base.structure.gemmi_structure, coords, labels)
    st = gemmi.read_structure(str(tmp_path / "t.pdb"))
    assert len(st) == 3
    for m in range(3):
        atoms = [a for ch in st[m] for r in ch for a in r]
        assert len(atoms) == coords.shape[1]
        np.testing.assert_allclose([a.b_iso for a in atoms], labels, atol=0.01)
        np.testing.assert_allclose([a.pos.tolist() for a in atoms], coords[m], atol=1e-3)
    names = [(r.name, a.name) for ch in st[0] for r in ch for a in r]
    assert names == [(r.name, a.name) for ch in model.base.structure.gemmi_structure[0] for r in ch for a in r]


@pytest.mark.parametrize("name,mode", [("segvae", "learned"), ("segvae_fixedseg", "fixed"),
                                       ("segvae_perresidue", "per_residue"), ("segvae_paper", "learned")])
def test_configs_instantiate(name, mode):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=[f"model={name}", "logger=none"])
    m = build_model(cfg, _info())
    assert isinstance(m, SegmentVAE) and m.mode == mode and m.hparams.name == name


def test_project_residues_matches_project_gaussians():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(5, 40, 3, generator=g) * 15
    rot = random_rotations(5, generator=g)
    shifts = torch.randn(5, 2, generator=g)
    amps = torch.rand(40, generator=g) * 60
    ref = project_gaussians(centers, torch.full((40,), 2.0), amps, rot, D, APIX, shifts)
    # centres are rounded to 1/16384 px (≤ 3.1e-5 px): at σ = 0.8 px a pixel moves by ≤ ~1.5e-5 of the peak
    torch.testing.assert_close(project_residues(centers, 2.0, amps, rot, D, APIX, shifts), ref, rtol=0, atol=3e-5 * float(ref.max()))


def test_project_residues_is_exact_for_centres_on_its_subpixel_grid():
    """Centres whose projections sit on the 1/16384-px grid are not rounded: the renderer equals the
    physics projection to float64 round-off and the ±5σ tails (6e-7 of the peak), far outside the box too."""
    g = torch.Generator().manual_seed(3)
    grid = APIX / atoms._SUBPIXEL  # Å
    centers = torch.randint(-24 * atoms._SUBPIXEL, 24 * atoms._SUBPIXEL, (4, 50, 3), generator=g).double() * grid
    amps = (torch.rand(50, generator=g) * 60).double()
    rot = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)  # the projection of (x, y, z) is (x, y)
    ref = project_gaussians(centers, torch.full((50,), 2.0, dtype=torch.float64), amps, rot, D, APIX)
    torch.testing.assert_close(project_residues(centers, 2.0, amps, rot, D, APIX), ref, rtol=0, atol=1e-6 * float(ref.max()))


def test_project_residues_gradient_matches_autograd_of_project_gaussians():
    """The hand-written backward equals autograd through the physics renderer (float64)."""
    g = torch.Generator().manual_seed(2)
    centers = (torch.randn(3, 30, 3, generator=g) * 12).double().requires_grad_()
    rot = random_rotations(3, generator=g).double()
    shifts = torch.randn(3, 2, generator=g).double()
    amps = (torch.rand(30, generator=g) * 60).double()
    weights = torch.randn(3, D, D, generator=g).double()
    ref = project_gaussians(centers, torch.full((30,), 2.0, dtype=torch.float64), amps, rot, D, APIX, shifts)
    (expected,) = torch.autograd.grad((ref * weights).sum(), centers)
    out = project_residues(centers, 2.0, amps, rot, D, APIX, shifts)
    (got,) = torch.autograd.grad((out * weights).sum(), centers)
    # exact derivatives at the unrounded centres, with the forward's factors (centres rounded to 1/16384 px)
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-5 * float(expected.abs().max()))


def test_half_spectrum_ctf_equals_the_centred_full_spectrum_filter(model):
    """apply_ctf (rfft2 grid) = ifft2_center(fft2_center(x) · CTF).real on white noise, Nyquist lines included."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, D, D, generator=g)
    params = _ctf_params(3)
    params[:, 4] = torch.tensor([10.0, 75.0, 140.0])  # astigmatism angles: CTF(kx, ky) ≠ CTF(−kx, ky)
    ref = ifft2_center(fft2_center(x) * ctf_from_params(freq_grid_2d(D, APIX)[None], params)).real
    torch.testing.assert_close(model.apply_ctf(x, params), ref, rtol=0, atol=1e-5)


def test_fit_base_docks_the_base_into_a_map_and_survives_a_checkpoint():
    from cryobench_lab.data.simulate import blur_sigma, read_states, render_volume

    pdb = ADK.parent / "pdb1ake.pdb.gz"  # the crystal structure, in its own frame
    info = DatasetInfo(n_particles=8, box_size=48, apix=2.0, has_poses=True, structure=str(pdb))
    m = SegmentVAE(info, n_segments=6, encoder_hidden=32, decoder_hidden=32, encoder_layers=1, decoder_layers=1, fit_base=True)
    start = (m.atom_coords0 + m.offset).double()
    Q = random_rotations(1, torch.Generator().manual_seed(5), dtype=torch.float64)[0]
    target = (start - start.mean(0)) @ Q.T + torch.tensor([2.0, -3.0, 1.5], dtype=torch.float64)  # Å from box centre
    state = read_states(pdb, frame="t")[0]
    density = render_volume(state.with_coords(target.numpy(), "t", "t"), np.zeros(3), 48, 2.0, blur_sigma(2.0))
    m.dock_base(torch.as_tensor(density))
    def rms(a, b):
        return float(((a.double() - b.double()) ** 2).sum(-1).mean().sqrt())
    assert rms(start, target) > 10.0
    assert rms(m.atom_coords0 + m.offset, target) < 0.5  # Å
    ca = torch.from_numpy(m.base.structure.atom_coords[m.base.structure.residue_atom_index] - m.base.origin)
    assert rms(m.base_structure(), (ca.double() @ m.fit_rotation.double().T) + m.offset.double()) < 1e-3
    assert bool(m.base_fitted)
    # a fresh model loading the checkpoint has the docked base (atom coordinates are not in the state dict)
    fresh = SegmentVAE(info, n_segments=6, encoder_hidden=32, decoder_hidden=32, encoder_layers=1, decoder_layers=1, fit_base=True)
    ckpt = {"state_dict": {k: v.clone() for k, v in m.state_dict().items()}}
    fresh.load_state_dict(ckpt["state_dict"])
    assert rms(fresh.atom_coords0 + fresh.offset, m.atom_coords0 + m.offset) < 1e-4
    # an old checkpoint (before fit_base) still loads, undocked
    old = {"state_dict": {k: v for k, v in SegmentVAE(info, n_segments=6, encoder_hidden=32, decoder_hidden=32,
           encoder_layers=1, decoder_layers=1).state_dict().items() if k not in ("fit_rotation", "base_fitted")}}
    fresh.load_state_dict(old["state_dict"])
    assert rms(fresh.atom_coords0 + fresh.offset, start) < 1e-4
