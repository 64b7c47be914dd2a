"""Ab initio poses: hierarchical search, refinement of pose tables, alignment to the truth with handedness."""

from __future__ import annotations

import math

import pytest
import torch

from cryobench_lab.metrics.alignment import (
    FLIP,
    _mirror,
    align_rotations,
    align_volumes,
    apply_alignment,
    pose_scores,
    shift_errors,
)
from cryobench_lab.metrics.fsc import fsc_summary
from cryobench_lab.physics.fft import fft2_center, fft3_center, ifft2_center
from cryobench_lab.physics.lattice import freq_grid_3d
from cryobench_lab.physics.rotations import axis_angle_to_matrix, geodesic_distance, random_rotations
from cryobench_lab.physics.shift import phase_shift_2d
from cryobench_lab.physics.slicing import insert_slices, project_volume, volume_spectrum
from cryobench_lab.physics.rotations import so3_grid
from cryobench_lab.physics.slicing import sample_spectrum
from cryobench_lab.poses.search import PoseSearch, SearchConfig, band_points
from cryobench_lab.poses.source import SearchedPoses, build_pose_source


def blobs(D: int, n: int = 10, seed: int = 0) -> torch.Tensor:
    """An asymmetric volume (D, D, D) of Gaussian blobs inside the central half of the box."""
    g = torch.Generator().manual_seed(seed)
    x = freq_grid_3d(D).float()
    vol = torch.zeros(D, D, D)
    for _ in range(n):
        c = (torch.rand(3, generator=g) - 0.5) * D * 0.45
        s = D / 32 * (1.0 + 1.5 * float(torch.rand(1, generator=g)))
        vol += float(torch.rand(1, generator=g) + 0.5) * torch.exp(-((x - c) ** 2).sum(-1) / (2 * s**2))
    return vol


@pytest.fixture(scope="module")
def scene():
    """Noise-free images of a known volume at D = 32 under random poses and re-centring shifts."""
    D, B = 32, 24
    g = torch.Generator().manual_seed(1)
    vol = blobs(D)
    rot = random_rotations(B, generator=g)
    trans = (torch.rand(B, 2, generator=g) - 0.5) * 4  # px
    images = project_volume(vol, rot, shifts=-trans)  # observed = shift(projection, −t)
    return {"D": D, "vol": vol, "rot": rot, "trans": trans, "spectra": fft2_center(images)}


def test_so3_grid_is_quasi_uniform():
    grid = so3_grid(15.0)
    assert 4000 < len(grid) < 5000
    assert torch.allclose(grid @ grid.transpose(-1, -2), torch.eye(3).expand_as(grid), atol=1e-5)
    # every random rotation is within about the grid spacing of a grid point
    probe = random_rotations(200, generator=torch.Generator().manual_seed(0))
    nearest = geodesic_distance(probe[:, None], grid[None]).min(1).values
    assert nearest.max() < 15.0


def test_sample_spectrum_matches_slices_of_an_exact_lattice(scene):
    """At integer frequencies × pad the oversampled spectrum is sampled exactly: identity pose, no interpolation."""
    D = scene["D"]
    spec = volume_spectrum(scene["vol"], 2)
    pts = band_points(D, D / 2)
    coords = torch.cat([pts["freqs"], torch.zeros(len(pts["freqs"]), 1)], -1)
    proj = fft2_center(project_volume(scene["vol"], torch.eye(3)[None]))[0]
    got = sample_spectrum(spec, coords, 2)
    assert torch.allclose(got, proj[pts["iy"], pts["ix"]], rtol=1e-3, atol=1e-3 * proj.abs().max())


def test_search_recovers_known_poses_noise_free(scene):
    search = PoseSearch(volume_spectrum(scene["vol"], 2), scene["D"], config=SearchConfig(max_radius=1.0, levels=4, n_keep=8))
    out = search.search(scene["spectra"])
    err = geodesic_distance(out["rot"], scene["rot"])
    assert err.max() < 2.5 and err.median() < 1.5  # final local step 1.9°: within a step of the truth
    assert (out["trans"] - scene["trans"]).norm(dim=-1).max() < 0.3
    # local search from a pose 5° off finds it again
    g = torch.Generator().manual_seed(2)
    off = axis_angle_to_matrix(torch.nn.functional.normalize(torch.randn(len(err), 3, generator=g), dim=-1)
                               * math.radians(5.0)) @ scene["rot"]
    local = search.local(scene["spectra"], None, None, off, scene["trans"] + 0.7)
    assert geodesic_distance(local["rot"], scene["rot"]).max() < 2.5
    assert (local["trans"] - scene["trans"]).norm(dim=-1).max() < 0.3


