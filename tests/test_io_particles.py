"""io.particles.load_particles: sources and priorities of poses, CTF and pixel size; row-count checks."""


import numpy as np
import pytest

from cryobench_lab.errors import InputError
from cryobench_lab.io.mrc import read_mrc, write_stack
from cryobench_lab.io.particles import ParticleMetadata, load_particles
from cryobench_lab.io.pickles import load_ctf, load_poses, save_ctf, save_pickle, save_poses
from shared_data import CRYOEM, needs_shared


@needs_shared
def test_relion31_star_everything_from_the_star():
    meta = load_particles(CRYOEM / "real_particles/relion31/relion31.star")
    assert isinstance(meta, ParticleMetadata)
    assert (meta.n, meta.D) == (5, 256)
    assert meta.apix == pytest.approx(2.806)  # star, not the header's 1.0
    assert meta.rot.shape == (5, 3, 3) and meta.trans_px.shape == (5, 2)
    np.testing.assert_allclose(meta.trans_px[0], [0.019324 / 2.806, -0.64686 / 2.806], rtol=1e-5)
    assert meta.ctf.shape == (5, 9) and (meta.ctf[:, 0] == 256).all()
    np.testing.assert_allclose(meta.ctf[:, 1], 2.806, rtol=1e-6)
    full, _ = read_mrc(CRYOEM / "real_particles/relion31/relion31.mrcs")
    np.testing.assert_array_equal(meta.images.read([4, 0]), full[[4, 0]])


