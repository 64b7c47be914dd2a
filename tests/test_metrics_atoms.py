"""Atom metrics: clashes on hand-built chains and a brute-force count, distances by hand, correlations."""


import numpy as np
import pytest
import torch

from cryobench_lab.errors import InputError
from cryobench_lab.metrics.atoms import (
    atom_metrics,
    centre_of_mass_distances,
    count_clashes,
    distance_correlation,
)
from shared_data import SHARED, needs_shared

# AdK domains (Beckstein et al. 2009): NMP 30–59, LID 122–159, CORE the rest (1-based residue numbers).
ADK_GROUPS = [np.r_[0:29, 59:121, 159:214], np.arange(29, 59), np.arange(121, 159)]


def _zigzag(n, bond=3.8):
    """Planar strip of equilateral triangles: |i − j| = 1 and 2 at ``bond`` Å, |i − j| = 3 at 1.73·bond."""
    h = bond * np.sqrt(3) / 2
    return np.array([[bond / 2 * i, h * (i % 2), 0.0] for i in range(n)])


def _brute_force(x, chain, threshold=4.0, exclude=1):
    n = len(x)
    count = 0
    for i in range(n):
        d = np.linalg.norm(x[i + 1 :] - x[i], axis=1)
        j = np.arange(i + 1, n)
        neighbour = (chain[j] == chain[i]) & (j - i <= exclude)
        count += int(((d < threshold) & ~neighbour).sum())
    return count


def test_a_straight_chain_has_no_clashes():
    x = np.column_stack([3.8 * np.arange(50), np.zeros(50), np.zeros(50)])
    assert count_clashes(x) == 0


def test_hand_built_zigzag_counts_second_neighbours_and_respects_exclusion_and_chains():
    n = 12
    x = _zigzag(n)
    assert count_clashes(x) == n - 2  # every (i, i+2) pair is 3.8 Å; (i, i+1) excluded; (i, i+3) 6.6 Å
    assert count_clashes(x, exclude_neighbours=2) == 0
    assert count_clashes(x, exclude_neighbours=0) == (n - 1) + (n - 2)
    assert count_clashes(x, threshold=3.7) == 0  # strictly closer than the threshold
    # split into chains A (0–5) and B (6–11): the bonded-looking pair (5, 6) is now a clash
    chains = np.array(["A"] * 6 + ["B"] * 6)
    assert count_clashes(x, chain_ids=chains) == n - 2 + 1


def test_batched_and_chunked_counts_match_a_brute_force_loop():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 25, (4, 150, 3))  # dense random points: many close pairs
    chain = np.repeat([0, 1, 2], 50)
    ref = [_brute_force(xm, chain) for xm in x]
    assert ref[0] > 20
    got = count_clashes(torch.from_numpy(x), chain_ids=chain)
    assert got.tolist() == ref
    assert count_clashes(x, chain_ids=chain, max_elements=1000).tolist() == ref  # many small chunks
    assert count_clashes(x[1], chain_ids=chain) == ref[1]
    with pytest.raises(InputError):
        count_clashes(x, chain_ids=chain[:-1])


def test_centre_of_mass_distances_by_hand():
    coords = np.array([[0, 0, 0], [2, 0, 0], [10, 0, 0], [10, 4, 0], [0, 0, 7]], dtype=float)
    groups = [[0, 1], [2, 3], [4]]  # centres (1,0,0), (10,2,0), (0,0,7)
    d = centre_of_mass_distances(coords, groups)
    assert d.shape == (1, 3)
    np.testing.assert_allclose(d[0], [np.sqrt(81 + 4), np.sqrt(1 + 49), np.sqrt(100 + 4 + 49)])
    d = centre_of_mass_distances(
        coords, groups, pairs=[(2, 0)], weights=[3, 1, 1, 1, 1]
    )  # centre 0 at (0.5,0,0)
    np.testing.assert_allclose(d, [[np.sqrt(0.25 + 49)]])


def test_distance_correlation_is_one_for_affine_related_sets_and_nan_when_constant():
    rng = np.random.default_rng(1)
    true = rng.uniform(10, 40, (20, 3))
    assert distance_correlation(2.5 * true + 7.0, true) == pytest.approx(1.0, abs=1e-12)
    assert distance_correlation(-true, true) == pytest.approx(-1.0, abs=1e-12)
    assert abs(distance_correlation(rng.uniform(10, 40, (20, 3)), true)) < 0.3
    assert np.isnan(distance_correlation(np.full((20, 3), 5.0), true))