def test_refinement_reduces_pose_error(scene):
    """SGD on the pose tables (the model's loss, here E against the known volume) moves poses to the truth."""
    D, B = scene["D"], len(scene["rot"])
    poses = SearchedPoses(B, 1, D, 1.0, {"pretrain_epochs": 0, "global_epochs": 0, "local_epochs": 0, "lr_rot": 0.005,
                                         "lr_trans": 0.05})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        poses.rot[:, 0] = axis_angle_to_matrix(torch.randn(B, 3, generator=g) * math.radians(3.0)) @ scene["rot"]
        poses.trans.copy_(scene["trans"] + torch.randn(B, 2, generator=g) * 0.5)
    spec = volume_spectrum(scene["vol"], 2)
    pts = band_points(D, D / 4)
    opt = torch.optim.SparseAdam(poses.param_groups())
    index = torch.arange(B)
    batch = {"index": index}
    before = geodesic_distance(poses.estimates()[0][:, 0], scene["rot"]).median()
    shift_before = (poses.estimates()[1] - scene["trans"]).norm(dim=-1).median()
    for _ in range(40):
        rot, trans = poses(batch)  # (B, 3, 3), (B, 2): phase "refine"
        Y = scene["spectra"][:, pts["iy"], pts["ix"]]
        Y = Y * torch.polar(torch.ones(()), -2 * math.pi / D * (trans @ pts["freqs"].T))  # re-centred
        pred = sample_spectrum(spec, pts["freqs"] @ rot[:, :2, :], 2)
        loss = (Y - pred).abs().square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = geodesic_distance(poses.estimates()[0][:, 0], scene["rot"]).median()
    shift_after = (poses.estimates()[1] - scene["trans"]).norm(dim=-1).median()
    assert after < 0.5 * before
    assert shift_after < 0.5 * shift_before


def test_align_rotations_finds_frame_and_mirror_with_outliers():
    g = torch.Generator().manual_seed(4)
    N = 300
    R_true = random_rotations(N, generator=g)
    A = random_rotations(1, generator=g)[0]
    R_est = FLIP @ (R_true @ A) @ FLIP  # the mirror reconstruction's poses in its own frame
    R_est = axis_angle_to_matrix(torch.randn(N, 3, generator=g) * 0.01) @ R_est
    R_est[:60] = random_rotations(60, generator=g)  # 20% wrong
    out = align_rotations(R_est, R_true)
    assert out["flipped"]
    assert geodesic_distance(out["A"], A) < 1.0
    assert out["median_error"] < 2.0
    assert (out["errors"][:60] > 10).float().mean() > 0.9


def test_shift_errors_remove_the_volume_offset():
    g = torch.Generator().manual_seed(5)
    R = random_rotations(100, generator=g)
    t_true = torch.randn(100, 2, generator=g)
    d = torch.tensor([1.0, -2.0, 0.5])
    out = shift_errors(t_true + R[:, :2, :] @ d, t_true, R)
    assert torch.allclose(out["offset"], d, atol=1e-4)
    assert out["median_error"] < 1e-4


def test_pose_scores_per_class():
    g = torch.Generator().manual_seed(6)
    N = 60
    R_true = random_rotations(N, generator=g)
    est = torch.stack([R_true @ random_rotations(1, generator=g)[0], random_rotations(N, generator=g)], 1)  # (N, K)
    classes = torch.tensor([0] * 40 + [1] * 20)
    out = pose_scores(est, torch.zeros(N, 2), R_true, torch.zeros(N, 2), classes)
    assert out["rot_error_median_per_class"][0] < 1e-2
    assert out["rot_error_median_per_class"][1] > 20
    assert out["rot_flipped_per_class"][0] is False


def test_mirror_aware_alignment_finds_a_planted_flip():
    D = 20
    vol = blobs(D, n=8, seed=7)
    A = random_rotations(1, generator=torch.Generator().manual_seed(8))[0]
    planted = apply_alignment(vol, A, torch.tensor([1.5, -1.0, 0.5]), flipped=True)  # mirrored, turned, moved
    out = align_volumes(planted, vol, n_keep=2, levels=4)
    assert out["flipped"]
    assert out["score"] > 0.98
    unaligned = fsc_summary(planted, vol, 1.0)["auc"]
    aligned = fsc_summary(out["aligned"], vol, 1.0)["auc"]
    assert aligned > 0.4 > unaligned  # a perfect curve is (D/2 − 1)/D = 0.45


@pytest.mark.slow
def test_alignment_of_an_unflipped_volume_keeps_its_hand():
    D = 20
    vol = blobs(D, n=8, seed=7)
    A = random_rotations(1, generator=torch.Generator().manual_seed(8))[0]
    out = align_volumes(apply_alignment(vol, A, torch.zeros(3), flipped=False), vol, n_keep=2, levels=4)
    assert not out["flipped"] and out["score"] > 0.98


