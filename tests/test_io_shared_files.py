"""Every real file in the shared data that io/ can read is listed here, opened, and checked in depth by the
test named beside it. A file added to the shared data without being listed fails
``test_manifest_covers_every_file``."""

from pathlib import Path

import numpy as np
import pytest

from cryobench_lab.io.cryosparc import read_cs
from cryobench_lab.io.mrc import read_mrc
from cryobench_lab.io.pickles import load_pickle
from cryobench_lab.io.star import read_star_blocks
from cryobench_lab.io.structures import read_structure
from shared_data import SHARED, needs_shared

READERS = {"mrc": read_mrc, "star": read_star_blocks, "cs": read_cs, "pkl": load_pickle, "structure": read_structure}

# file (relative to shared/data) -> (reader, test that checks its content)
MANIFEST = {
    "cryoem/maps/1ake.mrc": ("mrc", "test_io_mrc::test_read_mrc_real_files"),
    "cryoem/maps/EMD-3197.map": ("mrc", "test_io_mrc::test_read_mrc_real_files"),
    "cryoem/maps/clean70SRibosome_vol_65p.mrc": ("mrc", "test_io_mrc::test_read_mrc_real_files"),
    "cryoem/synthetic_toy/toymodel_small_nocenter.mrc": ("mrc", "test_io_mrc::test_read_mrc_real_files"),
    "cryoem/synthetic_hand/hand-vol.mrc": ("mrc", "test_io_mrc::test_read_mrc_real_files"),
    "cryoem/real_particles/aspire_empiar10017/sample.mrcs": ("mrc", "test_io_stacks::test_real_sources_read_the_right_images"),
    "cryoem/real_particles/empiar10076/empiar_10076_7.mrc": ("mrc", "test_io_stacks::test_real_sources_read_the_right_images"),
    "cryoem/real_particles/relion31/relion31.mrcs": ("mrc", "test_io_stacks::test_real_sources_read_the_right_images"),
    "cryoem/real_tomo_sta/ay19102021_L3_position6_ribo_it09_bin8_1.82A.mrcs": (
        "mrc", "test_io_stacks::test_real_sources_read_the_right_images"),
    "cryoem/synthetic_hand/hand.mrcs": ("mrc", "test_io_mrc::test_mrcstack_real_files"),
    "cryoem/synthetic_toy/toy_projections.mrcs": ("mrc", "test_io_particles::test_toy_stack_with_pickles"),
    "cryoem/real_particles/aspire_empiar10017/sample_relion_data.star": (
        "star", "test_io_star::test_relion30_pixel_shifts_and_bare_paths"),
    "cryoem/real_particles/empiar10076/empiar_10076_7.star": ("star", "test_io_particles::test_empiar10076_star_and_cs_agree"),
    "cryoem/real_particles/metadata_only/FinalRefinement-OriginalParticles-PfCRT.star": (
        "star", "test_io_star::test_pfcrt_star_matches_cryodrgn_pickles"),
    "cryoem/real_particles/metadata_only/relion31.6opticsgroups.star": (
        "star", "test_io_star::test_six_optics_groups_join_per_particle"),
    "cryoem/real_particles/relion31/relion31.star": ("star", "test_io_star::test_relion31_optics_join_and_reversed_blocks"),
    "cryoem/real_particles/relion31/relion31.v2.star": ("star", "test_io_star::test_relion31_optics_join_and_reversed_blocks"),
    "cryoem/real_tomo_sta/sta_testing_bin8.star": ("star", "test_io_star::test_sta_star_matches_cryodrgn_pickles_219_rows"),
    "cryoem/synthetic_toy/toy_projections.star": ("star", "test_io_star::test_toy_star_matches_cryodrgn_pickles"),
    "cryoem/star_examples/relion5.star": ("star", "test_io_star::test_relion5_star"),
    "cryoem/star_examples/one_loop.star": ("star", "test_io_star::test_relion30_pixel_shifts_and_bare_paths"),
    "cryoem/star_examples/default_pipeline.star": ("star", "test_io_star::test_read_non_particle_star_blocks"),
    "cryoem/star_examples/postprocess.star": ("star", "test_io_star::test_read_non_particle_star_blocks"),
    "cryoem/star_examples/rln3.1_data_style.star": ("star", "test_io_star::test_read_non_particle_star_blocks"),
    "cryoem/star_examples/run_it025_optimiser_2D.star": ("star", "test_io_star::test_read_non_particle_star_blocks"),
    "cryoem/star_examples/run_it025_optimiser_3D.star": ("star", "test_io_star::test_read_non_particle_star_blocks"),
    "cryoem/star_examples/run_it025_sampling_2D.star": ("star", "test_io_star::test_read_non_particle_star_blocks"),
    "cryoem/star_examples/run_it025_sampling_3D.star": ("star", "test_io_star::test_read_non_particle_star_blocks"),
    "cryoem/real_particles/cryosparc/cryosparc_P12_J24_001_particles.cs": (
        "cs", "test_io_cryosparc::test_cs_poses_match_cryodrgn_pose_cs_pkl"),
    "cryoem/real_particles/empiar10076/empiar_10076_7.cs": (
        "cs", "test_io_cryosparc::test_cs_ctf_agrees_with_the_star_of_the_same_images"),
    "cryoem/real_particles/cryosparc/ctf2.pkl": ("pkl", "test_io_cryosparc::test_cs_ctf_matches_cryodrgn_ctf2_pkl"),
    "cryoem/real_particles/cryosparc/pose.cs.pkl": ("pkl", "test_io_cryosparc::test_cs_poses_match_cryodrgn_pose_cs_pkl"),
    "cryoem/real_particles/metadata_only/ctf1.pkl": ("pkl", "test_io_star::test_pfcrt_star_matches_cryodrgn_pickles"),
    "cryoem/real_particles/metadata_only/pose.star.pkl": ("pkl", "test_io_star::test_pfcrt_star_matches_cryodrgn_pickles"),
    "cryoem/real_tomo_sta/ind_39_sta_testing_bin8.pkl": ("pkl", "test_io_pickles::test_real_pickles_load"),
    "cryoem/real_tomo_sta/sta_ctf.pkl": ("pkl", "test_io_star::test_sta_star_matches_cryodrgn_pickles_219_rows"),
    "cryoem/real_tomo_sta/sta_pose.pkl": ("pkl", "test_io_star::test_sta_star_matches_cryodrgn_pickles_219_rows"),
    "cryoem/synthetic_hand/hand_rot.pkl": ("pkl", "test_io_particles::test_hand_stack_header_apix_and_rot_only_poses"),
    "cryoem/synthetic_hand/hand_rot_trans.pkl": ("pkl", "test_io_pickles::test_real_pickles_load"),
    "cryoem/synthetic_toy/test_ctf.pkl": ("pkl", "test_io_star::test_toy_star_matches_cryodrgn_pickles"),
    "cryoem/synthetic_toy/toy_angles.pkl": ("pkl", "test_io_star::test_toy_star_matches_cryodrgn_pickles"),
    "cryoem/synthetic_toy/toy_rot_trans.pkl": ("pkl", "test_io_particles::test_toy_stack_with_pickles"),
    "structures/adk/4akeA_alg_fixed.pdb": ("structure", "test_io_structures::test_real_structures"),
    "structures/adk/adk_closed.pdb": ("structure", "test_io_structures::test_elements_fixed_for_files_without_element_column"),
    "structures/adk/adk_open.pdb": ("structure", "test_io_structures::test_trajectory_models"),
    "structures/adk/mmcif_1ake_chimerax.cif": ("structure", "test_io_structures::test_keep_waters_and_ligands"),
    "structures/adk/pdb1ake.pdb": ("structure", "test_io_structures::test_electron_counts_closed_form"),
    "structures/mmcif_7cth.cif": ("structure", "test_io_structures::test_real_structures"),
    "structures/pdb3hsy.pdb": ("structure", "test_io_structures::test_real_structures"),
    "structures/pdb4v8r_hex.pdb.gz": ("structure", "test_io_structures::test_real_structures"),
    "structures/pdb7pbl.pdb": ("structure", "test_io_structures::test_7pbl_dna_chains_are_nucleotides"),
    "trajectories/adk_dims_CA_98models.pdb": ("structure", "test_io_structures::test_trajectory_models"),
}

# Files io/ does not read: CHARMM topology and binary trajectory (the CA PDB above is their readable copy).
NOT_IO = {"trajectories/adk.psf", "trajectories/adk_dims.dcd"}
SUFFIXES = (".mrc", ".mrcs", ".map", ".star", ".cs", ".pkl", ".pdb", ".cif", ".gz")


@needs_shared
def test_manifest_covers_every_file():
    found = {str(p.relative_to(SHARED)) for p in SHARED.rglob("*") if p.is_file() and p.name != "SOURCES.md"}
    assert found - NOT_IO == set(MANIFEST), "add new shared files to MANIFEST with a test that checks them"
    assert all(name.endswith(SUFFIXES) for name in MANIFEST)


@needs_shared
@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_file_opens_and_its_test_exists(name):
    reader, check = MANIFEST[name]
    out = READERS[reader](SHARED / name)
    if reader == "mrc":
        assert out[0].dtype == np.float32 and out[0].ndim == 3
    module, test = check.split("::")
    text = (Path(__file__).parent / f"{module}.py").read_text()
    assert f"def {test}(" in text, f"{check} named for {name} does not exist"
