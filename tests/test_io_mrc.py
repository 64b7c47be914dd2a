"""io.mrc: round trips, atomic writes, header validation, and every real map/stack in the shared data."""

import os
import pickle

import mrcfile
import numpy as np
import pytest

from cryobench_lab.errors import InputError
from cryobench_lab.io.mrc import MRCStack, read_mrc, write_mrc, write_stack
from shared_data import CRYOEM, needs_shared

# (file, shape, header voxel size, mean, std) as listed in SOURCES.md (mrcfile's own reading).
REAL_MAPS = [
    ("maps/1ake.mrc", (64, 64, 64), 2.0, 0.0129, 0.11),
    ("maps/EMD-3197.map", (20, 20, 20), 11.4, 0.784, 2.4),
    ("maps/clean70SRibosome_vol_65p.mrc", (65, 65, 65), 0.0, 1.63e-06, 6.88e-05),
    ("synthetic_toy/toymodel_small_nocenter.mrc", (30, 30, 30), 1.0, 0.00667, 0.0814),
    ("synthetic_hand/hand-vol.mrc", (64, 64, 64), 1.0, 0.00103, 0.104),
]
REAL_STACKS = [
    ("real_particles/aspire_empiar10017/sample.mrcs", (17, 200, 200), 0.0, 0.0106, 1.01),
    ("real_particles/empiar10076/empiar_10076_7.mrc", (7, 320, 320), 0.0, -0.00343, None),
    ("real_particles/relion31/relion31.mrcs", (5, 256, 256), 1.0, 0.0108, 1.01),
    ("real_tomo_sta/ay19102021_L3_position6_ribo_it09_bin8_1.82A.mrcs", (220, 64, 64), 1.0, -0.208, 11.7),
    ("synthetic_hand/hand.mrcs", (100, 64, 64), 1.0, 0.403, 1.45),
    ("synthetic_toy/toy_projections.mrcs", (1000, 30, 30), 1.0, 0.2, 0.872),
]


def _close(value, ref):
    """Agreement to the 3 significant digits SOURCES.md prints."""
    return abs(value - ref) <= 0.006 * abs(ref) + 1e-12


# --- real files -------------------------------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("name,shape,apix,mean,std", REAL_MAPS + REAL_STACKS)
def test_read_mrc_real_files(name, shape, apix, mean, std):
    data, header_apix = read_mrc(CRYOEM / name)
    assert data.dtype == np.float32 and data.shape == shape
    assert header_apix == pytest.approx(apix, abs=1e-4)
    assert _close(float(data.astype(np.float64).mean()), mean)
    if std is not None:
        assert _close(float(data.astype(np.float64).std()), std)


@needs_shared
@pytest.mark.parametrize("name,shape,apix,mean,std", REAL_STACKS)
def test_mrcstack_real_files(name, shape, apix, mean, std):
    stack = MRCStack(CRYOEM / name)
    assert (stack.n, stack.D, stack.D) == shape and len(stack) == shape[0]
    assert stack.apix == pytest.approx(apix, abs=1e-4)
    full, _ = read_mrc(CRYOEM / name)
    idx = np.array([shape[0] - 1, 0, shape[0] // 2])
    np.testing.assert_array_equal(stack.read(idx), full[idx])
    np.testing.assert_array_equal(stack.read(slice(1, 3)), full[1:3])
    stack.close()


# --- round trips ------------------------------------------------------------------------------------

def test_write_read_mrc_volume_round_trip(tmp_path):
    vol = np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float64)  # cast to float32 on write
    path = tmp_path / "vol.mrc"
    write_mrc(path, vol, apix=1.7, origin=(-10.0, 5.0, 2.5))
    data, apix = read_mrc(path)
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, vol.astype(np.float32))
    assert apix == pytest.approx(1.7, rel=1e-6)
    with mrcfile.open(path) as mrc:  # a strictly valid file (not only permissive-readable)
        assert mrc.header.mode == 2
        assert (float(mrc.header.origin.x), float(mrc.header.origin.y), float(mrc.header.origin.z)) == (
            -10.0, 5.0, 2.5)


