"""Masks: sphere volumes against the closed-form integral, volume masks against an explicit ball dilation."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, ndimage

from cryobench_lab.errors import InputError
from cryobench_lab.metrics.fsc import fsc
from cryobench_lab.metrics.masks import default_threshold, soft_sphere_mask, volume_mask
from shared_data import SHARED, needs_shared


def _radius(D):
    a = np.arange(D) - D // 2
    z, y, x = np.meshgrid(a, a, a, indexing="ij")
    return np.sqrt(x**2 + y**2 + z**2)


def test_hard_sphere_volume_is_four_thirds_pi_r_cubed():
    m = soft_sphere_mask(64, radius_px=15.0, edge_px=0.0)
    assert m.shape == (64, 64, 64) and m.dtype == torch.float32
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert float(m.sum()) == pytest.approx(4 / 3 * math.pi * 15.0**3, rel=0.01)
    assert m[32, 32, 32] == 1 and m[32, 32, 32 + 15] == 1 and m[32, 32, 32 + 16] == 0  # centre at D // 2


def test_soft_sphere_integral_matches_the_radial_integral_of_the_cosine_edge():
    r0, e = 12.0, 4.0
    m = soft_sphere_mask(64, radius_px=r0, edge_px=e)
    edge = integrate.quad(
        lambda r: 4 * math.pi * r**2 * 0.5 * (1 + math.cos(math.pi * (r - r0) / e)), r0, r0 + e
    )[0]
    assert float(m.sum()) == pytest.approx(4 / 3 * math.pi * r0**3 + edge, rel=0.01)
    r = _radius(64)
    vals = m.numpy()
    assert (vals[r <= r0] == 1).all() and (vals[r >= r0 + e] == 0).all()
    mid = np.isclose(r, r0 + e / 2)  # (14, 0, 0) and its images lie exactly there
    assert mid.any() and np.allclose(vals[mid], 0.5, atol=1e-6)  # half-way down the edge
    order = np.argsort(r.ravel())
    assert (np.diff(vals.ravel()[order]) <= 1e-7).all()  # falls monotonically with radius


def test_default_sphere_keeps_its_edge_inside_the_box():
    m = soft_sphere_mask(32, edge_px=4.0)
    assert (m.numpy()[_radius(32) >= 16] == 0).all()
    with pytest.raises(InputError):
        soft_sphere_mask(32, radius_px=-1.0)


def _ball(radius):
    a = np.arange(-math.ceil(radius), math.ceil(radius) + 1)
    z, y, x = np.meshgrid(a, a, a, indexing="ij")
    return x**2 + y**2 + z**2 <= radius**2


def test_volume_mask_is_the_threshold_dilated_by_a_ball_plus_a_cosine_edge():
    D = 40
    rng = np.random.default_rng(0)
    vol = np.zeros((D, D, D))
    vol[14:22, 16:20, 12:26] = 1.0  # a slab and a separate blob: the envelope is not a sphere
    vol[28, 28, 28] = 0.8
    vol += 0.05 * rng.random((D, D, D))
    core = vol > 0.5
    mask = volume_mask(vol, threshold=0.5, dilate_px=3, edge_px=2).numpy()
    dilated = ndimage.binary_dilation(core, structure=_ball(3))  # the textbook operation, independently
    np.testing.assert_array_equal(mask == 1.0, dilated)
    assert (mask[core] == 1).all()
    outer = ndimage.binary_dilation(core, structure=_ball(5))
    assert (mask[~outer] == 0).all()  # nothing beyond dilation + edge
    inside_edge = ndimage.binary_dilation(core, structure=_ball(4.99)) & ~dilated  # distance in (3, 5)
    assert ((mask[inside_edge] > 0) & (mask[inside_edge] < 1)).all()  # the soft edge lives there


def test_default_threshold_is_half_a_robust_maximum_and_ignores_one_hot_voxel():
    D = 32
    r = _radius(D)
    vol = np.exp(-(r**2) / (2 * 4.0**2))
    assert default_threshold(vol) == pytest.approx(0.5 * np.percentile(vol, 99.99))
    hot = vol.copy()
    hot[2, 2, 2] = 50.0
    np.testing.assert_array_equal(volume_mask(hot).numpy()[r < 12], volume_mask(vol).numpy()[r < 12])
    # core of a Gaussian above threshold t: r < σ√(2 ln(1/t)) (≈ 4.8 px); then 3 px of 1, 3 px of edge
    r_core = 4.0 * math.sqrt(2 * math.log(1 / default_threshold(vol)))
    m = volume_mask(torch.from_numpy(vol)).numpy()
    assert (m[r <= r_core + 2] == 1).all() and (m[r >= r_core + 3 + 3 + 1] == 0).all()
    with pytest.raises(InputError):
        volume_mask(vol, threshold=2.0)


@needs_shared
def test_mask_of_a_real_map_keeps_its_density_and_fsc_under_it_is_one():
    from cryobench_lab.io.mrc import read_mrc

    vol, _ = read_mrc(SHARED / "cryoem" / "maps" / "1ake.mrc")
    m = volume_mask(vol).numpy()
    positive = np.clip(vol, 0, None)
    assert (positive * m).sum() / positive.sum() > 0.98  # the envelope holds the molecule
    assert m.mean() < 0.2  # and is not the whole box
    _, curve = fsc(vol, vol, mask=m)
    np.testing.assert_allclose(curve, 1.0, atol=1e-10)
