"""In-plane translations applied in Fourier space.

Convention (docs/conventions.md): ``shift(img, t)`` moves content at ``x0`` to ``x0 + t`` (pixels, ``t`` as
``[x, y]``). In Fourier space that is ``F(k) · exp(−2πi k·t / D)`` with ``k`` in cycles/box. For integer
``t`` the ramp is D-periodic in ``k``, so the result equals ``torch.roll`` exactly (up to float rounding).
"""

import math

import torch

from cryobench_lab.physics.fft import fft2_center, ifft2_center
from cryobench_lab.physics.lattice import grid_2d


def phase_ramp(t: torch.Tensor, D: int) -> torch.Tensor:
    """``exp(−2πi k·t / D)`` on the centred ``D × D`` grid for shifts ``t (B, 2)`` px → complex ``(B, D, D)``."""
    k = grid_2d(D, device=t.device, dtype=t.dtype)  # (D, D, 2) cycles/box
    phase = -2.0 * math.pi / D * torch.einsum("hwc,bc->bhw", k, t)  # (B, D, D)
    return torch.polar(torch.ones_like(phase), phase)


def phase_shift_2d(F: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Centred spectra ``F (B, D, D)`` of images moved by ``+t`` px (``t (B, 2)`` as ``[x, y]``)."""
    return F * phase_ramp(t.to(F.real.dtype), F.shape[-1])


def shift_images(img: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Real images ``img (B, D, D)`` moved by ``+t`` px (sub-pixel, periodic) → ``(B, D, D)``."""
    return ifft2_center(phase_shift_2d(fft2_center(img), t)).real
