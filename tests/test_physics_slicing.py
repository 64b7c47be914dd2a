"""Fourier slices: coordinates, exact grid cases, adjointness, reconstruction from projections, speed."""

import time

import numpy as np
import roma
import torch

from cryobench_lab.metrics.fsc import fsc
from cryobench_lab.physics.fft import fft2_center, ifft3_center
from cryobench_lab.physics.gaussians import project_gaussians, voxelize_gaussians
from cryobench_lab.physics.shift import shift_images
from cryobench_lab.physics.slicing import (
    extract_slices,
    insert_slices,
    project_volume,
    slice_coordinates,
    volume_spectrum,
)


def _crandn(*shape, g):
    return torch.complex(
        torch.randn(*shape, generator=g, dtype=torch.float64),
        torch.randn(*shape, generator=g, dtype=torch.float64),
    )


def test_slice_coordinates_are_row_vector_times_R():
    torch.manual_seed(0)
    D = 8
    rot = roma.random_rotmat(3, dtype=torch.float64)
    coords = slice_coordinates(rot, D)
    assert coords.shape == (3, D, D, 3)
    i, j = 2, 7  # pixel [y, x] → (kx, ky) = (j − D//2, i − D//2)
    k = torch.tensor([j - D // 2, i - D // 2, 0.0], dtype=torch.float64)
    for b in range(3):
        torch.testing.assert_close(coords[b, i, j], k @ rot[b])
    ident = slice_coordinates(torch.eye(3)[None], D)[0]
    assert ident[i, j].tolist() == [3.0, -2.0, 0.0]


def test_identity_slice_is_the_central_plane_and_padding_keeps_the_dft():
    g = torch.Generator().manual_seed(1)
    D = 10
    F = _crandn(D, D, D, g=g)
    torch.testing.assert_close(extract_slices(F, torch.eye(3, dtype=torch.float64)[None])[0], F[D // 2])
    # Oversampled: the 2×-padded spectrum at 2k is the D-box DFT at k, so the identity slice is exactly the
    # 2D transform of the z-projection (projection-slice theorem on the grid).
    vol = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    sl = extract_slices(volume_spectrum(vol, pad=2), torch.eye(3, dtype=torch.float64)[None], D)[0]
    torch.testing.assert_close(sl, fft2_center(vol.sum(0)))
    torch.testing.assert_close(project_volume(vol, torch.eye(3, dtype=torch.float64)[None])[0], vol.sum(0))


def test_quarter_turn_about_z_permutes_the_grid_exactly():
    # R = Rz(90°): [kx, ky, 0] @ R = [ky, −kx, 0], so slice[i, j] = F[D//2, D//2 − kx, D//2 + ky].
    g = torch.Generator().manual_seed(2)
    D = 8
    F = _crandn(D, D, D, g=g)
    Rz = torch.tensor([[[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]], dtype=torch.float64)
    sl = extract_slices(F, Rz)[0]
    for i in range(1, D):  # row/column 0 (k = −D/2) maps to +D/2, outside the box → 0
        for j in range(1, D):
            kx, ky = j - D // 2, i - D // 2
            assert sl[i, j] == F[D // 2, D // 2 - kx, D // 2 + ky]
    assert (sl[:, 0] == 0).all()


def test_insert_is_the_adjoint_of_extract():
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    D, B = 12, 7
    rot = roma.random_rotmat(B, dtype=torch.float64)
    for pad in (1, 2):
        V = _crandn(pad * D, pad * D, pad * D, g=g)
        X = _crandn(B, D, D, g=g)
        lhs = torch.vdot(extract_slices(V, rot, D).reshape(-1), X.reshape(-1))  # ⟨extract V, X⟩
        num, den = insert_slices(X, rot, vol_box=pad * D)
        rhs = torch.vdot(V.reshape(-1), num.reshape(-1))  # ⟨V, insert X⟩
        assert abs(lhs - rhs) < 1e-10 * abs(lhs)
        # den with unit weights = insert of ones; with weights it is linear in the weights
        ones_num, _ = insert_slices(torch.ones(B, D, D, dtype=torch.float64), rot, vol_box=pad * D)
        torch.testing.assert_close(den, ones_num)
        w = torch.rand(B, D, D, generator=g, dtype=torch.float64)
        _, den_w = insert_slices(X, rot, weights=w, vol_box=pad * D)
        lhs_w = (extract_slices(V.real.contiguous(), rot, D) * w).sum()
        torch.testing.assert_close(lhs_w, (V.real * den_w).sum())


def test_insert_accumulates_in_place_over_batches():
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(4)
    D = 8
    rot = roma.random_rotmat(6, dtype=torch.float64)
    X = _crandn(6, D, D, g=g)
    num_all, den_all = insert_slices(X, rot, vol_box=2 * D)
    num = torch.zeros(2 * D, 2 * D, 2 * D, dtype=torch.complex128)
    den = torch.zeros(2 * D, 2 * D, 2 * D, dtype=torch.float64)
    for s in (slice(0, 2), slice(2, 6)):
        out = insert_slices(X[s], rot[s], out_num=num, out_den=den)
        assert out[0] is num and out[1] is den
    torch.testing.assert_close(num, num_all)
    torch.testing.assert_close(den, den_all)


def test_backprojecting_analytic_projections_reconstructs_the_volume():
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(5)
    N, D, apix, B = 20, 32, 2.0, 2000
    centers = (torch.rand(N, 3, generator=g, dtype=torch.float64) - 0.5) * 20
    sig = 2.5 + 1.5 * torch.rand(N, generator=g, dtype=torch.float64)
    amp = 0.5 + torch.rand(N, generator=g, dtype=torch.float64)
    rot = roma.random_rotmat(B, dtype=torch.float64)
    imgs = project_gaussians(centers, sig, amp, rot, D, apix)  # independent of the slicing code
    num, den = insert_slices(fft2_center(imgs), rot, vol_box=2 * D)
    F = torch.where(den > 1e-3, num / den.clamp_min(1e-3), torch.zeros_like(num))
    rec = ifft3_center(F).real[D // 2 : D // 2 + D, D // 2 : D // 2 + D, D // 2 : D // 2 + D] / apix
    truth = voxelize_gaussians(centers, sig, amp, D, apix)
    _, curve = fsc(truth, rec)
    assert curve[: int(0.8 * len(curve))].min() > 0.95
    corr = np.corrcoef(truth.numpy().ravel(), rec.numpy().ravel())[0, 1]
    assert corr > 0.98


def test_project_volume_shifts_follow_plus_t():
    torch.manual_seed(6)
    D, apix = 24, 2.0
    centers = torch.tensor([[4.0, -6.0, 2.0], [-5.0, 3.0, -4.0]], dtype=torch.float64)
    vol = voxelize_gaussians(
        centers, torch.tensor([3.0, 4.0]).double(), torch.tensor([1.0, 0.5]).double(), D, apix
    )
    rot = roma.random_rotmat(2, dtype=torch.float64)
    t = torch.tensor([[1.5, -2.25], [3.0, 1.0]], dtype=torch.float64)
    shifted = project_volume(vol, rot, shifts=t, apix=apix)
    # equal up to the Nyquist row, whose odd part either order of operations drops differently
    expected = shift_images(project_volume(vol, rot, apix=apix), t)
    torch.testing.assert_close(shifted, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)
    # and the content moves to (R μ)_xy + t: compare with the analytic renderer (Å = px · apix)
    direct = project_gaussians(
        centers, torch.tensor([3.0, 4.0]).double(), torch.tensor([1.0, 0.5]).double(), rot, D, apix, shifts=t
    )
    assert ((shifted - direct).norm() / direct.norm()).item() < 0.03


def test_extract_is_differentiable_in_volume_and_rotation():
    g = torch.Generator().manual_seed(7)
    F = _crandn(6, 6, 6, g=g).requires_grad_()
    rv = torch.tensor([[0.3, -0.2, 0.5], [1.1, 0.4, -0.7]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, v: extract_slices(f, roma.rotvec_to_rotmat(v), 4), (F, rv))


def test_backprojection_at_64px_is_fast():
    # 1000 of the 3000-image oracle workload keeps the test short; it scales linearly in images
    # (3000 images at pad 2: ~5 s on 2 idle CPU cores, ~10–25 s when other jobs share them).
    torch.manual_seed(8)
    D, B = 64, 1000
    rot = roma.random_rotmat(B)
    X = torch.randn(B, D, D, dtype=torch.complex64)
    w = torch.rand(B, D, D)
    t0 = time.perf_counter()
    num, den = insert_slices(X, rot, weights=w, vol_box=2 * D)
    elapsed = time.perf_counter() - t0
    assert num.shape == (2 * D,) * 3 and num.dtype == torch.complex64 and den.dtype == torch.float32
    assert elapsed < 20.0, f"insert_slices took {elapsed:.1f} s for {B} images"  # catches O(B·D³) regressions
