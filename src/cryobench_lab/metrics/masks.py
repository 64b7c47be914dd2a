"""Real-space masks for FSC: a soft sphere and a soft envelope around a (ground-truth) volume.

Both masks are ``(D, D, D)`` float32 tensors in [0, 1] on the volume grid of docs/conventions.md (voxel
``[z, y, x]`` has coordinates ``(x, y, z) = (l, j, i) - D // 2`` px). Their soft edge is a raised cosine
``0.5 · (1 + cos(π · t))``, ``t`` running from 0 to 1 across ``edge_px`` voxels, so the mask falls from
1 to 0 without the step that would ring in Fourier space and inflate high-frequency FSC shells.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from cryobench_lab.errors import InputError

#: ``volume_mask``'s default threshold: this fraction of the volume's 99.99th-percentile voxel value
#: (a maximum that one hot voxel cannot move).
DEFAULT_THRESHOLD_FRACTION = 0.5
DEFAULT_THRESHOLD_PERCENTILE = 99.99


def _cosine_edge(distance_px: torch.Tensor, edge_px: float) -> torch.Tensor:
    """1 where ``distance_px <= 0``, raised-cosine fall-off to 0 at ``edge_px``, 0 beyond (hard if edge 0)."""
    if edge_px <= 0:
        return (distance_px <= 0).to(torch.float32)
    t = (distance_px / edge_px).clamp(0.0, 1.0)
    return (0.5 * (1.0 + torch.cos(math.pi * t))).to(torch.float32)


def soft_sphere_mask(D: int, radius_px: float | None = None, edge_px: float = 3.0) -> torch.Tensor:
    """Sphere of ``radius_px`` voxels about the box centre with a ``edge_px``-wide cosine edge → (D, D, D).

    1 for ``r <= radius_px``, ``0.5 · (1 + cos(π (r − radius_px) / edge_px))`` up to ``radius_px + edge_px``,
    0 beyond (``r`` = distance from voxel ``D // 2`` in px). The default radius keeps the whole edge inside
    the box: ``D / 2 − edge_px``. ``edge_px = 0`` gives a hard ball.
    """
    radius_px = D / 2 - edge_px if radius_px is None else float(radius_px)
    if radius_px <= 0 or edge_px < 0:
        raise InputError(
            f"soft_sphere_mask: radius_px={radius_px}, edge_px={edge_px} for D={D}; use radius_px > 0 and "
            "edge_px >= 0 (radius + edge <= D/2 keeps the mask inside the box)"
        )
    a = torch.arange(D, dtype=torch.float64) - D // 2
    z, y, x = torch.meshgrid(a, a, a, indexing="ij")  # (D, D, D) each
    r = torch.sqrt(x**2 + y**2 + z**2)  # (D, D, D) px
    return _cosine_edge(r - radius_px, edge_px)


def default_threshold(vol) -> float:
    """``DEFAULT_THRESHOLD_FRACTION`` × the ``DEFAULT_THRESHOLD_PERCENTILE``-th percentile of the voxels."""
    v = vol.detach().cpu().numpy() if hasattr(vol, "detach") else np.asarray(vol)
    return float(DEFAULT_THRESHOLD_FRACTION * np.percentile(v, DEFAULT_THRESHOLD_PERCENTILE))


def volume_mask(
    vol, threshold: float | None = None, dilate_px: float = 3.0, edge_px: float = 3.0
) -> torch.Tensor:
    """Soft envelope of ``vol`` (D, D, D): threshold, dilate by a ball, add a cosine edge → (D, D, D) float32.

    - ``threshold`` (density units of ``vol``): voxels ``> threshold`` form the core. Default
      :func:`default_threshold`: half the 99.99th-percentile voxel value.
    - Dilation by a ball of radius ``dilate_px``: every voxel within Euclidean distance ``dilate_px`` of
      the core is 1 (exactly ``binary_dilation`` with a ball, computed from a distance transform).
    - Edge: ``0.5 · (1 + cos(π (d − dilate_px) / edge_px))`` for core distances ``d`` in
      ``(dilate_px, dilate_px + edge_px)``, 0 beyond.
    Density must be positive (the DataModule's ``invert`` makes it so).
    """
    v = vol.detach().cpu().numpy() if hasattr(vol, "detach") else np.asarray(vol)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise InputError(f"volume_mask: volume has shape {v.shape}; pass one cubic (D, D, D) volume")
    threshold = default_threshold(v) if threshold is None else float(threshold)
    core = v > threshold  # (D, D, D) bool
    if not core.any():
        raise InputError(
            f"volume_mask: no voxel exceeds threshold={threshold:.4g} (volume max {v.max():.4g}); "
            "pass a lower threshold, or check that density is positive (invert)"
        )
    return _envelope(core, dilate_px, edge_px)


def support_mask(volumes, dilate_px: float = 3.0, edge_px: float = 3.0) -> torch.Tensor:
    """One ground-truth-support mask for all states: the union of the cores of ``volumes`` (S, D, D, D) (each
    thresholded at its own :func:`default_threshold`), dilated by ``dilate_px`` with a ``edge_px`` cosine
    edge, as :func:`volume_mask` → (D, D, D) float32. One mask for every state (like CryoBench's single
    dataset mask), so every state is scored over the same voxels and density a method puts where another
    state has support is not hidden."""
    core = None
    for vol in volumes:
        v = vol.detach().cpu().numpy() if hasattr(vol, "detach") else np.asarray(vol)
        core = (v > default_threshold(v)) if core is None else core | (v > default_threshold(v))
    if core is None or not core.any():
        raise InputError("support_mask: no ground-truth voxel above threshold; check that density is positive (invert)")
    return _envelope(core, dilate_px, edge_px)


def _envelope(core: np.ndarray, dilate_px: float, edge_px: float) -> torch.Tensor:
    # Distance (px) of every voxel to the nearest core voxel; 0 inside the core.
    distance = torch.from_numpy(ndimage.distance_transform_edt(~core))  # (D, D, D) float64
    return _cosine_edge(distance - dilate_px, edge_px)
