"""Fourier-space shifts: integer shifts are torch.roll, +t moves content by +t, round trips, gradients."""

import torch

from cryobench_lab.physics.fft import fft2_center, ifft2_center
from cryobench_lab.physics.shift import phase_shift_2d, shift_images


def test_integer_shift_equals_roll():
    g = torch.Generator().manual_seed(0)
    for D in (16, 15):
        img = torch.randn(3, D, D, dtype=torch.float64, generator=g)
        t = torch.tensor([[3.0, -2.0], [-5.0, 7.0], [0.0, 1.0]], dtype=torch.float64)
        out = shift_images(img, t)
        for b in range(3):
            tx, ty = int(t[b, 0]), int(t[b, 1])
            torch.testing.assert_close(out[b], torch.roll(img[b], shifts=(ty, tx), dims=(-2, -1)))


def test_positive_shift_moves_a_delta_to_x0_plus_t():
    D = 16
    img = torch.zeros(1, D, D, dtype=torch.float64)
    img[0, D // 2 + 1, D // 2 - 2] = 1.0  # content at (x, y) = (−2, 1)
    out = shift_images(img, torch.tensor([[4.0, 3.0]], dtype=torch.float64))
    y, x = divmod(int(out[0].argmax()), D)
    assert (x - D // 2, y - D // 2) == (2, 4)


def test_subpixel_shift_round_trips_and_moves_the_centroid():
    D = 32
    yy, xx = torch.meshgrid(torch.arange(D) - D // 2, torch.arange(D) - D // 2, indexing="ij")
    blob = torch.exp(-((xx - 0.3) ** 2 + (yy + 1.2) ** 2) / (2 * 2.5**2)).double()[None]
    t = torch.tensor([[1.37, -2.61]], dtype=torch.float64)
    moved = shift_images(blob, t)
    cx = (moved[0] * xx).sum() / moved[0].sum()
    cy = (moved[0] * yy).sum() / moved[0].sum()
    # (tails of the periodic blob near the box edge limit the centroid to ~1e-5 px)
    assert abs(cx.item() - (0.3 + 1.37)) < 1e-4 and abs(cy.item() - (-1.2 - 2.61)) < 1e-4
    # Not exact: taking the real part drops the Nyquist row's odd part (tiny for a smooth blob).
    torch.testing.assert_close(shift_images(moved, -t), blob, atol=1e-7, rtol=0)
    F = fft2_center(blob)
    torch.testing.assert_close(ifft2_center(phase_shift_2d(F, t)).real, moved)


def test_shift_is_differentiable_in_t():
    D = 8
    g = torch.Generator().manual_seed(3)
    img = torch.randn(2, D, D, dtype=torch.float64, generator=g)
    t = torch.tensor([[0.3, -0.7], [1.1, 0.2]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: shift_images(img, s), (t,))