def test_distance_correlation_matches_numpy_and_a_value_by_hand():
    # by hand: x = (1, 2, 3, 4), y = (1, 3, 2, 4): centred x·y = 4, |x|² = |y|² = 5 → r = 0.8
    assert distance_correlation([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8, abs=1e-12)
    rng = np.random.default_rng(3)
    for rho in (0.0, 0.3, 0.7, -0.5):  # correlated random (M, P) tables, flattened as the metric does
        true = rng.normal(20, 5, (30, 3))
        pred = rho * (true - 20) + np.sqrt(1 - rho**2) * rng.normal(0, 5, (30, 3)) + 15
        ref = np.corrcoef(pred.ravel(), true.ravel())[0, 1]
        assert distance_correlation(pred, true) == pytest.approx(ref, abs=1e-12)
        assert distance_correlation(torch.from_numpy(pred), true) == pytest.approx(ref, abs=1e-12)
    with pytest.raises(InputError):
        distance_correlation(np.ones((3, 2)), np.ones(7))


def test_similarity_transformed_structures_have_distance_correlation_one():
    rng = np.random.default_rng(2)
    true = rng.normal(0, 10, (6, 40, 3))  # 6 "states"
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    pred = 1.3 * true @ q.T + np.array([5.0, -3.0, 2.0])  # rotate, scale, shift: distances scale by 1.3
    groups = [np.arange(0, 10), np.arange(10, 25), np.arange(25, 40)]
    out = atom_metrics(torch.from_numpy(pred), true, groups)
    assert out["distance_corr"] == pytest.approx(1.0, abs=1e-10)
    assert set(out) == {"distance_corr", "clashes_mean", "clashes", "clashes_true_mean"}
    assert len(out["clashes"]) == 6


@needs_shared
def test_adk_transition_domain_distances_and_clashes_on_real_models():
    from cryobench_lab.io.structures import read_models, read_structure

    frames = np.stack(read_models(SHARED / "trajectories" / "adk_dims_CA_98models.pdb"))  # (98, 214, 3)
    d = centre_of_mass_distances(frames, ADK_GROUPS)  # CORE–NMP, CORE–LID, NMP–LID
    # closed → open: the LID and NMP domains move away from the CORE and from each other
    assert (d[-1] - d[0] > 3).all()
    # along the trajectory the three distances grow together: NumPy's Pearson r over all entries
    assert distance_correlation(d.flip(0), d) == pytest.approx(np.corrcoef(d.flip(0).ravel(), d.ravel())[0, 1], abs=1e-12)
    assert distance_correlation(d.flip(0)[:, 1], d[:, 1]) < -0.5  # CORE–LID, frames reversed: anti-correlated
    clashes = count_clashes(frames)
    assert clashes.max() <= 3  # a physical transition: at most a rare tight contact
    # a multi-chain cryo-EM model, with chain ids, against the brute-force loop
    s = read_structure(SHARED / "structures" / "mmcif_7cth.cif")
    chain = np.unique(s.residue_chain_ids, return_inverse=True)[1]
    assert count_clashes(s.residue_coords, s.residue_chain_ids) == _brute_force(s.residue_coords, chain)


def test_superposed_rmsd_ignores_rigid_motion_and_matches_a_numpy_kabsch():
    from cryobench_lab.metrics.atoms import superposed_rmsd
    from cryobench_lab.physics.rotations import random_rotations

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)) * 10
    Q = random_rotations(1, torch.Generator().manual_seed(2), dtype=torch.float64)[0].numpy()
    y = x @ Q.T + np.array([5.0, -2.0, 7.0])
    assert float(superposed_rmsd(x, y)[0]) < 1e-9
    # mirror images are not superposable by a rotation
    assert float(superposed_rmsd(x, y * np.array([1.0, 1.0, -1.0]))[0]) > 1.0
    # a deformation: compare with an independent Kabsch (numpy SVD, positions centred)
    z = y + rng.normal(size=y.shape)
    a, b = x - x.mean(0), z - z.mean(0)
    U, _, Vt = np.linalg.svd(b.T @ a)
    R = U @ np.diag([1, 1, np.sign(np.linalg.det(U @ Vt))]) @ Vt  # a @ R.T ≈ b
    ref = np.sqrt(((a @ R.T - b) ** 2).sum(1).mean())
    out = superposed_rmsd(x, np.stack([y, z]))
    np.testing.assert_allclose(out.numpy(), [0.0, ref], atol=1e-9)
