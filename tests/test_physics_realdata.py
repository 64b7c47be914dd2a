"""Pose, shift, scale and contrast conventions pinned against stacks written by cryoDRGN's authors.

Findings that shaped these tests (measured on the files in ../shared/data/cryoem):

- synthetic_toy: toy_projections.mrcs are projections of toymodel_small_nocenter.mrc under the rotations
  of toy_rot_trans.pkl, WITHOUT its translations. project_volume correlates 0.994 on average (R), 0.41
  with Rᵀ, and 0.29 once the pickle's shifts are applied: the shifts are not in these images. The
  least-squares scale is 0.97, so project_volume's voxel-sum normalisation matches, and the contrast is
  positive (protein bright, not inverted).
- synthetic_hand: hand-vol.mrc is NOT the volume that generated hand.mrcs (it is a noisy two-lobed map
  used by cryoDRGN's flip_hand tests; its projections correlate < 0.07 with the stack under any
  convention). hand.mrcs (positive contrast) was generated with the rotations of hand_rot.pkl and no
  shifts, from an off-centre volume: the image centroids are fit by (R m)_xy to 0.19 px RMS (0.61 px
  with Rᵀ). hand_rot_trans.pkl holds DIFFERENT rotations (up to 1.9 apart element-wise) and shifts
  that re-centre the images (centroid ≈ −0.72·t·D): evidence for the +t re-centring sign, not ground
  truth. Without the generating volume, the hand tests use what the stack itself determines.
"""

import pickle
import warnings

import mrcfile
import numpy as np
import pytest
import torch

from cryobench_lab.physics.fft import fft2_center, ifft2_center
from cryobench_lab.physics.shift import shift_images
from cryobench_lab.physics.slicing import extract_slices, insert_slices, project_volume
from shared_data import SHARED

pytestmark = pytest.mark.skipif(not SHARED.exists(), reason="shared test data not available")


