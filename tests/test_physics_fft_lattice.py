"""Centred FFT / Hartley layout and round trips; grids, masks and the taper (closed forms)."""

import math

import numpy as np
import pytest
import torch

from cryobench_lab.physics.fft import (
    fft2_center,
    fft3_center,
    ht2_center,
    ht3_center,
    ifft2_center,
    ifft3_center,
    iht2_center,
    iht3_center,
)
from cryobench_lab.physics.lattice import (
    circular_mask,
    freq_grid_2d,
    freq_grid_3d,
    grid_2d,
    soft_window,
    spherical_mask,
)


@pytest.mark.parametrize("D", [8, 9])
def test_fft2_of_offset_delta_is_the_closed_form_phase_ramp(D):
    # A delta at pixel coordinate (x0, y0) transforms to exp(-2πi (kx x0 + ky y0) / D) with k = j - D//2:
    # pins both the real-space and the frequency origin at index D // 2 and the [y, x] indexing.
    x0, y0 = 2, -1
    img = torch.zeros(D, D, dtype=torch.float64)
    img[y0 + D // 2, x0 + D // 2] = 1.0
    k = np.arange(D) - D // 2
    ky, kx = np.meshgrid(k, k, indexing="ij")
    expected = np.exp(-2j * np.pi * (kx * x0 + ky * y0) / D)
    np.testing.assert_allclose(fft2_center(img).numpy(), expected, atol=1e-12)


def test_fft3_of_offset_delta_pins_zyx_layout():
    D = 6
    x0, y0, z0 = 1, 0, -2
    vol = torch.zeros(D, D, D, dtype=torch.float64)
    vol[z0 + D // 2, y0 + D // 2, x0 + D // 2] = 1.0
    k = freq_grid_3d(D, dtype=torch.float64).numpy()  # (D, D, D, 3) [kx, ky, kz]
    expected = np.exp(-2j * np.pi * (k[..., 0] * x0 + k[..., 1] * y0 + k[..., 2] * z0) / D)
    np.testing.assert_allclose(fft3_center(vol).numpy(), expected, atol=1e-12)


def test_fft_matches_numpy_reference_and_round_trips():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 10, dtype=torch.float64, generator=g)
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x.numpy(), axes=(-2, -1))), axes=(-2, -1))
    np.testing.assert_allclose(fft2_center(x).numpy(), ref, atol=1e-12)
    torch.testing.assert_close(ifft2_center(fft2_center(x)).real, x)
    v = torch.randn(2, 7, 7, 7, dtype=torch.float64, generator=g)
    torch.testing.assert_close(ifft3_center(fft3_center(v)).real, v)
    assert fft2_center(x)[0, 5, 5].real.item() == pytest.approx(x[0].sum().item())  # DC = pixel sum


@pytest.mark.parametrize("D", [8, 11])
def test_hartley_is_re_minus_im_and_round_trips(D):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, D, D, dtype=torch.float64, generator=g)
    F = fft2_center(x)
    torch.testing.assert_close(ht2_center(x), F.real - F.imag)
    torch.testing.assert_close(iht2_center(ht2_center(x)), x)
    torch.testing.assert_close(ht2_center(iht2_center(x)), x)
    v = torch.randn(D, D, D, dtype=torch.float64, generator=g)
    F3 = fft3_center(v)
    torch.testing.assert_close(ht3_center(v), F3.real - F3.imag)
    torch.testing.assert_close(iht3_center(ht3_center(v)), v)


def test_grids_follow_the_index_conventions():
    D = 6
    g = grid_2d(D)
    assert g.shape == (D, D, 2)
    assert g[0, 0].tolist() == [-3, -3]
    assert g[0, 5].tolist() == [2, -3]  # [x, y] with x along the last (column) axis
    assert g[D // 2, D // 2].tolist() == [0, 0]
    f = freq_grid_2d(D, apix=2.5, dtype=torch.float64)
    torch.testing.assert_close(f, g.double() / (D * 2.5))
    f3 = freq_grid_3d(D)
    assert f3.shape == (D, D, D, 3)
    assert f3[1, 2, 4].tolist() == [1, -1, -2]  # index [z, y, x] → [kx, ky, kz]


def test_masks_count_lattice_points():
    D, r = 16, 5
    expected_2d = sum(1 for x in range(-8, 8) for y in range(-8, 8) if x * x + y * y <= r * r)
    assert int(circular_mask(D, r).sum()) == expected_2d
    assert circular_mask(D, r)[D // 2, D // 2 + r] and not circular_mask(D, r)[D // 2, D // 2 + r + 1]
    expected_3d = sum(
        1 for x in range(-8, 8) for y in range(-8, 8) for z in range(-8, 8) if x * x + y * y + z * z <= r * r
    )
    assert int(spherical_mask(D, r).sum()) == expected_3d


def test_soft_window_is_a_raised_cosine_between_the_radii():
    D = 64
    w = soft_window(D, in_rad=0.5, out_rad=0.9, dtype=torch.float64)
    assert w[D // 2, D // 2] == 1.0
    assert w[0, 0] == 0.0
    # Along +x at r = 0.7 (half-way between the radii): 0.5; at r = 0.6: 0.5 (1 + cos(π/4)).
    x_half = round(0.7 * D / 2)
    x_quarter = round(0.6 * D / 2)
    r_half, r_quarter = x_half / (D / 2), x_quarter / (D / 2)
    for x, r in ((x_half, r_half), (x_quarter, r_quarter)):
        expected = 0.5 * (1 + math.cos(math.pi * (r - 0.5) / 0.4))
        assert w[D // 2, D // 2 + x].item() == pytest.approx(expected, abs=1e-12)
    assert bool(((w >= 0) & (w <= 1)).all())


def test_fourier_pad_3d_samples_the_same_map_on_a_finer_grid():
    from cryobench_lab.physics.fft import fourier_pad_3d

    def blob(D):  # the same Gaussian (σ = 1/10 of the field of view) sampled on D³ voxels
        x = (torch.arange(D) - D // 2) / D
        r2 = x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2
        return torch.exp(-r2 / (2 * 0.1**2))

    fine = fourier_pad_3d(blob(16), 32)
    assert fine.shape == (32, 32, 32)
    ref = blob(32)
    cos = float((fine * ref).sum() / (fine.norm() * ref.norm()))
    assert cos > 0.999
    assert abs(float(fine[16, 16, 16] / fine.max()) - 1) < 1e-5  # the centre stays the centre
