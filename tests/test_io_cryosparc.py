"""io.cryosparc: .cs poses/shifts/CTF pinned to cryoDRGN's parse of the same file."""


import numpy as np
import pytest

from cryobench_lab.errors import InputError
from cryobench_lab.io.cryosparc import read_cs
from cryobench_lab.io.pickles import load_ctf, load_poses
from cryobench_lab.io.star import ctf_from_star, read_star, star_apix
from shared_data import CRYOEM, needs_shared

CS_P12 = CRYOEM / "real_particles/cryosparc/cryosparc_P12_J24_001_particles.cs"
CS_10076 = CRYOEM / "real_particles/empiar10076/empiar_10076_7.cs"


@needs_shared
def test_cs_poses_match_cryodrgn_pose_cs_pkl():
    cs = read_cs(CS_P12)
    assert cs["n"] == 2019 and cs["D"] == 180 and cs["apix"] == pytest.approx(2.95)
    rot_ref, trans_ref = load_poses(CRYOEM / "real_particles/cryosparc/pose.cs.pkl", n=2019, D=180)
    # R is the TRANSPOSE of the axis-angle matrix (as cryoDRGN reads it)
    np.testing.assert_allclose(cs["rot"], rot_ref, atol=2e-6)
    assert np.abs(cs["rot"].transpose(0, 2, 1) - rot_ref).max() > 0.5
    # shift is in pixels with the same sign as trans_px; the pickle stores shift / D
    np.testing.assert_allclose(cs["trans_px"], trans_ref, rtol=1e-6, atol=1e-5)
    assert cs["trans_px"][0] == pytest.approx([11.33438, -1.82812], abs=1e-4)


@needs_shared
def test_cs_ctf_matches_cryodrgn_ctf2_pkl():
    cs = read_cs(CS_P12)
    ctf_ref = load_ctf(CRYOEM / "real_particles/cryosparc/ctf2.pkl", n=2019)
    # columns: D, apix, dfU, dfV, dfAngle (deg, from radians), kV, Cs, w, phase (deg)
    np.testing.assert_allclose(cs["ctf"], ctf_ref, rtol=1e-5, atol=1e-4)
    assert cs["ctf"][0, 4] == pytest.approx(np.rad2deg(-1.36364), abs=1e-3)


@needs_shared
def test_cs_paths_and_indices():
    cs = read_cs(CS_P12)
    assert len(cs["paths"]) == 2019 and cs["paths"][0].startswith("J19/extract/")
    assert cs["indices"][:2].tolist() == [0, 1] and cs["indices"].dtype == np.int64
    small = read_cs(CS_10076)
    assert small["paths"] == ["empiar_10076_7.mrc"] * 7
    assert small["indices"].tolist() == list(range(7))
    assert small["rot"] is None and small["trans_px"] is None  # imported particles: no alignments
    assert small["D"] == 320 and small["apix"] == pytest.approx(1.31, rel=1e-5)


@needs_shared
def test_cs_ctf_agrees_with_the_star_of_the_same_images():
    cs = read_cs(CS_10076)
    df = read_star(CRYOEM / "real_particles/empiar10076/empiar_10076_7.star")
    ctf_star = ctf_from_star(df, 320, star_apix(df))
    # same defocus, voltage, Cs, w; the angle is stored in radians in the .cs and degrees in the star
    np.testing.assert_allclose(cs["ctf"][:, 2:], ctf_star[:, 2:], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(cs["ctf"][:, 1], ctf_star[:, 1], rtol=1e-5)


def test_leading_marker_is_stripped(tmp_path):
    dtype = [("uid", "<u8"), ("blob/path", "S20"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
             ("blob/psize_A", "<f4"), ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,))]
    arr = np.zeros(3, dtype=dtype)
    arr["blob/path"] = [b">J1/a.mrcs", b"J1/a.mrcs", b">J1/b.mrcs"]
    arr["blob/idx"] = [0, 1, 0]
    arr["blob/shape"] = 64
    arr["blob/psize_A"] = 1.5
    arr["alignments3D/pose"][1] = [0, 0, np.pi / 2]
    path = tmp_path / "p.cs"
    with open(path, "wb") as f:
        np.save(f, arr)
    cs = read_cs(path)
    assert cs["paths"] == ["J1/a.mrcs", "J1/a.mrcs", "J1/b.mrcs"]
    assert cs["ctf"] is None
    # axis-angle (0, 0, π/2) is Rz(90°); the pose matrix is its transpose
    np.testing.assert_allclose(cs["rot"][1], [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-6)


def test_bad_cs_files(tmp_path):
    path = tmp_path / "notcs.cs"
    path.write_text("hello")
    with pytest.raises(InputError, match="notcs.cs"):
        read_cs(path)
    with open(path, "wb") as f:
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # needs pickle: refused
    with pytest.raises(InputError, match="notcs.cs"):
        read_cs(path)
    with open(path, "wb") as f:
        np.save(f, np.zeros((3, 3)))  # not a structured array
    with pytest.raises(InputError, match=r"notcs.cs.*structured"):
        read_cs(path)
    arr = np.zeros(2, dtype=[("blob/shape", "<u4", (2,))])
    arr["blob/shape"] = [[64, 64], [64, 80]]
    with open(path, "wb") as f:
        np.save(f, arr)
    with pytest.raises(InputError, match=r"notcs.cs.*square"):
        read_cs(path)