def test_write_stack_and_read_back(tmp_path):
    images = np.random.default_rng(1).normal(size=(9, 16, 16)).astype(np.float32)
    path = tmp_path / "s.mrcs"
    write_stack(path, images, apix=3.0)
    with mrcfile.open(path) as mrc:
        assert mrc.is_image_stack()
    stack = MRCStack(path)
    assert (stack.n, stack.D, stack.apix) == (9, 16, pytest.approx(3.0))
    np.testing.assert_array_equal(stack.read(np.arange(9)), images)
    np.testing.assert_array_equal(stack.read([7, 2, 2]), images[[7, 2, 2]])
    np.testing.assert_array_equal(stack.read(4), images[4:5])
    with pytest.raises(IndexError, match="s.mrcs"):
        stack.read([9])
    # picklable (DataLoader workers): the map is dropped and reopened
    clone = pickle.loads(pickle.dumps(stack))
    np.testing.assert_array_equal(clone.read([3]), images[[3]])


def test_single_2d_image_is_stack_of_one(tmp_path):
    img = np.arange(64, dtype=np.float32).reshape(8, 8)
    write_mrc(tmp_path / "one.mrc", img, apix=1.5)
    stack = MRCStack(tmp_path / "one.mrc")
    assert (stack.n, stack.D) == (1, 8)
    np.testing.assert_array_equal(stack.read([0]), img[None])


def test_unset_voxel_size_reads_as_zero(tmp_path):
    path = tmp_path / "nosize.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((2, 4, 4), dtype=np.float32))  # voxel size left at 0
    assert read_mrc(path)[1] == 0.0
    assert MRCStack(path).apix == 0.0


def test_int16_stack_reads_as_float32(tmp_path):
    path = tmp_path / "int.mrcs"
    raw = np.arange(2 * 4 * 4, dtype=np.int16).reshape(2, 4, 4) - 10
    with mrcfile.new(path) as mrc:
        mrc.set_data(raw)
    out = MRCStack(path).read([1])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, raw[[1]].astype(np.float32))


# --- atomic writes ----------------------------------------------------------------------------------

def test_writes_are_atomic(tmp_path):
    path = tmp_path / "vol.mrc"
    write_mrc(path, np.ones((4, 4, 4)), apix=1.0)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_mrc(path, np.zeros((4, 4, 4)), apix="not a number")  # fails inside the temporary write
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.mrc"]  # no temporary left behind
    write_stack(tmp_path / "s.mrcs", np.zeros((2, 4, 4)), apix=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mrcs", "vol.mrc"]
    assert (path.stat().st_mode & 0o777) == (0o666 & ~_umask())


def _umask():
    old = os.umask(0)
    os.umask(old)
    return old


# --- bad input --------------------------------------------------------------------------------------

def test_truncated_stack_raises_with_sizes(tmp_path):
    path = tmp_path / "cut.mrcs"
    write_stack(path, np.zeros((10, 32, 32)), apix=1.0)
    full = path.stat().st_size
    assert full == 1024 + 10 * 32 * 32 * 4
    with open(path, "r+b") as f:
        f.truncate(full - 1000)
    with pytest.raises(InputError) as err:
        MRCStack(path)
    msg = str(err.value)
    assert "cut.mrcs" in msg and "truncated" in msg and str(full) in msg and str(full - 1000) in msg
    assert "\n" not in msg
    with pytest.raises(InputError, match="cut.mrcs"):
        read_mrc(path)


def test_non_square_images_raise(tmp_path):
    path = tmp_path / "rect.mrcs"
    write_stack(path, np.zeros((3, 16, 20)), apix=1.0)
    with pytest.raises(InputError, match=r"rect.mrcs.*16 x 20.*not square"):
        MRCStack(path)


def test_missing_and_garbage_files_raise(tmp_path):
    with pytest.raises(InputError, match="nothere.mrcs"):
        MRCStack(tmp_path / "nothere.mrcs")
    bad = tmp_path / "garbage.mrc"
    bad.write_bytes(b"not an mrc file at all")
    with pytest.raises(InputError, match="garbage.mrc"):
        read_mrc(bad)
    with pytest.raises(InputError, match="garbage.mrc"):
        MRCStack(bad)