class _ArraysOnly(pickle.Unpickler):
    """Restricted unpickler: numpy arrays (and the builtins they need), nothing else."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
        }
    )

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def _load_pkl(path):
    with open(path, "rb") as f:
        return _ArraysOnly(f).load()


def _load_mrc(path):
    with warnings.catch_warnings():  # cryoDRGN's stacks lack the 'MAP ' ID; permissive mode warns about it
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.open(path, permissive=True) as m:
            return torch.from_numpy(np.asarray(m.data, dtype=np.float32).copy())


def _corr(a, b):
    a = a - a.mean((-2, -1), keepdim=True)
    b = b - b.mean((-2, -1), keepdim=True)
    return (a * b).sum((-2, -1)) / (a.norm(dim=(-2, -1)) * b.norm(dim=(-2, -1)))


def _centroids(imgs):
    """Intensity centroids (x, y) in px from the box centre of positive-contrast images (B, D, D)."""
    D = imgs.shape[-1]
    w = (imgs - imgs.flatten(1).median(1).values[:, None, None]).clamp_min(0)
    c = torch.arange(D, dtype=imgs.dtype) - D // 2
    total = w.sum((-2, -1))
    return torch.stack([(w.sum(-2) * c).sum(-1) / total, (w.sum(-1) * c).sum(-1) / total], dim=-1)


@pytest.fixture(scope="module")
def toy():
    d = SHARED / "cryoem" / "synthetic_toy"
    rot, trans = _load_pkl(d / "toy_rot_trans.pkl")
    return (
        _load_mrc(d / "toymodel_small_nocenter.mrc"),
        _load_mrc(d / "toy_projections.mrcs"),
        torch.from_numpy(rot).float(),
        torch.from_numpy(trans).float(),
    )


@pytest.fixture(scope="module")
def hand():
    d = SHARED / "cryoem" / "synthetic_hand"
    rot_true = _load_pkl(d / "hand_rot.pkl")
    rot_est, trans = _load_pkl(d / "hand_rot_trans.pkl")
    return (
        _load_mrc(d / "hand.mrcs"),
        torch.from_numpy(rot_true).float(),
        torch.from_numpy(rot_est).float(),
        torch.from_numpy(trans).float(),
    )


def test_toy_projections_pin_R_not_R_transpose_and_the_voxel_sum_scale(toy):
    vol, imgs, rot, trans = toy
    D = vol.shape[-1]
    proj = project_volume(vol, rot)
    c = _corr(proj, imgs)
    c_t = _corr(project_volume(vol, rot.transpose(1, 2)), imgs)
    print(f"toy: corr R {c.mean():.4f} (min {c.min():.4f}), R^T {c_t.mean():.4f}")
    assert c.mean() > 0.99 and c.min() > 0.97
    assert c_t.mean() < 0.6
    scale = ((proj * imgs).sum() / (proj * proj).sum()).item()
    assert 0.9 < scale < 1.05  # positive: the images are NOT contrast-inverted; scale = Σ_z voxels
    # the pickle's translations are not applied in this stack
    assert _corr(project_volume(vol, rot, shifts=-trans * D), imgs).mean() < 0.5


def test_hand_centroids_pin_the_projection_convention(hand):
    imgs, rot, _, _ = hand
    assert imgs.max() > 100 * imgs.min().abs()  # positive contrast: protein bright, not inverted
    c = _centroids(imgs.double()).reshape(-1)  # (2B,) = [cx_0, cy_0, cx_1, ...]
    rot = rot.double()

    def rms_fit(rows):  # centroid_b = rows_b @ m + offset, least squares over m (3,) and offset (2,)
        B = rows.shape[0]
        A = torch.zeros(B, 2, 5, dtype=torch.float64)
        A[:, :, :3] = rows
        A[:, 0, 3] = 1
        A[:, 1, 4] = 1
        sol = torch.linalg.lstsq(A.reshape(-1, 5), c[:, None]).solution
        return ((A.reshape(-1, 5) @ sol)[:, 0] - c).square().mean().sqrt().item()

    rms_R = rms_fit(rot[:, :2, :])  # a point m lands at (R m)_xy: rows 0, 1 of R
    rms_RT = rms_fit(rot.transpose(1, 2)[:, :2, :])
    print(f"hand centroid fit RMS: R {rms_R:.3f} px, R^T {rms_RT:.3f} px")
    assert rms_R < 0.3 and rms_RT > 0.5


def test_hand_held_out_reprojection_pins_R(hand):
    imgs, rot, _, _ = hand
    D = imgs.shape[-1]
    F = fft2_center(imgs)
    train = torch.arange(imgs.shape[0]) % 2 == 0

    def held_out_corr(R):
        num, den = insert_slices(F[train], R[train], vol_box=2 * D)
        pred = ifft2_center(extract_slices(num / (den + 1.0), R[~train], D)).real
        return _corr(pred, imgs[~train]).mean().item()

    c, c_t = held_out_corr(rot), held_out_corr(rot.transpose(1, 2))
    print(f"hand held-out reprojection corr: R {c:.3f}, R^T {c_t:.3f}")
    assert c > 0.95 and c_t < 0.8


def test_hand_pickle_shifts_recentre_with_plus_t(hand):
    imgs, _, _, trans = hand
    t_px = trans * imgs.shape[-1]
    c0 = _centroids(imgs)
    slope = (c0 * t_px).sum() / (t_px * t_px).sum()
    plus = _centroids(shift_images(imgs, t_px)).norm(dim=-1).mean().item()
    minus = _centroids(shift_images(imgs, -t_px)).norm(dim=-1).mean().item()
    print(
        f"hand: centroid ≈ {slope:.2f}·t; mean |centroid| raw {c0.norm(dim=-1).mean():.2f}, "
        f"+t {plus:.2f}, −t {minus:.2f} px"
    )
    assert slope < -0.5  # observed = shift(projection, −t)
    assert plus < 0.5 * c0.norm(dim=-1).mean().item() and minus > 2 * plus
