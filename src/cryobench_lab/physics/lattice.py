"""Pixel and frequency grids, masks and the real-space taper.

Every grid follows docs/conventions.md: arrays are indexed ``[y, x]`` (images) or ``[z, y, x]``
(volumes), index ``j`` has coordinate ``j - D // 2``, and the last axis of a coordinate grid lists the
components in ``x, y(, z)`` order.
"""

import math

import torch


def centered_axis(D: int, device=None, dtype=None) -> torch.Tensor:
    """Coordinates ``j - D // 2`` (pixels, or cycles/box in Fourier space) for ``j = 0 .. D-1`` → ``(D,)``."""
    return torch.arange(D, device=device, dtype=dtype or torch.get_default_dtype()) - D // 2


def grid_2d(D: int, device=None, dtype=None) -> torch.Tensor:
    """Pixel coordinates of a ``D × D`` image in pixels → ``(D, D, 2)``, ``grid[i, j] = [j - D//2, i - D//2]``."""
    a = centered_axis(D, device, dtype)
    y, x = torch.meshgrid(a, a, indexing="ij")  # (D, D) each
    return torch.stack([x, y], dim=-1)


def freq_grid_2d(D: int, apix: float = 1.0, device=None, dtype=None) -> torch.Tensor:
    """Spatial frequencies of the centred 2D FFT layout in 1/Å (cycles/Å) → ``(D, D, 2)`` as ``[kx, ky]``.

    ``k = (j - D // 2) / (D * apix)``; with ``apix = 1`` this is cycles/px.
    """
    return grid_2d(D, device, dtype) / (D * apix)


def freq_grid_3d(D: int, device=None, dtype=None) -> torch.Tensor:
    """Frequency indices of the centred 3D FFT layout in cycles/box → ``(D, D, D, 3)`` as ``[kx, ky, kz]``.

    Entry ``[i, j, l]`` (volume index ``[z, y, x]``) is ``[l - D//2, j - D//2, i - D//2]``.
    """
    a = centered_axis(D, device, dtype)
    z, y, x = torch.meshgrid(a, a, a, indexing="ij")  # (D, D, D) each
    return torch.stack([x, y, z], dim=-1)


def circular_mask(D: int, radius: float | None = None, device=None) -> torch.Tensor:
    """Disk ``|(x, y)| <= radius`` (radius in pixels, default ``D // 2``) on the image grid → ``(D, D)`` bool."""
    radius = D // 2 if radius is None else radius
    return grid_2d(D, device, torch.float64).square().sum(-1) <= radius**2


def spherical_mask(D: int, radius: float | None = None, device=None) -> torch.Tensor:
    """Ball ``|(x, y, z)| <= radius`` (radius in voxels, default ``D // 2``) → ``(D, D, D)`` bool."""
    radius = D // 2 if radius is None else radius
    return freq_grid_3d(D, device, torch.float64).square().sum(-1) <= radius**2


def soft_window(D: int, in_rad: float = 0.85, out_rad: float = 0.99, device=None, dtype=None) -> torch.Tensor:
    """Real-space taper applied to images before an FFT → ``(D, D)`` in [0, 1].

    With ``r = |(x, y)| / (D / 2)`` (so the inscribed circle has r = 1): 1 for ``r <= in_rad``, a raised
    cosine ``0.5 (1 + cos(π (r - in_rad) / (out_rad - in_rad)))`` between the radii, 0 beyond ``out_rad``.
    It suppresses the edge discontinuity that periodic FFTs would otherwise turn into streaks.
    """
    r = grid_2d(D, device, dtype).norm(dim=-1) / (D / 2)  # (D, D)
    t = ((r - in_rad) / (out_rad - in_rad)).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))
