"""io.star: every real STAR file parses; poses/CTF match the cryoDRGN pickles shipped beside them; round trips."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cryobench_lab.errors import InputError
from cryobench_lab.io.mrc import write_stack
from cryobench_lab.io.pickles import load_ctf, load_poses
from cryobench_lab.io.stacks import ImageSource
from cryobench_lab.io.star import (
    ctf_from_star,
    has_poses,
    image_locations,
    poses_from_star,
    read_star,
    read_star_blocks,
    star_apix,
    star_box_size,
    write_particle_star,
    write_star,
)
from cryobench_lab.physics.rotations import geodesic_distance, random_rotations
from shared_data import CRYOEM, needs_shared

# Particle stars: (file, rows, pixel size Å or None, box or None)
PARTICLE_STARS = [
    ("real_particles/metadata_only/FinalRefinement-OriginalParticles-PfCRT.star", 5, 1.035, None),
    ("real_particles/metadata_only/relion31.6opticsgroups.star", 139, 1.25, 196),
    ("real_particles/relion31/relion31.star", 5, 2.806, 256),
    ("real_particles/relion31/relion31.v2.star", 5, 2.806, 256),
    ("real_particles/empiar10076/empiar_10076_7.star", 7, 5e4 / 38168, None),
    ("real_particles/aspire_empiar10017/sample_relion_data.star", 17, 5e4 / 37369.207031, None),
    ("real_tomo_sta/sta_testing_bin8.star", 219, 1.96, None),
    ("synthetic_toy/toy_projections.star", 1000, None, None),
    ("star_examples/relion5.star", 17, 0.89, 448),
    ("star_examples/one_loop.star", 16, 5.0, None),
]
# Non-particle stars: block names and shapes (dict for key/value blocks), per SOURCES.md.
OTHER_STARS = {
    "default_pipeline.star": {"pipeline_general": dict, "pipeline_processes": (31, 4), "pipeline_nodes": (74, 2),
                              "pipeline_input_edges": (48, 2), "pipeline_output_edges": (72, 2)},
    "postprocess.star": {"general": dict, "fsc": (49, 7), "guinier": (49, 3)},
    "rln3.1_data_style.star": {"block_1": (1, 7), "block_2": (2, 5), "block_3": (2, 5)},
    "run_it025_optimiser_2D.star": {"optimiser_general": dict},
    "run_it025_optimiser_3D.star": {"optimiser_general": dict},
    "run_it025_sampling_2D.star": {"sampling_general": dict},
    "run_it025_sampling_3D.star": {"sampling_general": dict, "sampling_directions": (192, 2)},
}


@needs_shared
@pytest.mark.parametrize("name,rows,apix,box", PARTICLE_STARS)
def test_read_particle_stars(name, rows, apix, box):
    df = read_star(CRYOEM / name)
    assert len(df) == rows
    assert "rlnImageName" in df.columns
    assert df.attrs["star_path"] == str(CRYOEM / name)
    assert (star_apix(df) is None) if apix is None else star_apix(df) == pytest.approx(apix, rel=1e-6)
    assert star_box_size(df) == box
    paths, indices = image_locations(df, CRYOEM / name)
    assert len(paths) == rows and all(Path(p).is_absolute() for p in paths)
    assert indices.dtype == np.int64 and indices.min() >= 0
    if has_poses(df):
        rot, trans = poses_from_star(df, star_apix(df))
        assert rot.shape == (rows, 3, 3) and trans.shape == (rows, 2)
        assert np.allclose(rot @ rot.transpose(0, 2, 1), np.eye(3), atol=1e-5)


@needs_shared
@pytest.mark.parametrize("name", sorted(OTHER_STARS))
def test_read_non_particle_star_blocks(name):
    blocks = read_star_blocks(CRYOEM / "star_examples" / name)
    expected = OTHER_STARS[name]
    assert list(blocks) == list(expected)
    for block, shape in expected.items():
        if shape is dict:
            assert isinstance(blocks[block], dict) and blocks[block]
        else:
            assert blocks[block].shape == shape
    # no particle table, or (rln3.1_data_style) two image tables and no data_particles: ambiguous
    with pytest.raises(InputError, match=name + r".*(no particle table|several tables.*block_2, block_3)"):
        read_star(CRYOEM / "star_examples" / name)


# --- poses and CTF against the cryoDRGN pickles -------------------------------------------------------

@needs_shared
def test_pfcrt_star_matches_cryodrgn_pickles():
    df = read_star(CRYOEM / "real_particles/metadata_only/FinalRefinement-OriginalParticles-PfCRT.star")
    rot_ref, trans_ref = load_poses(CRYOEM / "real_particles/metadata_only/pose.star.pkl", n=5, D=300)
    apix = star_apix(df)
    assert apix == pytest.approx(1.035)  # rlnDetectorPixelSize 1.035 µm * 1e4 / rlnMagnification 10000
    rot, trans = poses_from_star(df, apix)
    np.testing.assert_allclose(rot, rot_ref, atol=1e-6)
    # RELION 3.0 rlnOriginX/Y are pixels with the sign cryoDRGN keeps: trans_px = +origin
    np.testing.assert_allclose(trans, trans_ref, atol=1e-5)
    np.testing.assert_allclose(trans[:, 0], df["rlnOriginX"], atol=1e-6)
    ctf = ctf_from_star(df, 300, apix)
    # this star has no rlnAmplitudeContrast: cryoDRGN's 0.1 default is what ctf1.pkl holds
    np.testing.assert_allclose(ctf, load_ctf(CRYOEM / "real_particles/metadata_only/ctf1.pkl", n=5), rtol=1e-6)


@needs_shared
def test_sta_star_matches_cryodrgn_pickles_219_rows():
    df = read_star(CRYOEM / "real_tomo_sta/sta_testing_bin8.star")
    assert len(df) == 219  # the stack has 220 images: the star lists 219 of them
    rot_ref, _ = load_poses(CRYOEM / "real_tomo_sta/sta_pose.pkl", n=219, D=64)
    rot, trans = poses_from_star(df, star_apix(df))
    np.testing.assert_allclose(rot, rot_ref, atol=1e-6)
    # The star has no origin columns, so its shifts are zero; sta_pose.pkl's shifts came from elsewhere.
    assert not any(c.startswith("rlnOrigin") for c in df.columns) and not trans.any()
    ctf_ref = load_ctf(CRYOEM / "real_tomo_sta/sta_ctf.pkl", n=219)
    # sta_ctf.pkl was made with D=512, apix=1.82 given by hand; the remaining columns come from the star
    ctf = ctf_from_star(df, 512, 1.82)
    np.testing.assert_allclose(ctf, ctf_ref, rtol=1e-6)


@needs_shared
def test_toy_star_matches_cryodrgn_pickles():
    df = read_star(CRYOEM / "synthetic_toy/toy_projections.star")
    ctf = ctf_from_star(df, 30, 1.0)
    np.testing.assert_array_equal(ctf, load_ctf(CRYOEM / "synthetic_toy/test_ctf.pkl", n=1000))
    assert not has_poses(df)
    with pytest.raises(InputError, match=r"toy_projections.star.*rlnAngleRot"):
        poses_from_star(df, 1.0)
    # the toy poses pickle pairs with this star row for row (1000 rows) and with toy_angles.pkl
    rot, trans = load_poses(CRYOEM / "synthetic_toy/toy_rot_trans.pkl", n=len(df), D=30)
    rot_only, _ = load_poses(CRYOEM / "synthetic_toy/toy_angles.pkl", n=len(df))
    np.testing.assert_array_equal(rot, rot_only)
    assert np.abs(trans).max() < 0.16 * 30 + 1e-4


@needs_shared
def test_relion31_optics_join_and_reversed_blocks():
    a = read_star(CRYOEM / "real_particles/relion31/relion31.star")
    b = read_star(CRYOEM / "real_particles/relion31/relion31.v2.star")
    pd.testing.assert_frame_equal(a, b)
    assert (a["rlnVoltage"] == 300).all() and (a["rlnImagePixelSize"] == 2.806).all()
    assert a["rlnSphericalAberration"].iloc[0] == pytest.approx(0.01)
    _rot, trans = poses_from_star(a, star_apix(a))
    # RELION 3.1 shifts are Å: trans_px = rlnOriginXAngst / apix
    np.testing.assert_allclose(trans[:, 0], a["rlnOriginXAngst"] / 2.806, rtol=1e-6)
    np.testing.assert_allclose(trans[0], [0.019324 / 2.806, -0.64686 / 2.806], rtol=1e-5)
    ctf = ctf_from_star(a, 256, 2.806)
    np.testing.assert_allclose(ctf[0], [256, 2.806, 13108.082418, 12845.582418, -160.39, 300, 0.01, 0.1, 0],
                               rtol=1e-6)


@needs_shared
def test_six_optics_groups_join_per_particle():
    path = CRYOEM / "real_particles/metadata_only/relion31.6opticsgroups.star"
    df = read_star(path)
    optics = read_star_blocks(path)["optics"].set_index("rlnOpticsGroup")
    for _, row in df.sample(20, random_state=0).iterrows():
        group = optics.loc[row["rlnOpticsGroup"]]
        assert row["rlnBeamTiltX"] == group["rlnBeamTiltX"]
        assert row["rlnMicrographPixelSize"] == group["rlnMicrographPixelSize"]
    assert df["rlnOpticsGroup"].nunique() > 1
    assert set(df.attrs["optics_columns"]) >= {"rlnBeamTiltX", "rlnImagePixelSize", "rlnVoltage"}


@needs_shared
def test_relion5_star():
    df = read_star(CRYOEM / "star_examples/relion5.star")
    assert star_apix(df) == pytest.approx(0.89) and star_box_size(df) == 448
    assert (df["rlnVoltage"] == 100).all()
    _rot, trans = poses_from_star(df, 0.89)
    np.testing.assert_allclose(trans[0], [-3.12578 / 0.89, -1.41031 / 0.89], rtol=1e-5)
    paths, indices = image_locations(df, CRYOEM / "star_examples/relion5.star")
    assert Path(paths[0]).name == "toy_images_a.mrcs" and indices[0] == 0 and indices[1] == 1


@needs_shared
def test_relion30_pixel_shifts_and_bare_paths():
    df = read_star(CRYOEM / "real_particles/aspire_empiar10017/sample_relion_data.star")
    _, trans = poses_from_star(df, star_apix(df))
    np.testing.assert_allclose(trans, df[["rlnOriginX", "rlnOriginY"]].to_numpy(), rtol=1e-6)  # pixels
    one = read_star(CRYOEM / "star_examples/one_loop.star")
    paths, indices = image_locations(one, CRYOEM / "star_examples/one_loop.star")
    assert (indices == 0).all()  # a bare path is the single image of its file
    assert paths[0].endswith("tomo_ts01.mrc_0000000_5.00A.mrc")


def test_star_apix_spread():
    df = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs"], "rlnImagePixelSize": [1.0, 1.2]})
    df.attrs["star_path"] = "mixed.star"
    with pytest.raises(InputError, match=r"mixed.star.*1 to 1.2"):
        star_apix(df)


# --- image locations --------------------------------------------------------------------------------

def _write_star_text(path, names, extra=""):
    path.write_text("data_particles\n\nloop_\n_rlnImageName #1\n" + "".join(f"{n}\n" for n in names) + extra)


def test_image_locations_resolution(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "s.mrcs").write_bytes(b"")
    (tmp_path / "flat.mrcs").write_bytes(b"")
    star = tmp_path / "p.star"
    _write_star_text(star, ["000002@data/s.mrcs", "1@Extract/job1/flat.mrcs", "3@/abs/x.mrcs", "single.mrc"])
    paths, indices = image_locations(read_star(star), star)
    assert paths == [str(tmp_path / "data/s.mrcs"), str(tmp_path / "flat.mrcs"),  # basename fallback
                     "/abs/x.mrcs", str(tmp_path / "single.mrc")]
    np.testing.assert_array_equal(indices, [1, 0, 2, 0])
    other = tmp_path / "elsewhere"
    (other / "data").mkdir(parents=True)
    (other / "data" / "s.mrcs").write_bytes(b"")
    paths, _ = image_locations(read_star(star), star, datadir=other)
    assert paths[0] == str(other / "data/s.mrcs")


def test_image_locations_bad_index(tmp_path):
    star = tmp_path / "bad.star"
    _write_star_text(star, ["0@s.mrcs"])
    with pytest.raises(InputError, match=r"bad.star.*row 1.*1-based"):
        image_locations(read_star(star), star)
    _write_star_text(star, ["x@s.mrcs"])
    with pytest.raises(InputError, match=r"bad.star.*index@path"):
        image_locations(read_star(star), star)


def test_star_index_past_end_of_stack(tmp_path):
    write_stack(tmp_path / "s.mrcs", np.zeros((4, 8, 8)), apix=1.0)
    star = tmp_path / "past.star"
    _write_star_text(star, ["1@s.mrcs", "4@s.mrcs", "5@s.mrcs"])
    with pytest.raises(InputError) as err:
        ImageSource.from_path(star)
    msg = str(err.value)
    assert "past.star" in msg and "row 3" in msg and "image 5" in msg and "holds 4 images" in msg


def test_star_missing_stack(tmp_path):
    star = tmp_path / "missing.star"
    _write_star_text(star, ["1@nowhere.mrcs"])
    with pytest.raises(InputError, match=r"missing.star.*row 1.*nowhere.mrcs.*does not exist"):
        ImageSource.from_path(star)


@needs_shared
def test_real_star_pointing_to_missing_stacks():
    with pytest.raises(InputError, match=r"relion5.star.*toy_images_a.mrcs.*does not exist"):
        ImageSource.from_path(CRYOEM / "star_examples/relion5.star")


# --- round trips ------------------------------------------------------------------------------------

def _random_metadata(n, D=64, apix=2.5, seed=0):
    rng = np.random.default_rng(seed)
    rot = random_rotations(n, generator=torch.Generator().manual_seed(seed)).numpy()
    trans = rng.uniform(-5, 5, size=(n, 2)).astype(np.float32)
    ctf = np.stack([np.full(n, D), np.full(n, apix), rng.uniform(5000, 25000, n), rng.uniform(5000, 25000, n),
                    rng.uniform(-180, 180, n), np.full(n, 300.0), np.full(n, 2.7), np.full(n, 0.07),
                    rng.uniform(0, 90, n)], 1).astype(np.float32)
    return rot, trans, ctf


def test_write_particle_star_round_trip(tmp_path):
    n, D, apix = 200, 64, 2.5
    rot, trans, ctf = _random_metadata(n, D, apix)
    labels = np.random.default_rng(1).integers(0, 4, n)
    names = [f"{i + 1:06d}@stack.mrcs" for i in range(n)]
    path = tmp_path / "out.star"
    write_particle_star(path, names, rot, trans, ctf, apix, D, labels=labels)
    blocks = read_star_blocks(path)
    assert list(blocks) == ["optics", "particles"]  # RELION 3.1 layout
    assert len(blocks["optics"]) == 1 and "rlnVoltage" not in blocks["particles"].columns
    df = read_star(path)
    assert list(df["rlnImageName"]) == names
    assert star_apix(df) == apix and star_box_size(df) == D
    rot2, trans2 = poses_from_star(df, star_apix(df))
    assert geodesic_distance(torch.from_numpy(rot2).double(), torch.from_numpy(rot).double()).max() < 1e-4
    np.testing.assert_allclose(trans2, trans, atol=1e-5)
    np.testing.assert_allclose(ctf_from_star(df, D, apix), ctf, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(df["rlnClassNumber"].to_numpy(), labels + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.star"]  # atomic: no temporary left


@needs_shared
@pytest.mark.parametrize("name,D", [("real_particles/relion31/relion31.star", 256),
                                    ("real_particles/metadata_only/FinalRefinement-OriginalParticles-PfCRT.star", 300),
                                    ("real_tomo_sta/sta_testing_bin8.star", 64)])
def test_real_star_to_arrays_to_star(tmp_path, name, D):
    df = read_star(CRYOEM / name)
    apix = star_apix(df)
    rot, trans = poses_from_star(df, apix)
    ctf = ctf_from_star(df, D, apix)
    write_particle_star(tmp_path / "again.star", list(df["rlnImageName"]), rot, trans, ctf, apix, D)
    again = read_star(tmp_path / "again.star")
    rot2, trans2 = poses_from_star(again, star_apix(again))
    np.testing.assert_allclose(rot2, rot, atol=1e-5)
    np.testing.assert_allclose(trans2, trans, atol=1e-5)
    np.testing.assert_allclose(ctf_from_star(again, D, star_apix(again)), ctf, rtol=1e-6)
    assert list(again["rlnImageName"]) == list(df["rlnImageName"])


@needs_shared
@pytest.mark.parametrize("name", ["real_particles/relion31/relion31.star",
                                  "real_particles/metadata_only/relion31.6opticsgroups.star",
                                  "real_particles/aspire_empiar10017/sample_relion_data.star"])
def test_write_star_keeps_every_value(tmp_path, name):
    df = read_star(CRYOEM / name)
    write_star(tmp_path / "copy.star", df)
    back = read_star(tmp_path / "copy.star")
    assert len(back) == len(df)
    rot, trans = poses_from_star(df, star_apix(df))
    rot2, trans2 = poses_from_star(back, star_apix(back))
    np.testing.assert_allclose(rot2, rot, atol=1e-5)
    np.testing.assert_allclose(trans2, trans, atol=1e-4)  # RELION 3.0 pixel shifts become Å and back
    np.testing.assert_allclose(ctf_from_star(back, 100, 1.0), ctf_from_star(df, 100, 1.0), rtol=1e-6)
    # every optics group survives with its own number, name and values
    if "rlnOpticsGroupName" in df.columns:
        assert (back["rlnOpticsGroup"] == df["rlnOpticsGroup"]).all()
        assert (back["rlnOpticsGroupName"] == df["rlnOpticsGroupName"]).all()
    for col in ("rlnBeamTiltX", "rlnVoltage"):
        if col in df.columns:
            np.testing.assert_allclose(back[col].to_numpy(float), df[col].to_numpy(float), rtol=1e-6)
