"""Real-space rendering of isotropic Gaussian mixtures, integrated over pixels and voxels.

A Gaussian ``A·exp(−|r − μ|² / 2σ²)`` (centre ``μ`` in Å relative to the box centre, ``σ`` in Å) seen with
pose ``R`` projects along z to ``A·√(2π)σ·exp(−|xy − (Rμ)_xy|² / 2σ²)`` (a line integral, amplitude·Å).
Point-sampling that at coarse pixels aliases badly (σ = 2 Å at apix = 4 Å is off by tens of percent), so
each pixel instead holds the MEAN of the projected density over its square extent. The mean separates
into an x- and a y-factor, each a difference of error functions, and an image batch is one batched
matmul of two ``(B, N, D)`` factor tensors (no ``(B, N, D, D)`` tensor is ever formed).

Pixel ``j`` spans ``[(j − D//2 − ½)·apix, (j − D//2 + ½)·apix]`` Å, so coordinate 0 is the centre of pixel
``D // 2`` (docs/conventions.md).
"""

import math

import torch

from cryobench_lab.physics.lattice import centered_axis

# An atom's blur when a map is drawn from an atomic model at a given sampling: σ = max(MIN_BLUR_SIGMA,
# BLUR_SIGMA_PER_APIX·apix). A Gaussian's Fourier amplitude exp(−2π²σ²s²) is then ≤ 6 % at Nyquist, so the
# map is band-limited just below Nyquist and its voxel, pixel and Fourier-slice renderings agree (measured
# in data/simulate.py's docstring); the 1 Å floor stands for atomic form factors and thermal motion.
BLUR_SIGMA_PER_APIX = 0.75
MIN_BLUR_SIGMA = 1.0  # Å


def band_limited_sigma(apix: float) -> float:
    """Atom blur σ (Å) for a map sampled at ``apix`` Å/px: ``max(1 Å, 0.75·apix)`` (see above)."""
    return max(MIN_BLUR_SIGMA, BLUR_SIGMA_PER_APIX * apix)


def atom_amplitudes(atomic_numbers: torch.Tensor, sigma: float) -> torch.Tensor:
    """Peak densities (e/Å³) of one isotropic Gaussian of std ``sigma`` Å per atom, each integrating to the
    atom's electron count Z: ``Z / ((2π)^{3/2} σ³)``."""
    return atomic_numbers / ((2.0 * math.pi) ** 1.5 * sigma**3)


# Elements per (B, n, D) factor chunk; bounds memory for large mixtures (e.g. 8192 Gaussians at D=128).
_FACTOR_ELEMENTS = 1 << 22


def _interval_means(mu: torch.Tensor, sigma: torch.Tensor, D: int, apix: float) -> torch.Tensor:
    """Mean of ``exp(−(x − μ)² / 2σ²)`` over each pixel's extent along one axis → ``(..., D)``.

    ``mu (...)`` and ``sigma (...)`` in Å (same shape). Mean = σ√(π/2)/apix · [erf(u_hi) − erf(u_lo)] with
    ``u = (edge − μ) / (√2 σ)``.
    """
    # (D+1,) pixel edges in Å: pixel j spans [edge j, edge j+1]
    edges = (centered_axis(D, mu.device, mu.dtype) - 0.5) * apix
    edges = torch.cat([edges, edges[-1:] + apix])
    u = (edges - mu[..., None]) / (math.sqrt(2.0) * sigma[..., None])  # (..., D+1)
    lo, hi = u[..., :-1], u[..., 1:]
    # In the tails erf(hi) − erf(lo) is a difference of two numbers near ±1; erfc keeps the digits there.
    diff = torch.where(
        lo > 0,
        torch.erfc(lo) - torch.erfc(hi),
        torch.where(hi < 0, torch.erfc(-hi) - torch.erfc(-lo), torch.erf(hi) - torch.erf(lo)),
    )
    return diff * (sigma[..., None] * math.sqrt(math.pi / 2.0) / apix)


def project_gaussians(
    centers: torch.Tensor,
    sigmas: torch.Tensor,
    amplitudes: torch.Tensor,
    rot: torch.Tensor,
    D: int,
    apix: float,
    shifts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel-integrated projections of a Gaussian mixture → ``(B, D, D)`` indexed ``[y, x]``.

    centers ``(N, 3)`` or ``(B, N, 3)`` Å as [x, y, z] relative to the box centre; sigmas ``(N,)`` or
    ``(B, N)`` Å; amplitudes ``(N,)`` or ``(B, N)`` (density units); rot ``(B, 3, 3)``: a centre μ lands at
    ``(R μ)_xy``. ``shifts (B, 2)`` px move the image by ``+t``. Each pixel is the mean over its area of the
    line integral along z, in amplitude·Å.
    """
    B = rot.shape[0]
    centers = centers.expand(B, *centers.shape[-2:])  # (B, N, 3)
    mu = torch.einsum("bnj,bij->bni", centers, rot)  # (B, N, 3) rotated centres, Å
    xy = mu[..., :2]
    if shifts is not None:
        xy = xy + shifts[:, None, :] * apix
    N = xy.shape[1]
    sigmas = sigmas.expand(B, N)
    weight = amplitudes.expand(B, N) * sigmas * math.sqrt(2.0 * math.pi)  # (B, N) z-integral of each peak
    n_chunk = max(1, _FACTOR_ELEMENTS // (B * D))
    img = xy.new_zeros((B, D, D))
    for s in range(0, N, n_chunk):
        sl = slice(s, s + n_chunk)
        fx = _interval_means(xy[:, sl, 0], sigmas[:, sl], D, apix)  # (B, n, D) over x
        fy = _interval_means(xy[:, sl, 1], sigmas[:, sl], D, apix) * weight[:, sl, None]  # (B, n, D) over y
        img = img + torch.bmm(fy.transpose(1, 2), fx)  # (B, D_y, D_x)
    return img


def voxelize_gaussians(
    centers: torch.Tensor, sigmas: torch.Tensor, amplitudes: torch.Tensor, D: int, apix: float
) -> torch.Tensor:
    """Voxel-integrated density of a Gaussian mixture → ``(D, D, D)`` indexed ``[z, y, x]``.

    centers ``(N, 3)`` Å [x, y, z] relative to the box centre, sigmas and amplitudes ``(N,)``. Each voxel
    holds the mean density over its cube, so ``apix · vol.sum(0)`` is :func:`project_gaussians` at the
    identity pose (for Gaussians well inside the box).
    """
    N = centers.shape[0]
    n_chunk = max(1, _FACTOR_ELEMENTS // (D * D))
    vol = centers.new_zeros((D * D, D))
    for s in range(0, N, n_chunk):
        sl = slice(s, s + n_chunk)
        fx, fy, fz = (_interval_means(centers[sl, c], sigmas[sl], D, apix) for c in range(3))  # (n, D) each
        zy = (amplitudes[sl, None, None] * fz[:, :, None] * fy[:, None, :]).reshape(fx.shape[0], D * D)
        vol = vol + zy.T @ fx  # (D·D, D)
    return vol.reshape(D, D, D)
