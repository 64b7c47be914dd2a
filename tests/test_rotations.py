"""physics.rotations: closed forms, round trips, uniformity, and the Euler convention pinned to cryoDRGN."""

import math
import pickle

import numpy as np
import pytest
import starfile
import torch

from cryobench_lab.physics.rotations import (
    axis_angle_to_matrix,
    euler_to_matrix,
    geodesic_distance,
    matrix_to_axis_angle,
    matrix_to_euler,
    matrix_to_quaternion,
    matrix_to_sixd,
    quaternion_to_matrix,
    random_rotations,
    sixd_to_matrix,
)
from shared_data import CRYOEM, needs_shared


def _rz_active(deg):
    """Active right-handed rotation about z by ``deg`` degrees (numpy reference)."""
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def _ry_active(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def _relion_reference(rot, tilt, psi):
    """RELION's Euler matrix written independently: passive ZYZ, Rz(psi)ᵀ Ry(tilt)ᵀ Rz(rot)ᵀ."""
    return _rz_active(psi).T @ _ry_active(tilt).T @ _rz_active(rot).T


def _is_rotation(R, atol=1e-5):
    eye = torch.eye(3, dtype=R.dtype)
    return bool(torch.allclose(R @ R.mT, eye.expand_as(R), atol=atol)) and bool(
        torch.allclose(torch.linalg.det(R), torch.ones((), dtype=R.dtype), atol=atol)
    )


def _restricted_load(path):
    """Minimal numpy-only unpickler (the tested one lives in io.pickles; this file tests rotations only)."""

    class _U(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("numpy") and name in ("_reconstruct", "ndarray", "dtype", "scalar"):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name}")

    with open(path, "rb") as f:
        return _U(f).load()


# --- random rotations ---------------------------------------------------------------------------------

def test_random_rotations_are_rotations_and_deterministic():
    R1 = random_rotations(500, generator=torch.Generator().manual_seed(3))
    R2 = random_rotations(500, generator=torch.Generator().manual_seed(3))
    R3 = random_rotations(500, generator=torch.Generator().manual_seed(4))
    assert R1.shape == (500, 3, 3) and R1.dtype == torch.float32
    assert _is_rotation(R1)
    assert torch.equal(R1, R2)
    assert not torch.allclose(R1, R3)
    assert random_rotations(2, dtype=torch.float64).dtype == torch.float64


def test_random_rotations_are_haar_uniform():
    n = 40000
    R = random_rotations(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Haar measure: E[R] = 0, and the rotation angle θ has CDF (θ - sin θ) / π.
    assert R.mean(0).abs().max() < 0.02
    theta = torch.acos(((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)).sort().values
    cdf = (theta - torch.sin(theta)) / math.pi
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (cdf - empirical).abs().max() < 0.01  # Kolmogorov–Smirnov distance; 1.6/sqrt(n) ≈ 0.008
    # The viewing direction (third row) is uniform on the sphere: second moments are I/3.
    z = R[:, 2, :]
    assert torch.allclose(z.T @ z / n, torch.eye(3, dtype=torch.float64) / 3, atol=0.01)


# --- Euler (RELION) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("angles", [(0, 0, 0), (30, 50, -70), (-120.5, 100, 12), (10, 180, 20), (90, 90, 90)])
def test_euler_matches_independent_relion_formula(angles):
    R = euler_to_matrix(torch.tensor(angles, dtype=torch.float64))
    np.testing.assert_allclose(R.numpy(), _relion_reference(*angles), atol=1e-12)


def test_euler_closed_form_tilt_90():
    # tilt = 90: the volume's z axis ends up along -x of the image (Rμ with μ = e_z).
    R = euler_to_matrix(torch.tensor([0.0, 90.0, 0.0], dtype=torch.float64))
    assert torch.allclose(R @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64),
                          torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-12)
    # pure rot/psi about z with tilt 0: R = Rz(rot + psi)ᵀ
    R = euler_to_matrix(torch.tensor([20.0, 0.0, 15.0], dtype=torch.float64))
    np.testing.assert_allclose(R.numpy(), _rz_active(35).T, atol=1e-12)


@needs_shared
def test_euler_matches_cryodrgn_parse_pose_star_pfcrt():
    df = starfile.read(CRYOEM / "real_particles/metadata_only/FinalRefinement-OriginalParticles-PfCRT.star")
    rot_ref, _ = _restricted_load(CRYOEM / "real_particles/metadata_only/pose.star.pkl")
    euler = torch.tensor(df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64))
    R = euler_to_matrix(euler).numpy()
    assert R.shape == (5, 3, 3)
    np.testing.assert_allclose(R, rot_ref, atol=1e-12)
    # and not its transpose: the convention is pinned, not just "a rotation"
    assert np.abs(R.transpose(0, 2, 1) - rot_ref).max() > 0.5


@needs_shared
def test_euler_matches_cryodrgn_sta_poses_219_rows():
    df = starfile.read(CRYOEM / "real_tomo_sta/sta_testing_bin8.star")
    rot_ref, _ = _restricted_load(CRYOEM / "real_tomo_sta/sta_pose.pkl")
    euler = torch.tensor(df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64))
    R = euler_to_matrix(euler).numpy()
    assert R.shape == rot_ref.shape == (219, 3, 3)
    np.testing.assert_allclose(R, rot_ref, atol=1e-10)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_matrix_to_euler_round_trip_random(dtype, atol):
    R = random_rotations(2000, generator=torch.Generator().manual_seed(1), dtype=dtype)
    euler = matrix_to_euler(R)
    assert euler.shape == (2000, 3)
    assert (euler[:, 1] >= 0).all() and (euler[:, 1] <= 180).all()
    assert (euler[:, [0, 2]].abs() <= 180 + 1e-4).all()
    assert (euler_to_matrix(euler) - R).abs().max() < atol


