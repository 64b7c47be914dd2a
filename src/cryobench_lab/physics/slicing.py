"""Fourier slices: extraction from, and insertion into, a centred 3D spectrum.

Convention (docs/conventions.md): the 2D transform of the image with pose ``R`` at frequency
``(kx, ky)`` equals the 3D transform of the volume at ``[kx, ky, 0] @ R`` (row vector times R), so a
point ``μ`` of the volume lands at ``(R μ)_xy`` in the image.

Frequencies are in cycles/box of the IMAGE (index units ``j - D // 2``). A spectrum may be oversampled:
a volume zero-padded in real space to ``Dv = pad · D`` has its frequency ``k`` (cycles per image box) at
index ``pad · k + Dv // 2``. Interpolation is trilinear; samples outside the box contribute zero.
:func:`insert_slices` is the exact adjoint of :func:`extract_slices` (same corners, same weights).
"""

import torch
import torch.nn.functional as F

from cryobench_lab.physics.fft import fft3_center, ifft2_center
from cryobench_lab.physics.lattice import grid_2d
from cryobench_lab.physics.shift import phase_shift_2d

# Slice points handled per chunk: bounds the (P, 8) corner tensors to a few tens of MB.
_POINTS_PER_CHUNK = 1 << 18

# Zero border around the volume during interpolation: 1 voxel below, 2 above on each axis. Positions are
# clamped to [-1, Dv], so every corner of every point is inside the bordered box and points outside the
# volume only touch zero (or discarded) border voxels; no per-corner bounds test is needed.
_PAD_LO, _PAD_HI = 1, 2


def slice_coordinates(rot: torch.Tensor, D: int) -> torch.Tensor:
    """3D frequencies (cycles/box, index units) of each pixel of a ``D × D`` slice → ``(B, D, D, 3)``.

    ``coords[b, i, j] = [kx, ky, 0] @ rot[b]`` with ``kx = j - D//2``, ``ky = i - D//2``; rot ``(B, 3, 3)``.
    """
    k = grid_2d(D, device=rot.device, dtype=rot.dtype)  # (D, D, 2)
    # kz = 0, so only the first two rows of R contribute.
    return torch.einsum("hwc,bcj->bhwj", k, rot[:, :2, :])


