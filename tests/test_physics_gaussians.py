"""Gaussian mixtures: closed forms, numerical pixel integrals, pose/shift conventions, Fourier-slice agreement."""

import math

import numpy as np
import pytest
import roma
import torch
from scipy import integrate

from cryobench_lab.physics import gaussians
from cryobench_lab.physics.gaussians import project_gaussians, voxelize_gaussians
from cryobench_lab.physics.slicing import project_volume

I3 = torch.eye(3, dtype=torch.float64)[None]


def _analytic_projection(x, y, mu, sigma, amp):
    """Line integral along z of A·exp(−|r−μ|²/2σ²) at (x, y) Å (domain.md §1)."""
    return (
        amp * math.sqrt(2 * math.pi) * sigma * np.exp(-((x - mu[0]) ** 2 + (y - mu[1]) ** 2) / (2 * sigma**2))
    )


def _pixel_centres(D, apix):
    return (np.arange(D) - D // 2) * apix


def test_fine_pixels_match_the_analytic_projection():
    D, apix, sigma, amp = 256, 0.05, 2.0, 1.7
    mu = torch.tensor([[0.4, -0.9, 1.5]], dtype=torch.float64)
    img = project_gaussians(
        mu, torch.tensor([sigma], dtype=torch.float64), torch.tensor([amp]).double(), I3, D, apix
    )
    c = _pixel_centres(D, apix)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    expected = _analytic_projection(xx, yy, mu[0].numpy(), sigma, amp)
    peak = amp * math.sqrt(2 * math.pi) * sigma
    assert img.shape == (1, D, D)
    assert np.abs(img[0].numpy() - expected).max() < 1e-4 * peak  # pixel mean ≈ point value when apix ≪ σ


def test_coarse_pixels_are_pixel_averages_not_point_samples():
    D, apix, sigma, amp = 16, 4.0, 2.0, 1.0
    mu = np.array([1.3, -0.7, 2.0])
    img = project_gaussians(
        torch.tensor(mu)[None], torch.tensor([sigma]).double(), torch.tensor([amp]).double(), I3, D, apix
    )[0].numpy()
    c = _pixel_centres(D, apix)
    # Independent reference: 2D adaptive quadrature of the analytic projection over a few pixels' squares.
    for iy, ix in [(D // 2, D // 2), (D // 2 - 1, D // 2), (D // 2, D // 2 + 1), (D // 2 + 1, D // 2 - 1)]:
        val, _ = integrate.dblquad(
            lambda y, x: _analytic_projection(x, y, mu, sigma, amp),
            c[ix] - apix / 2,
            c[ix] + apix / 2,
            c[iy] - apix / 2,
            c[iy] + apix / 2,
            epsabs=1e-12,
        )
        assert img[iy, ix] == pytest.approx(val / apix**2, rel=1e-8)
    point = _analytic_projection(c[D // 2], c[D // 2], mu, sigma, amp)
    assert abs(point - img[D // 2, D // 2]) / img[D // 2, D // 2] > 0.1  # point sampling aliases here


def test_centre_lands_at_R_mu_and_shifts_follow_plus_t():
    torch.manual_seed(0)
    D, apix, sigma = 64, 1.0, 3.0  # every centre ≥ 5σ inside the box, so the centroid is exact
    mu = torch.tensor([[6.0, -3.0, 4.0]], dtype=torch.float64)
    s, a = torch.tensor([sigma]).double(), torch.tensor([1.0]).double()
    rot_x90 = torch.tensor([[[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]], dtype=torch.float64)  # y→z, z→−y
    rots = torch.cat([rot_x90, roma.random_rotmat(3, dtype=torch.float64)])
    t = torch.tensor([[0.0, 0.0], [2.5, -1.25], [0.0, 0.0], [-3.0, 4.0]], dtype=torch.float64)
    img = project_gaussians(mu, s, a, rots, D, apix, shifts=t)
    c = torch.as_tensor(_pixel_centres(D, apix))
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    for b in range(4):
        w = img[b] / img[b].sum()
        centroid = torch.stack([(w * xx).sum(), (w * yy).sum()])
        expected = (rots[b] @ mu[0])[:2] + t[b] * apix
        torch.testing.assert_close(centroid, expected, atol=1e-6, rtol=0)
    assert torch.allclose((rot_x90[0] @ mu[0])[:2], torch.tensor([6.0, -4.0]).double())
    # Integer shifts equal torch.roll of the unshifted image (content far from the edges).
    base = project_gaussians(mu, s, a, rots[3:], D, apix)
    torch.testing.assert_close(img[3], torch.roll(base[0], shifts=(4, -3), dims=(-2, -1)), atol=1e-7, rtol=0)


def test_batched_centres_amplitudes_and_chunking_agree(monkeypatch):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    B, N, D, apix = 3, 40, 24, 1.5
    centers = torch.randn(B, N, 3, generator=g, dtype=torch.float64) * 6
    sig = 1.5 + torch.rand(N, generator=g, dtype=torch.float64)
    amp = torch.rand(B, N, generator=g, dtype=torch.float64)
    rot = roma.random_rotmat(B, dtype=torch.float64)
    full = project_gaussians(centers, sig, amp, rot, D, apix)
    for b in range(B):
        one = project_gaussians(centers[b], sig, amp[b], rot[b : b + 1], D, apix)
        torch.testing.assert_close(full[b : b + 1], one)
    monkeypatch.setattr(gaussians, "_FACTOR_ELEMENTS", B * D * 7)  # forces 6 chunks of 7 Gaussians
    torch.testing.assert_close(project_gaussians(centers, sig, amp, rot, D, apix), full)
    vol = voxelize_gaussians(centers[0], sig, amp[0], D, apix)
    monkeypatch.setattr(gaussians, "_FACTOR_ELEMENTS", D * D * 9)
    torch.testing.assert_close(voxelize_gaussians(centers[0], sig, amp[0], D, apix), vol)


def test_voxelisation_projects_onto_project_gaussians_and_integrates_exactly():
    g = torch.Generator().manual_seed(1)
    N, D, apix = 25, 32, 2.0
    centers = (torch.rand(N, 3, generator=g, dtype=torch.float64) - 0.5) * 24
    sig = 2.0 + 2 * torch.rand(N, generator=g, dtype=torch.float64)
    amp = 0.5 + torch.rand(N, generator=g, dtype=torch.float64)
    vol = voxelize_gaussians(centers, sig, amp, D, apix)
    assert vol.shape == (D, D, D)
    proj = project_gaussians(centers, sig, amp, I3, D, apix)[0]
    # equal up to the z-tails cut off by the box (≥ 5σ away here)
    torch.testing.assert_close(apix * vol.sum(0), proj, atol=1e-6 * proj.max().item(), rtol=0)
    total = (amp * (2 * math.pi) ** 1.5 * sig**3).sum()
    assert (vol.sum() * apix**3).item() == pytest.approx(total.item(), rel=1e-6)
    # One voxel against a midpoint-rule 3D integral of the analytic density (40³ samples).
    iz, iy, ix = D // 2 + 1, D // 2 - 2, D // 2
    sub = (np.arange(40) + 0.5) / 40 - 0.5
    zs, ys, xs = ((i - D // 2 + sub) * apix for i in (iz, iy, ix))
    Z, Y, X = np.meshgrid(zs, ys, xs, indexing="ij")
    dens = sum(
        amp[n].item()
        * np.exp(
            -(
                (X - centers[n, 0].item()) ** 2
                + (Y - centers[n, 1].item()) ** 2
                + (Z - centers[n, 2].item()) ** 2
            )
            / (2 * sig[n].item() ** 2)
        )
        for n in range(N)
    )
    assert vol[iz, iy, ix].item() == pytest.approx(dens.mean(), rel=1e-3)


def test_fourier_slice_of_voxelised_mixture_matches_direct_projection():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    N, D, apix = 30, 64, 2.0
    centers = (torch.rand(N, 3, generator=g) - 0.5) * 40  # within ±20 Å of a 128 Å box
    sig = 2.5 + 2 * torch.rand(N, generator=g)
    amp = 0.5 + torch.rand(N, generator=g)
    rot = roma.random_rotmat(12)
    vol = voxelize_gaussians(centers, sig, amp, D, apix)
    direct = project_gaussians(centers, sig, amp, rot, D, apix)
    sliced = project_volume(vol, rot, apix=apix)  # 2× real-space padding by default
    d = direct - direct.mean((-2, -1), keepdim=True)
    s = sliced - sliced.mean((-2, -1), keepdim=True)
    corr = (d * s).sum((-2, -1)) / (d.norm(dim=(-2, -1)) * s.norm(dim=(-2, -1)))
    assert corr.min().item() > 0.99
    assert ((direct - sliced).norm() / direct.norm()).item() < 0.05  # same scale (density·Å), not just shape


def test_project_gaussians_is_differentiable():
    g = torch.Generator().manual_seed(4)
    centers = (torch.randn(2, 3, generator=g, dtype=torch.float64) * 2).requires_grad_()
    sig = torch.tensor([1.3, 2.1], dtype=torch.float64, requires_grad=True)
    amp = torch.tensor([0.7, 1.2], dtype=torch.float64, requires_grad=True)
    rv = torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(2, 2, generator=g, dtype=torch.float64).requires_grad_()

    def fn(c, s, a, v, tt):
        return project_gaussians(c, s, a, roma.rotvec_to_rotmat(v), 6, 1.0, shifts=tt)

    assert torch.autograd.gradcheck(fn, (centers, sig, amp, rv, t))