@needs_shared
def test_empiar10076_star_and_cs_agree():
    a = load_particles(CRYOEM / "real_particles/empiar10076/empiar_10076_7.star")
    b = load_particles(CRYOEM / "real_particles/empiar10076/empiar_10076_7.cs")
    assert a.apix == pytest.approx(1.31, rel=1e-5) and b.apix == pytest.approx(1.31, rel=1e-5)
    assert a.rot is None and b.rot is None and a.trans_px is None
    np.testing.assert_allclose(a.ctf[:, 2:], b.ctf[:, 2:], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(a.images.read(np.arange(7)), b.images.read(np.arange(7)))


@needs_shared
def test_toy_stack_with_pickles():
    meta = load_particles(CRYOEM / "synthetic_toy/toy_projections.mrcs",
                          poses=CRYOEM / "synthetic_toy/toy_rot_trans.pkl",
                          ctf=CRYOEM / "synthetic_toy/test_ctf.pkl")
    rot, trans = load_poses(CRYOEM / "synthetic_toy/toy_rot_trans.pkl", D=30)
    assert (meta.n, meta.D, meta.apix) == (1000, 30, 1.0)
    np.testing.assert_array_equal(meta.rot, rot)
    np.testing.assert_array_equal(meta.trans_px, trans)  # fraction × 30
    np.testing.assert_array_equal(meta.ctf, load_ctf(CRYOEM / "synthetic_toy/test_ctf.pkl"))


@needs_shared
def test_star_with_pickles_overrides_and_row_check():
    star = CRYOEM / "synthetic_toy/toy_projections.star"
    meta = load_particles(star, poses=CRYOEM / "synthetic_toy/toy_rot_trans.pkl",
                          ctf=CRYOEM / "synthetic_toy/test_ctf.pkl")
    assert meta.apix == 1.0 and meta.rot.shape == (1000, 3, 3)
    no_poses = load_particles(star, ctf=CRYOEM / "synthetic_toy/test_ctf.pkl")
    assert no_poses.rot is None and no_poses.ctf.shape == (1000, 9)


@needs_shared
def test_row_count_mismatch_is_refused(tmp_path):
    rot, trans = load_poses(CRYOEM / "synthetic_toy/toy_rot_trans.pkl", D=30)
    save_poses(tmp_path / "poses.pkl", rot[:999], trans[:999], D=30)
    with pytest.raises(InputError) as err:
        load_particles(CRYOEM / "synthetic_toy/toy_projections.star", poses=tmp_path / "poses.pkl")
    assert "poses.pkl" in str(err.value) and "999 rows" in str(err.value) and "1000 images" in str(err.value)
    ctf = load_ctf(CRYOEM / "synthetic_toy/test_ctf.pkl")
    save_ctf(tmp_path / "ctf.pkl", ctf[:10])
    with pytest.raises(InputError, match=r"ctf.pkl.*10 rows.*1000 images"):
        load_particles(CRYOEM / "synthetic_toy/toy_projections.mrcs", ctf=tmp_path / "ctf.pkl")


@needs_shared
def test_sta_star_and_ctf_pickle_disagree_on_pixel_size():
    # sta_ctf.pkl says 1.82 Å at D=512 (14.56 Å at the stack's 64 px); the star says 1.96 Å for the same
    # 64 px images. Real metadata in disagreement must not be paired silently.
    with pytest.raises(InputError, match=r"sta_ctf.pkl.*14.56.*sta_testing_bin8.star.*1.96"):
        load_particles(CRYOEM / "real_tomo_sta/sta_testing_bin8.star", ctf=CRYOEM / "real_tomo_sta/sta_ctf.pkl")
    meta = load_particles(CRYOEM / "real_tomo_sta/sta_testing_bin8.star", poses=CRYOEM / "real_tomo_sta/sta_pose.pkl")
    assert meta.n == 219 and meta.apix == pytest.approx(1.96)
    np.testing.assert_allclose(meta.trans_px, load_poses(CRYOEM / "real_tomo_sta/sta_pose.pkl", D=64)[1])


@needs_shared
def test_hand_stack_header_apix_and_rot_only_poses():
    meta = load_particles(CRYOEM / "synthetic_hand/hand.mrcs", poses=CRYOEM / "synthetic_hand/hand_rot.pkl")
    assert meta.apix == 1.0  # only the header gives one
    assert meta.rot.shape == (100, 3, 3)
    assert meta.trans_px.shape == (100, 2) and not meta.trans_px.any()  # rotations only: centred images
    assert load_particles(CRYOEM / "synthetic_hand/hand.mrcs", apix=1.5).apix == 1.5  # argument beats header


@needs_shared
def test_apix_argument_conflicting_with_star():
    with pytest.raises(InputError, match=r"data.apix.*relion31.star.*2.806"):
        load_particles(CRYOEM / "real_particles/relion31/relion31.star", apix=1.0)
    assert load_particles(CRYOEM / "real_particles/relion31/relion31.star", apix=2.806).apix == 2.806


def test_no_pixel_size_anywhere(tmp_path):
    write_stack(tmp_path / "p.mrcs", np.zeros((3, 8, 8)), apix=0.0)
    with pytest.raises(InputError, match=r"p.mrcs.*data.apix="):
        load_particles(tmp_path / "p.mrcs")
    assert load_particles(tmp_path / "p.mrcs", apix=2.0).apix == 2.0


def test_ctf_pickle_is_rescaled_to_the_image_box(tmp_path):
    # CryoBench stores CTFs at D=256, 1.5 Å while the images are 128 px at 3.0 Å
    write_stack(tmp_path / "p.mrcs", np.zeros((4, 128, 128)), apix=0.0)
    ctf = np.tile(np.array([256, 1.5, 1e4, 9e3, 10, 300, 2.7, 0.1, 0], dtype=np.float32), (4, 1))
    save_ctf(tmp_path / "ctf.pkl", ctf)
    meta = load_particles(tmp_path / "p.mrcs", ctf=tmp_path / "ctf.pkl")
    assert meta.apix == pytest.approx(3.0) and meta.D == 128
    np.testing.assert_allclose(meta.ctf[0], [128, 3.0, 1e4, 9e3, 10, 300, 2.7, 0.1, 0], rtol=1e-6)


def test_txt_source_with_pickles(tmp_path):
    for k in range(2):
        write_stack(tmp_path / f"s{k}.mrcs", np.full((5, 16, 16), k, dtype=np.float32), apix=0.0)
    (tmp_path / "all.txt").write_text("s0.mrcs\ns1.mrcs\n")
    rot = np.tile(np.eye(3, dtype=np.float32), (10, 1, 1))
    save_pickle(tmp_path / "poses.pkl", (rot, np.full((10, 2), 0.25, dtype=np.float32)))
    meta = load_particles(tmp_path / "all.txt", poses=tmp_path / "poses.pkl", apix=2.5)
    assert (meta.n, meta.D, meta.apix) == (10, 16, 2.5)
    np.testing.assert_allclose(meta.trans_px, 4.0)  # 0.25 of a 16 px box
    assert meta.images.read([7])[0, 0, 0] == 1.0
    assert meta.ctf is None
