"""io.stacks.ImageSource: lazy reads equal whole-file reads, runs are grouped, bad inputs are named."""

import pickle

import numpy as np
import pytest

from cryobench_lab.errors import InputError
from cryobench_lab.io.mrc import MRCStack, read_mrc, write_stack
from cryobench_lab.io.stacks import ImageSource
from shared_data import CRYOEM, needs_shared

# Particle files whose images are present: (file, n, D, stack the rows point into)
REAL_SOURCES = [
    ("real_particles/relion31/relion31.star", 5, 256, "real_particles/relion31/relion31.mrcs"),
    ("real_particles/relion31/relion31.v2.star", 5, 256, "real_particles/relion31/relion31.mrcs"),
    ("real_particles/empiar10076/empiar_10076_7.star", 7, 320, "real_particles/empiar10076/empiar_10076_7.mrc"),
    ("real_particles/empiar10076/empiar_10076_7.cs", 7, 320, "real_particles/empiar10076/empiar_10076_7.mrc"),
    ("real_particles/aspire_empiar10017/sample_relion_data.star", 17, 200,
     "real_particles/aspire_empiar10017/sample.mrcs"),
    ("real_tomo_sta/sta_testing_bin8.star", 219, 64,
     "real_tomo_sta/ay19102021_L3_position6_ribo_it09_bin8_1.82A.mrcs"),
    ("synthetic_toy/toy_projections.star", 1000, 30, "synthetic_toy/toy_projections.mrcs"),
    ("synthetic_toy/toy_projections.mrcs", 1000, 30, "synthetic_toy/toy_projections.mrcs"),
    ("synthetic_hand/hand.mrcs", 100, 64, "synthetic_hand/hand.mrcs"),
]


@needs_shared
@pytest.mark.parametrize("name,n,D,stack", REAL_SOURCES)
def test_real_sources_read_the_right_images(name, n, D, stack):
    src = ImageSource.from_path(CRYOEM / name)
    assert (src.n, src.D, len(src)) == (n, D, n)
    full, _ = read_mrc(CRYOEM / stack)
    idx = np.array([n - 1, 0, 1, 2, n // 2])
    # these stars list their stack's images in order: particle i is image i
    np.testing.assert_array_equal(src.read(idx), full[idx])


@needs_shared
def test_relion31_star_source_header_apix():
    src = ImageSource.from_path(CRYOEM / "real_particles/relion31/relion31.star")
    assert src.apix == 1.0  # the header's (wrong) value; the star's 2.806 is chosen by io.particles
    assert src.files == [str(CRYOEM / "real_particles/relion31/relion31.mrcs")]


def _stacks(tmp_path, sizes, D=8):
    rng = np.random.default_rng(0)
    paths, data = [], []
    for k, n in enumerate(sizes):
        images = rng.normal(size=(n, D, D)).astype(np.float32)
        path = tmp_path / f"s{k}.mrcs"
        write_stack(path, images, apix=2.0)
        paths.append(path)
        data.append(images)
    return paths, data


def test_txt_list_of_stacks(tmp_path):
    paths, data = _stacks(tmp_path, [3, 5, 2])
    (tmp_path / "sub").mkdir()
    txt = tmp_path / "sub" / "all.txt"
    txt.write_text("../s0.mrcs\n\n# comment\n" + str(paths[1]) + "\n../s2.mrcs\n")
    src = ImageSource.from_path(txt)
    everything = np.concatenate(data)
    assert (src.n, src.D, src.apix) == (10, 8, 2.0)
    np.testing.assert_array_equal(src.read(np.arange(10)), everything)
    np.testing.assert_array_equal(src.read([9, 0, 4, 3]), everything[[9, 0, 4, 3]])
    txt.write_text("../s0.mrcs\nmissing.mrcs\n")
    with pytest.raises(InputError, match=r"all.txt.*line 2.*missing.mrcs"):
        ImageSource.from_path(txt)


def test_reads_are_grouped_into_runs(tmp_path, monkeypatch):
    paths, data = _stacks(tmp_path, [6, 6])
    # particle order interleaves the two files
    src = ImageSource([paths[0], paths[1], paths[0], paths[1], paths[0], paths[0]], [0, 0, 1, 1, 2, 5])
    calls = []
    original = MRCStack.read

    def counting(self, indices):
        calls.append((self.path.name, indices))
        return original(self, indices)

    monkeypatch.setattr(MRCStack, "read", counting)
    out = src.read([4, 0, 2, 3, 1, 5])
    expected = np.stack([data[0][2], data[0][0], data[0][1], data[1][1], data[1][0], data[0][5]])
    np.testing.assert_array_equal(out, expected)
    # s0 images 0,1,2 are one run, s0 image 5 another, s1 images 0,1 a third
    assert sorted((name, (s.start, s.stop)) for name, s in calls) == [
        ("s0.mrcs", (0, 3)), ("s0.mrcs", (5, 6)), ("s1.mrcs", (0, 2))]
    assert all(isinstance(s, slice) for _, s in calls)
    calls.clear()
    np.testing.assert_array_equal(src.read([3, 3]), np.stack([data[1][1]] * 2))  # duplicates
    assert src.read([]).shape == (0, 8, 8)
    with pytest.raises(IndexError):
        src.read([6])


def test_lru_of_open_files_and_pickling(tmp_path):
    paths, data = _stacks(tmp_path, [2, 2, 2])
    src = ImageSource([p for p in paths for _ in range(2)], [0, 1] * 3, max_open=1)
    for i in range(6):
        np.testing.assert_array_equal(src.read([i])[0], data[i // 2][i % 2])
        assert sum(s._fh is not None for s in src._stacks) == 1  # only one file open at a time
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone.read([5, 0]), np.stack([data[2][1], data[0][0]]))
    src.close()
    assert all(s._fh is None for s in src._stacks)


def test_validation_errors_name_source_row_and_length(tmp_path):
    paths, _ = _stacks(tmp_path, [4])
    with pytest.raises(InputError) as err:
        ImageSource([paths[0]] * 3, [0, 3, 4], source="particles.star")
    msg = str(err.value)
    assert "particles.star" in msg and "row 3" in msg and "image 5" in msg and "holds 4 images" in msg
    with pytest.raises(InputError, match=r"particles.star.*row 2.*gone.mrcs.*does not exist"):
        ImageSource([paths[0], tmp_path / "gone.mrcs"], [0, 0], source="particles.star")
    write_stack(tmp_path / "big.mrcs", np.zeros((2, 16, 16)), apix=1.0)
    with pytest.raises(InputError, match=r"big.mrcs has 16 px.*8 px"):
        ImageSource([paths[0], tmp_path / "big.mrcs"], [0, 0])
    with pytest.raises(InputError, match="no particle images"):
        ImageSource([], [])


def test_truncated_stack_in_a_source(tmp_path):
    paths, _ = _stacks(tmp_path, [4])
    size = paths[0].stat().st_size
    with open(paths[0], "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(InputError, match=rf"s0.mrcs.*truncated.*{size}.*{size - 10}"):
        ImageSource.from_path(paths[0])


def test_unknown_suffix(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"")
    with pytest.raises(InputError, match=r"x.h5.*unknown particle file type"):
        ImageSource.from_path(tmp_path / "x.h5")
    with pytest.raises(InputError, match="nothing.star"):
        ImageSource.from_path(tmp_path / "nothing.star")
