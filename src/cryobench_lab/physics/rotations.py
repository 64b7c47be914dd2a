"""Rotation representations in the project's pose convention (docs/conventions.md).

All functions are batched over leading dimensions, pure torch and differentiable unless a docstring says
otherwise. A pose matrix ``R (3, 3)`` maps a 3D point ``μ`` (relative to the box centre) to the image
plane as ``(R μ)_xy``; this is the matrix cryoDRGN's ``parse_pose_star`` produces from RELION angles.

Representations:
- RELION Euler angles ``(rot, tilt, psi)`` in degrees (ZYZ). ``R`` equals RELION's own
  ``Euler_angles2matrix`` output, i.e. ``R = Rz(psi)ᵀ · Ry(tilt)ᵀ · Rz(rot)ᵀ`` written with active
  right-handed axis rotations; pinned against ``pose.star.pkl`` (cryoDRGN's parse of a real RELION star)
  in tests/test_rotations.py.
- Quaternions ``q = (w, x, y, z)``, scalar first.
- 6D: the first two ROWS of ``R`` concatenated, ``(R[0, :], R[1, :])``; these rows are the image x and y
  axes in volume coordinates, the part of the pose a projection depends on. Gram–Schmidt maps any
  (non-degenerate) 6-vector back to SO(3).
- Axis-angle: rotation vector ``v`` in radians, ``|v|`` the angle.
"""

from __future__ import annotations

import math

import roma
import torch


def random_rotations(
    n: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` rotation matrices drawn uniformly (Haar measure) on SO(3), shape ``(n, 3, 3)``.

    Deterministic for a given ``torch.Generator`` state (Shoemake's method via roma).
    """
    return roma.random_rotmat(n, dtype=dtype, device=device, generator=generator)


def euler_to_matrix(euler: torch.Tensor) -> torch.Tensor:
    """RELION ``(rot, tilt, psi)`` in degrees, shape ``(..., 3)`` → pose matrices ``(..., 3, 3)``.

    roma's intrinsic 'ZYZ' matrix is ``Rz(rot) Ry(tilt) Rz(psi)``; RELION's matrix is its transpose.
    """
    return roma.euler_to_rotmat("ZYZ", euler, degrees=True).transpose(-1, -2)


def matrix_to_euler(R: torch.Tensor) -> torch.Tensor:
    """Pose matrices ``(..., 3, 3)`` → RELION ``(rot, tilt, psi)`` in degrees ``(..., 3)``.

    ``tilt ∈ [0, 180]``, ``rot, psi ∈ [-180, 180]``. At gimbal lock (tilt 0 or 180, where only rot ± psi
    is defined) psi is set to 0; ``euler_to_matrix`` of the result still reproduces ``R``. Computed via a
    quaternion (robust near the singularities); not meant to be differentiated (used for writing files).
    """
    eps = float(torch.finfo(R.dtype).eps) if R.dtype.is_floating_point else 1e-7
    # Angles of Rᵀ in roma's intrinsic ZYZ are exactly RELION's (rot, tilt, psi).
    return roma.rotmat_to_euler("ZYZ", R.transpose(-1, -2), degrees=True, epsilon=max(eps, 1e-12))


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Quaternions ``(..., 4)`` as ``(w, x, y, z)`` → rotation matrices ``(..., 3, 3)``.

    The input is normalised first, so any non-zero 4-vector is accepted (useful as a network output).
    """
    q = q / q.norm(dim=-1, keepdim=True)
    return roma.unitquat_to_rotmat(roma.quat_wxyz_to_xyzw(q))


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` → unit quaternions ``(..., 4)`` as ``(w, x, y, z)`` with ``w ≥ 0``."""
    q = roma.quat_xyzw_to_wxyz(roma.rotmat_to_unitquat(R))
    # q and -q are the same rotation; pick the hemisphere w >= 0 so the output is unique.
    return torch.where(q[..., :1] < 0, -q, q)


def sixd_to_matrix(x: torch.Tensor) -> torch.Tensor:
    """6D vectors ``(..., 6)`` = (row 0, row 1) → rotation matrices ``(..., 3, 3)`` by Gram–Schmidt.

    Row 0 is normalised, row 1 made orthogonal to it and normalised, row 2 is their cross product.
    """
    # roma orthonormalises the first two COLUMNS: feed the rows as columns and transpose back.
    M = x.reshape(*x.shape[:-1], 2, 3).transpose(-1, -2)  # (..., 3, 2)
    return roma.special_gramschmidt(M).transpose(-1, -2)


def matrix_to_sixd(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` → 6D ``(..., 6)``: the first two rows concatenated."""
    return R[..., :2, :].reshape(*R.shape[:-2], 6)


def axis_angle_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """Rotation vectors ``(..., 3)`` (axis × angle in radians) → rotation matrices ``(..., 3, 3)``."""
    return roma.rotvec_to_rotmat(v)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` → rotation vectors ``(..., 3)`` in radians, angle in ``[0, π]``."""
    return roma.rotmat_to_rotvec(R)


def geodesic_distance(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Angle of the rotation ``R1ᵀ R2`` in degrees, ``[0, 180]``, shape ``(...)`` (broadcasts).

    Uses ``‖R1 − R2‖_F = 2√2 sin(θ/2)``, accurate at small angles (unlike ``acos`` of the trace).
    """
    R1, R2 = torch.broadcast_tensors(R1, R2)
    return torch.rad2deg(roma.rotmat_geodesic_distance(R1, R2))


def so3_grid(spacing_deg: float) -> torch.Tensor:
    """Quasi-uniform rotations of about ``spacing_deg`` spacing → ``(G, 3, 3)`` pose matrices.

    Viewing directions (the third row of R) on a Fibonacci sphere with ``4π / s²`` points, each with
    ``2π / s`` equally spaced in-plane angles (``s`` in radians): ``G ≈ 8π² / s³`` (4,392 at 15°).
    """
    s = math.radians(spacing_deg)
    n_dirs = max(2, round(4 * math.pi / s**2))
    n_psi = max(1, round(2 * math.pi / s))
    i = torch.arange(n_dirs, dtype=torch.float64) + 0.5
    tilt = torch.rad2deg(torch.acos(1 - 2 * i / n_dirs))
    rot = torch.rad2deg(torch.remainder(math.pi * (1 + 5**0.5) * i, 2 * math.pi))
    psi = torch.arange(n_psi, dtype=torch.float64) * (360.0 / n_psi)
    euler = torch.stack([rot[:, None].expand(-1, n_psi), tilt[:, None].expand(-1, n_psi),
                         psi[None].expand(n_dirs, -1)], -1).reshape(-1, 3)
    return euler_to_matrix(euler).float()


def local_rotations(step_rad: float) -> torch.Tensor:
    """The 27 rotations with axis-angle vectors in ``{−1, 0, 1}³ · step_rad`` → ``(27, 3, 3)`` (identity first)."""
    o = torch.tensor([0.0, -1.0, 1.0])
    v = torch.stack(torch.meshgrid(o, o, o, indexing="ij"), -1).reshape(-1, 3) * step_rad
    return axis_angle_to_matrix(v)