def _trilinear_corners(pos: torch.Tensor, Dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and weights of the 8 trilinear corners of each point, in the BORDERED volume.

    ``pos (P, 3)`` = [x, y, z] indices (floats) into a ``(Dv, Dv, Dv)`` [z, y, x] volume. Indices address
    that volume padded by ``_PAD_LO`` / ``_PAD_HI`` zero voxels (box ``Dv + 3``). Returns ``idx (P, 8)``
    (int32, or int64 for huge boxes) and ``w (P, 8)``; the weights carry the gradient w.r.t. ``pos``.
    """
    Dp = Dv + _PAD_LO + _PAD_HI
    # int32 indices halve the memory traffic of the scatter/gather (fine while Dp³ < 2³¹, i.e. Dv < 1287)
    itype = torch.int32 if Dp**3 < 2**31 else torch.int64
    pos = pos.clamp(-1.0, float(Dv))
    base = torch.floor(pos)
    frac = pos - base  # (P, 3)
    ijk = base.to(itype) + _PAD_LO  # (P, 3) in [0, Dv + 1]
    flat = (ijk[:, 2] * Dp + ijk[:, 1]) * Dp + ijk[:, 0]  # (P,)
    offsets = torch.tensor(
        [dz * Dp * Dp + dy * Dp + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)],
        dtype=itype,
        device=pos.device,
    )
    idx = flat[:, None] + offsets  # (P, 8), corner order (dz, dy, dx) as in `offsets`
    w1 = torch.stack([1.0 - frac, frac], dim=1)  # (P, 2, 3): weights of the lower/upper corner per axis
    wyx = (w1[:, :, None, 1] * w1[:, None, :, 0]).reshape(-1, 1, 4)  # (P, 1, 4) in (dy, dx) order
    w = (w1[:, :, 2, None] * wyx).reshape(-1, 8)  # (P, 8) in (dz, dy, dx) order
    return idx, w


def _bordered(F_vol: torch.Tensor) -> torch.Tensor:
    """``F_vol (Dv, Dv, Dv)`` inside a zero border → ``(Dv + 3,) * 3``."""
    Dv = F_vol.shape[-1]
    out = F_vol.new_zeros((Dv + _PAD_LO + _PAD_HI,) * 3)
    inner = slice(_PAD_LO, _PAD_LO + Dv)
    out[inner, inner, inner] = F_vol
    return out


def _chunked_positions(rot: torch.Tensor, D: int, Dv: int):
    """Yield ``(batch slice, pos (b·D·D, 3))`` volume-index positions of slice pixels, a chunk at a time."""
    per_chunk = max(1, _POINTS_PER_CHUNK // (D * D))
    for start in range(0, rot.shape[0], per_chunk):
        sl = slice(start, start + per_chunk)
        coords = slice_coordinates(rot[sl], D)  # (b, D, D, 3) cycles per image box
        yield sl, (coords * (Dv / D) + Dv // 2).reshape(-1, 3)


def extract_slices(F_vol: torch.Tensor, rot: torch.Tensor, D: int | None = None) -> torch.Tensor:
    """Central slices of a centred spectrum ``F_vol (Dv, Dv, Dv)`` (complex or real) → ``(B, D, D)``.

    ``rot (B, 3, 3)``; ``D`` is the image box (default ``Dv``; for an oversampled spectrum pass the
    unpadded box). Differentiable w.r.t. ``F_vol`` and ``rot``.
    """
    Dv = F_vol.shape[-1]
    D = Dv if D is None else D
    flat = _bordered(F_vol).reshape(-1)
    out = []
    for _, pos in _chunked_positions(rot.to(F_vol.real.dtype), D, Dv):
        idx, w = _trilinear_corners(pos, Dv)  # (P, 8) each
        out.append((flat[idx] * w).sum(-1).reshape(-1, D, D))
    return torch.cat(out)


def insert_slices(
    F_imgs: torch.Tensor,
    rot: torch.Tensor,
    weights: torch.Tensor | None = None,
    out_num: torch.Tensor | None = None,
    out_den: torch.Tensor | None = None,
    vol_box: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear splatting of slices into 3D; the adjoint of :func:`extract_slices`.

    ``F_imgs (B, D, D)`` (complex or real) is accumulated into ``out_num (Dv, Dv, Dv)`` and ``weights
    (B, D, D)`` (e.g. CTF²; default ones, i.e. the interpolation weights alone) into ``out_den (Dv, Dv,
    Dv)``: in place when given, else into new zero volumes of box ``vol_box`` (default: the given output's
    box, else ``D``; use ``pad · D`` for an oversampled volume). Returns ``(out_num, out_den)``; a Wiener
    reconstruction is ``out_num / (out_den + 1/SNR)``.
    """
    D = F_imgs.shape[-1]
    given = out_num if out_num is not None else out_den
    Dv = vol_box if vol_box is not None else (given.shape[-1] if given is not None else D)
    real_dtype = F_imgs.real.dtype
    Dp = Dv + _PAD_LO + _PAD_HI
    num = F_imgs.new_zeros(Dp**3)  # bordered accumulators; the border collects out-of-box weight
    den = num.new_zeros(Dp**3, dtype=real_dtype)
    for sl, pos in _chunked_positions(rot.to(real_dtype), D, Dv):
        idx, w = _trilinear_corners(pos, Dv)  # (P, 8) each
        idx = idx.reshape(-1)
        num.index_add_(0, idx, (F_imgs[sl].reshape(-1, 1) * w).reshape(-1))
        den_src = w if weights is None else weights[sl].reshape(-1, 1) * w
        den.index_add_(0, idx, den_src.reshape(-1))
    inner = slice(_PAD_LO, _PAD_LO + Dv)
    num = num.reshape(Dp, Dp, Dp)[inner, inner, inner]
    den = den.reshape(Dp, Dp, Dp)[inner, inner, inner]
    if out_num is None:
        out_num = num.contiguous()
    else:
        out_num += num
    if out_den is None:
        out_den = den.contiguous()
    else:
        out_den += den
    return out_num, out_den


def volume_spectrum(vol: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Centred spectrum of ``vol (D, D, D)`` zero-padded in real space to ``pad · D`` → ``(pD, pD, pD)``.

    The volume's centre (index ``D // 2``) stays at the padded box's centre, so the padded spectrum
    sampled at ``pad · k`` equals the unpadded DFT at ``k`` and the padding only refines the Fourier grid
    that trilinear interpolation works on.
    """
    D = vol.shape[-1]
    Dv = pad * D
    lo = Dv // 2 - D // 2
    hi = Dv - D - lo
    return fft3_center(torch.nn.functional.pad(vol, (lo, hi) * 3))


def project_volume(
    vol: torch.Tensor,
    rot: torch.Tensor,
    shifts: torch.Tensor | None = None,
    apix: float = 1.0,
    pad: int = 2,
) -> torch.Tensor:
    """Projections of a real ``vol (D, D, D)`` ([z, y, x]) under poses ``rot (B, 3, 3)`` → ``(B, D, D)``.

    Fourier slice theorem on the spectrum of the volume zero-padded ``pad``-fold in real space (default
    2×): without the padding, trilinear interpolation between samples 1/D apart attenuates and aliases
    the high frequencies. Optional ``shifts (B, 2)`` px move the projection by ``+t``. Output is the line
    integral ``apix · Σ_z V`` (density·Å; with the default ``apix = 1`` simply the voxel sum along the
    viewing direction), so a voxelised Gaussian mixture projects onto :func:`project_gaussians`' scale.
    """
    D = vol.shape[-1]
    F = extract_slices(volume_spectrum(vol, pad), rot.to(vol.dtype), D)  # (B, D, D)
    if shifts is not None:
        F = phase_shift_2d(F, shifts)
    return ifft2_center(F).real * apix


def sample_spectrum(spectrum: torch.Tensor, coords: torch.Tensor, pad: int) -> torch.Tensor:
    """Trilinear samples of a centred complex spectrum ``(Dv, Dv, Dv)`` at frequencies ``coords (..., 3)``
    [kx, ky, kz] in cycles per IMAGE box (the spectrum is oversampled ``pad``-fold) → complex ``(...)``.
    Points outside the box are zero."""
    Dv = spectrum.shape[-1]
    pos = coords * pad + Dv // 2  # voxel index along [x, y, z]
    grid = (pos / (Dv - 1) * 2 - 1).reshape(1, 1, 1, -1, 3)  # grid_sample wants [x, y, z] in [-1, 1]
    vol = torch.view_as_real(spectrum).permute(3, 0, 1, 2)[None]  # (1, 2, Dv, Dv, Dv) [z, y, x]
    out = F.grid_sample(vol, grid.to(vol.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out.reshape(2, -1)
    return torch.complex(out[0], out[1]).reshape(coords.shape[:-1])