def test_mirror_is_the_z_flip_about_the_box_centre():
    vol = blobs(16, n=4, seed=9)
    m = _mirror(vol)
    assert torch.equal(m[16 // 2], vol[16 // 2])  # the central z plane stays
    assert torch.equal(m[16 // 2 + 3], vol[16 // 2 - 3])


def test_build_pose_source():
    assert type(build_pose_source(None, 4, 1, 16, 1.0, has_poses=True)).__name__ == "KnownPoses"
    with pytest.raises(ValueError, match="poses=search"):
        build_pose_source({"source": "given"}, 4, 1, 16, 1.0, has_poses=False)
    src = build_pose_source({"source": "search", "n_keep": 3, "global_epochs": 1}, 4, 2, 16, 1.0, has_poses=False)
    assert src.schedule.search.n_keep == 3 and src.schedule.phase(1) == "global" and src.schedule.phase(4) == "refine"
    rot, trans = src({"index": torch.arange(4)})
    assert rot.shape == (4, 2, 3, 3) and trans.shape == (4, 2)


def test_searched_poses_search_only_the_classes_asked_for(scene):
    """A global search epoch finds the poses in class 0 (the true volume); images the model restricts to
    class 0 keep their previous class-1 rotations, the others are searched in class 1 too."""
    D, B = scene["D"], len(scene["rot"])
    poses = build_pose_source({"source": "search", "pretrain_epochs": 0, "global_epochs": 1, "max_radius": 1.0,
                               "levels": 4, "n_keep": 8}, B, 2, D, 1.0, has_poses=False)
    before = poses.rot.clone()
    other = blobs(D, seed=5)
    spectra = {0: fft3_center(scene["vol"]), 1: fft3_center(other)}  # (D, D, D) [z, y, x], centred
    restricted = torch.arange(B) % 2 == 0

    def values(coords, k):
        idx = coords.long() + D // 2
        return spectra[k][idx[:, 2], idx[:, 1], idx[:, 0]]

    poses.attach(values, None, lambda: 0, lambda index: torch.stack([torch.ones_like(restricted[index]),
                                                                    ~restricted[index]], 1))
    images = ifft2_center(scene["spectra"]).real
    poses({"index": torch.arange(B), "images": images})
    rot, trans = poses.estimates()
    assert geodesic_distance(rot[:, 0], scene["rot"]).max() < 2.5
    assert (trans - scene["trans"]).norm(dim=-1).max() < 0.3  # the shift of class 0, where the images fit
    assert torch.equal(rot[restricted, 1], before[restricted, 1])
    assert not torch.isclose(rot[~restricted, 1], before[~restricted, 1]).all(-1).all(-1).any()


def test_table_reference_tracks_the_pose_table_and_replaces_the_field(scene):
    """With ``reference: table`` the Fourier sums always equal a fresh backprojection of the current pose
    table (the images leave at their old poses and join at the new ones), and from the second searched epoch
    the search uses them: a zero field there would leave the poses undetermined, the table keeps them."""
    D, B = scene["D"], len(scene["rot"])
    poses = build_pose_source({"source": "search", "pretrain_epochs": 0, "global_epochs": 2, "max_radius": 1.0,
                               "levels": 4, "n_keep": 8, "render_every": 1, "field_epochs": 1}, B, 1, D, 1.0, has_poses=False)
    truth = fft3_center(scene["vol"])  # (D, D, D) [z, y, x], centred
    epoch = {"now": 0}

    def values(coords, k):
        idx = coords.long() + D // 2
        field = truth[idx[:, 2], idx[:, 1], idx[:, 0]]
        return field if epoch["now"] == 0 else torch.zeros_like(field)

    poses.attach(values, None, lambda: epoch["now"])
    images = ifft2_center(scene["spectra"]).real
    Db = poses.table_num.shape[-1]
    lo = D // 2 - Db // 2
    for now in (0, 1):
        epoch["now"] = now
        for half in (torch.arange(0, B, 2), torch.arange(1, B, 2)):  # two batches: the second sees a rebuilt table
            poses({"index": half, "images": images[half]})
        rot, trans = poses.poses(torch.arange(B), refined=False)
        err = geodesic_distance(rot[:, 0], scene["rot"])
        # 23 other images' slices fill the table's Fourier box sparsely: coarser than the exact volume
        assert err.max() < (2.5 if now == 0 else 10.0) and err.median() < (2.5 if now == 0 else 5.0)
        spectra = phase_shift_2d(scene["spectra"], trans)[:, lo : lo + Db, lo : lo + Db]
        num, den = insert_slices(spectra, rot[:, 0], torch.ones(spectra.shape), vol_box=Db)
        assert torch.allclose(poses.table_num[0].sum(0), num, atol=1e-3 * num.abs().max())
        assert torch.allclose(poses.table_den[0].sum(0), den, atol=1e-4 * den.max())
    assert (poses.table_class == 0).all()