@pytest.mark.parametrize("tilt", [0.0, 1e-7, 1e-5, 1e-3, 0.5, 179.5, 180 - 1e-3, 180 - 1e-5, 180.0])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 3e-6), (torch.float64, 1e-9)])
def test_matrix_to_euler_near_gimbal_lock(tilt, dtype, atol):
    g = torch.Generator().manual_seed(2)
    n = 300
    euler = torch.stack([torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180,
                         torch.full((n,), tilt, dtype=torch.float64),
                         torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180], -1)
    R = euler_to_matrix(euler).to(dtype)
    back = euler_to_matrix(matrix_to_euler(R))
    # compare matrices, not angles: at gimbal lock only rot ± psi is defined
    assert (back - R).abs().max() < atol


def test_euler_batch_shapes_and_gradient():
    euler = torch.randn(4, 2, 3, dtype=torch.float64) * 60
    assert euler_to_matrix(euler).shape == (4, 2, 3, 3)
    assert matrix_to_euler(euler_to_matrix(euler)).shape == (4, 2, 3)
    x = torch.tensor([[10.0, 40.0, -30.0], [100.0, 120.0, 5.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(euler_to_matrix, (x,))


# --- quaternions ---------------------------------------------------------------------------------------

def test_quaternion_closed_form_wxyz():
    theta = 0.7
    q = torch.tensor([math.cos(theta / 2), 0.0, 0.0, math.sin(theta / 2)], dtype=torch.float64)  # (w, x, y, z)
    np.testing.assert_allclose(quaternion_to_matrix(q).numpy(), _rz_active(math.degrees(theta)), atol=1e-12)
    # unnormalised input is normalised first
    np.testing.assert_allclose(quaternion_to_matrix(3 * q).numpy(), _rz_active(math.degrees(theta)), atol=1e-12)
    assert torch.allclose(quaternion_to_matrix(torch.tensor([1.0, 0, 0, 0])), torch.eye(3))


def test_quaternion_round_trip_and_hemisphere():
    R = random_rotations(1000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    q = matrix_to_quaternion(R)
    assert q.shape == (1000, 4)
    assert (q[:, 0] >= 0).all()
    assert torch.allclose(q.norm(dim=-1), torch.ones(1000, dtype=torch.float64))
    assert torch.allclose(quaternion_to_matrix(q), R, atol=1e-12)
    assert torch.allclose(quaternion_to_matrix(-q), R, atol=1e-12)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(quaternion_to_matrix, (x,))


# --- 6D ------------------------------------------------------------------------------------------------

def test_sixd_round_trip_and_gram_schmidt():
    R = random_rotations(500, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = matrix_to_sixd(R)
    assert x.shape == (500, 6)
    assert torch.equal(x[:, :3], R[:, 0]) and torch.equal(x[:, 3:], R[:, 1])  # rows, not columns
    assert torch.allclose(sixd_to_matrix(x), R, atol=1e-12)
    # arbitrary 6-vectors map to rotations whose first row is the normalised first 3-vector
    v = torch.randn(200, 6, dtype=torch.float64)
    M = sixd_to_matrix(v)
    assert _is_rotation(M, atol=1e-10)
    assert torch.allclose(M[:, 0], v[:, :3] / v[:, :3].norm(dim=-1, keepdim=True))
    # second row lies in the plane of the two input vectors
    assert torch.allclose((torch.cross(v[:, :3], v[:, 3:], dim=-1) * M[:, 1]).sum(-1),
                          torch.zeros(200, dtype=torch.float64), atol=1e-10)
    xg = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sixd_to_matrix, (xg,))


# --- axis-angle ----------------------------------------------------------------------------------------

def test_axis_angle_closed_form_and_round_trip():
    v = torch.tensor([0.0, 0.0, math.pi / 2], dtype=torch.float64)
    np.testing.assert_allclose(axis_angle_to_matrix(v).numpy(), _rz_active(90), atol=1e-12)
    v = torch.tensor([0.0, 0.3, 0.0], dtype=torch.float64)
    np.testing.assert_allclose(axis_angle_to_matrix(v).numpy(), _ry_active(math.degrees(0.3)), atol=1e-12)
    R = random_rotations(500, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    w = matrix_to_axis_angle(R)
    assert (w.norm(dim=-1) <= math.pi + 1e-9).all()
    assert torch.allclose(axis_angle_to_matrix(w), R, atol=1e-10)


# --- geodesic distance ---------------------------------------------------------------------------------

@pytest.mark.parametrize("deg", [0.0, 1e-3, 0.5, 30.0, 90.0, 179.0])
def test_geodesic_distance_closed_form(deg):
    R = torch.tensor(_rz_active(deg))
    d = geodesic_distance(torch.eye(3, dtype=torch.float64), R)
    assert abs(d.item() - deg) < 1e-6 * max(deg, 1.0) + 1e-9


def test_geodesic_distance_invariances():
    g = torch.Generator().manual_seed(8)
    A, B, C = (random_rotations(300, generator=g, dtype=torch.float64) for _ in range(3))
    d = geodesic_distance(A, B)
    assert d.shape == (300,) and (d >= 0).all() and (d <= 180).all()
    assert torch.allclose(d, geodesic_distance(B, A))
    assert torch.allclose(d, geodesic_distance(C @ A, C @ B), atol=1e-8)  # left invariance
    assert torch.allclose(d, geodesic_distance(A @ C, B @ C), atol=1e-8)  # right invariance
    # equals the angle of the relative rotation's axis-angle vector
    assert torch.allclose(d, torch.rad2deg(matrix_to_axis_angle(A.mT @ B).norm(dim=-1)), atol=1e-6)
    # broadcasting one reference against a batch
    assert geodesic_distance(torch.eye(3, dtype=torch.float64), A).shape == (300,)
