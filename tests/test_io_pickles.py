"""io.pickles: the restricted unpickler refuses code, and cryoDRGN pose/CTF pickles load and round-trip."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from cryobench_lab.errors import InputError
from cryobench_lab.io.pickles import load_ctf, load_pickle, load_poses, save_ctf, save_pickle, save_poses
from cryobench_lab.physics.rotations import random_rotations
from shared_data import CRYOEM, needs_shared

# Every pickle in the shared data and what SOURCES.md says it holds.
REAL_PICKLES = {
    "real_particles/metadata_only/pose.star.pkl": ("poses", (5, 3, 3), (5, 2)),
    "real_particles/metadata_only/ctf1.pkl": ("ctf", (5, 9)),
    "real_particles/cryosparc/pose.cs.pkl": ("poses", (2019, 3, 3), (2019, 2)),
    "real_particles/cryosparc/ctf2.pkl": ("ctf", (2019, 9)),
    "real_tomo_sta/sta_pose.pkl": ("poses", (219, 3, 3), (219, 2)),
    "real_tomo_sta/sta_ctf.pkl": ("ctf", (219, 9)),
    "real_tomo_sta/ind_39_sta_testing_bin8.pkl": ("array", (195,)),
    "synthetic_toy/test_ctf.pkl": ("ctf", (1000, 9)),
    "synthetic_toy/toy_angles.pkl": ("rot", (1000, 3, 3)),
    "synthetic_toy/toy_rot_trans.pkl": ("poses", (1000, 3, 3), (1000, 2)),
    "synthetic_hand/hand_rot.pkl": ("rot", (100, 3, 3)),
    "synthetic_hand/hand_rot_trans.pkl": ("poses", (100, 3, 3), (100, 2)),
}


@needs_shared
@pytest.mark.parametrize("name", sorted(REAL_PICKLES))
def test_real_pickles_load(name):
    kind, *shapes = REAL_PICKLES[name]
    obj = load_pickle(CRYOEM / name)
    path = CRYOEM / name
    if kind == "poses":
        rot, trans = obj
        assert rot.shape == shapes[0] and trans.shape == shapes[1]
        D = 64
        r, t = load_poses(path, n=shapes[0][0], D=D)
        assert r.dtype == np.float32 and t.dtype == np.float32
        np.testing.assert_allclose(r, rot, atol=1e-6)
        np.testing.assert_allclose(t, trans * D, rtol=1e-6, atol=1e-6)
    elif kind == "rot":
        r, t = load_poses(path, n=shapes[0][0])
        assert r.shape == shapes[0] and t is None
    elif kind == "ctf":
        ctf = load_ctf(path, n=shapes[0][0])
        assert ctf.shape == shapes[0] and ctf.dtype == np.float32
    else:
        assert obj.shape == shapes[0] and obj.dtype == np.int64


@needs_shared
def test_pfcrt_pickles_values():
    # pose.star.pkl trans = rlnOrigin (px) / 300; ctf1.pkl = [300, 1.035, dfU, ...] (SOURCES.md)
    _rot, trans = load_poses(CRYOEM / "real_particles/metadata_only/pose.star.pkl", n=5, D=300)
    np.testing.assert_allclose(trans[0], [-0.14063, -0.04688], atol=1e-5)
    ctf = load_ctf(CRYOEM / "real_particles/metadata_only/ctf1.pkl", n=5)
    np.testing.assert_allclose(ctf[0, :4], [300, 1.035, 15686.0, 17521.4], rtol=1e-6)


# --- the restricted unpickler refuses anything but numpy data ---------------------------------------

def _side_effect(path):
    Path(path).write_text("code ran")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (_side_effect, (self.target,))


class _Plain:
    def __init__(self):
        self.x = np.zeros(3)


def test_refuses_code_execution(tmp_path):
    target = tmp_path / "pwned"
    payload = pickle.dumps((np.zeros((2, 3, 3)), _Evil(str(target))))
    # sanity: an ordinary unpickler really would run the code
    pickle.loads(payload)
    assert target.exists()
    target.unlink()
    path = tmp_path / "poses.pkl"
    path.write_bytes(payload)
    with pytest.raises(InputError) as err:
        load_pickle(path)
    assert "poses.pkl" in str(err.value) and "_side_effect" in str(err.value)
    assert not target.exists()  # refused, not executed
    with pytest.raises(InputError, match="poses.pkl"):
        load_poses(path, D=64)


def test_refuses_class_instances_and_object_arrays(tmp_path):
    path = tmp_path / "obj.pkl"
    path.write_bytes(pickle.dumps(_Plain()))
    with pytest.raises(InputError, match=r"obj.pkl.*_Plain"):
        load_pickle(path)
    path.write_bytes(pickle.dumps(np.array([1, "a", None], dtype=object)))
    with pytest.raises(InputError, match=r"obj.pkl.*object"):
        load_pickle(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(InputError, match="obj.pkl"):
        load_pickle(path)


def test_admits_numpy_containers_of_all_protocols(tmp_path):
    obj = {"rot": np.eye(3)[None], "n": 3, "labels": [np.int64(2), 1.5], "t": (np.float32(1.0), None)}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        back = load_pickle(path)
        np.testing.assert_array_equal(back["rot"], obj["rot"])
        assert back["labels"][0] == 2 and back["t"][1] is None


# --- pose and CTF checks ----------------------------------------------------------------------------

def _poses(n, seed=0):
    rot = random_rotations(n, generator=__import__("torch").Generator().manual_seed(seed)).numpy()
    trans = np.random.default_rng(seed).uniform(-0.1, 0.1, size=(n, 2)).astype(np.float32)
    return rot, trans


def test_load_poses_row_count_mismatch(tmp_path):
    path = tmp_path / "poses.pkl"
    save_pickle(path, _poses(999))
    with pytest.raises(InputError) as err:
        load_poses(path, n=1000, D=128)
    msg = str(err.value)
    assert "poses.pkl" in msg and "999 rows" in msg and "1000 images" in msg


@pytest.mark.parametrize(
    "obj,match",
    [
        ((np.zeros((5, 3)), np.zeros((5, 2))), r"\(N, 3, 3\)"),
        ((np.tile(np.eye(3), (5, 1, 1)), np.zeros((5, 3))), r"\(5, 2\)"),
        ((np.tile(np.eye(3), (5, 1, 1)), np.zeros((4, 2))), r"\(5, 2\)"),
        ((np.tile(np.diag([1.0, 1, -1]), (5, 1, 1)), np.zeros((5, 2))), "not proper rotation"),
        ((np.tile(2 * np.eye(3), (5, 1, 1)), np.zeros((5, 2))), "not proper rotation"),
        ((np.tile(np.eye(3), (5, 1, 1)), np.full((5, 2), 12.0)), "fraction of the box"),
        ((np.tile(np.eye(3), (5, 1, 1)), np.zeros((5, 2)), np.zeros(5)), "sequence of 3"),
        ({"rot": np.eye(3)}, "dict"),
    ],
)
def test_load_poses_bad_shapes(tmp_path, obj, match):
    path = tmp_path / "bad_poses.pkl"
    save_pickle(path, obj)
    with pytest.raises(InputError, match=match) as err:
        load_poses(path, D=64)
    assert "bad_poses.pkl" in str(err.value)


def test_load_poses_needs_box_for_shifts(tmp_path):
    path = tmp_path / "poses.pkl"
    save_pickle(path, _poses(3))
    with pytest.raises(InputError, match="box size"):
        load_poses(path)


def test_load_ctf_bad_input(tmp_path):
    path = tmp_path / "ctf.pkl"
    save_pickle(path, np.zeros((10, 8), dtype=np.float32))
    with pytest.raises(InputError, match=r"ctf.pkl.*\(N, 9\)"):
        load_ctf(path)
    good = np.tile(np.array([128, 3.0, 1e4, 1e4, 0, 300, 2.7, 0.1, 0], dtype=np.float32), (10, 1))
    save_pickle(path, good)
    with pytest.raises(InputError, match=r"ctf.pkl.*10 rows.*11 images"):
        load_ctf(path, n=11)
    swapped = good.copy()
    swapped[:, 1] = 0.0
    save_pickle(path, swapped)
    with pytest.raises(InputError, match="apix"):
        load_ctf(path)


def test_save_load_poses_round_trip(tmp_path):
    rot, trans_frac = _poses(50, seed=3)
    trans_px = trans_frac * 128
    path = tmp_path / "poses.pkl"
    save_poses(path, rot, trans_px, D=128)
    # cryoDRGN format on disk: (rot float32, trans as a fraction of the box float32)
    raw = load_pickle(path)
    assert isinstance(raw, tuple) and raw[0].dtype == np.float32 and raw[1].dtype == np.float32
    np.testing.assert_allclose(raw[1], trans_px / 128, rtol=1e-6)
    r, t = load_poses(path, n=50, D=128)
    np.testing.assert_array_equal(r, rot)
    np.testing.assert_allclose(t, trans_px, rtol=1e-6, atol=1e-6)
    save_poses(tmp_path / "rot_only.pkl", rot)
    r, t = load_poses(tmp_path / "rot_only.pkl", n=50)
    assert t is None and np.array_equal(r, rot)


def test_save_load_ctf_round_trip(tmp_path):
    ctf = np.random.default_rng(0).uniform(1, 2, size=(20, 9)).astype(np.float64)
    save_ctf(tmp_path / "ctf.pkl", ctf)
    back = load_ctf(tmp_path / "ctf.pkl", n=20)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, ctf.astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctf.pkl"]  # atomic: no temporary left
