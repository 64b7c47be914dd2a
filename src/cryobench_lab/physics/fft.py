"""Centred Fourier and Hartley transforms over the last 2 or 3 dimensions.

Layout (docs/conventions.md): ``F = fftshift(fftn(ifftshift(x)))``, so the real-space origin and the
zero frequency both sit at index ``D // 2`` on every transformed axis; frequency index ``k = j - D // 2``
is in cycles/box. The forward transforms are unnormalised (torch's default ``norm="backward"``) and the
inverses carry the ``1 / N`` factor, so a sum over real-space pixels equals the zero-frequency value.

The Hartley transform of a real array is ``H = Re(F) - Im(F)`` of the centred FFT. It is its own inverse up
to ``1 / N`` (N = number of transformed samples), which is how the inverses are built.
"""

import torch

_DIMS2 = (-2, -1)
_DIMS3 = (-3, -2, -1)


def fft2_center(x: torch.Tensor) -> torch.Tensor:
    """Centred 2D FFT of ``x (..., D, D)`` (real or complex) → complex ``(..., D, D)``."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=_DIMS2), dim=_DIMS2), dim=_DIMS2)


def ifft2_center(F: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2_center` → complex ``(..., D, D)`` (take ``.real`` for real images)."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(F, dim=_DIMS2), dim=_DIMS2), dim=_DIMS2)


def fft3_center(v: torch.Tensor) -> torch.Tensor:
    """Centred 3D FFT of ``v (..., D, D, D)`` → complex ``(..., D, D, D)``."""
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(v, dim=_DIMS3), dim=_DIMS3), dim=_DIMS3)


def ifft3_center(F: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft3_center` → complex ``(..., D, D, D)``."""
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(F, dim=_DIMS3), dim=_DIMS3), dim=_DIMS3)


def ht2_center(x: torch.Tensor) -> torch.Tensor:
    """Centred 2D Hartley transform of a real ``x (..., D, D)`` → real ``(..., D, D)``."""
    F = fft2_center(x)
    return F.real - F.imag


def iht2_center(H: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ht2_center`: the same transform divided by the number of pixels."""
    return ht2_center(H) / (H.shape[-1] * H.shape[-2])


def ht3_center(v: torch.Tensor) -> torch.Tensor:
    """Centred 3D Hartley transform of a real ``v (..., D, D, D)`` → real ``(..., D, D, D)``."""
    F = fft3_center(v)
    return F.real - F.imag


def iht3_center(H: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ht3_center`: the same transform divided by the number of voxels."""
    return ht3_center(H) / (H.shape[-1] * H.shape[-2] * H.shape[-3])


def fourier_pad_3d(volume: torch.Tensor, D: int) -> torch.Tensor:
    """The same map on a finer grid: ``(D0, D0, D0)`` real → ``(D, D, D)`` real, D ≥ D0, same field of view
    (voxel size × D0 / D), by zero-padding the centred spectrum."""
    D0 = volume.shape[-1]
    lo = D // 2 - D0 // 2
    spectrum = torch.zeros((D, D, D), dtype=torch.complex64)
    spectrum[lo : lo + D0, lo : lo + D0, lo : lo + D0] = fft3_center(volume)
    return ifft3_center(spectrum).real
