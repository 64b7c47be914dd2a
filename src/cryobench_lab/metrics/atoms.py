"""Atom-based metrics (cryoSPHERE, cryoSTAR): inter-group distance correlation and Cα clashes.

Coordinates are in Å, one representative atom per residue (Cα, or C1′ for nucleotides), shaped
``(M, n_res, 3)`` for M structures (e.g. one per ground-truth state) or ``(n_res, 3)`` for one.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import torch

from cryobench_lab.errors import InputError


def _tensor(x, dtype) -> torch.Tensor:
    """numpy array, list or (possibly grad-tracking, GPU) tensor → CPU tensor of ``dtype``."""
    return x.detach().to("cpu", dtype) if torch.is_tensor(x) else torch.as_tensor(np.asarray(x), dtype=dtype)


def centre_of_mass_distances(
    coords, groups: Sequence, pairs: Sequence[tuple[int, int]] | None = None, weights=None
) -> torch.Tensor:
    """Distances (Å) between the centres of residue groups (e.g. domains) → (M, n_pairs) float64.

    coords (M, n_res, 3) or (n_res, 3) Å; groups: list of residue index arrays (rows of coords); pairs:
    (group a, group b) index pairs, default every pair ``a < b`` in order; weights (n_res,) optional
    per-residue masses (e.g. electron counts), default equal.
    """
    x = _tensor(coords, torch.float64)
    x = x[None] if x.dim() == 2 else x  # (M, n_res, 3)
    w = torch.ones(x.shape[1], dtype=torch.float64) if weights is None else _tensor(weights, torch.float64)
    centres = []
    for g in groups:
        idx = torch.as_tensor(np.asarray(g), dtype=torch.long)
        if idx.numel() == 0:
            raise InputError(
                "centre_of_mass_distances: a residue group is empty; give every group >= 1 residue"
            )
        wg = w[idx]  # (n_g,)
        centres.append((x[:, idx] * wg[:, None]).sum(1) / wg.sum())  # (M, 3)
    c = torch.stack(centres, 1)  # (M, n_groups, 3)
    pairs = list(combinations(range(len(groups)), 2)) if pairs is None else list(pairs)
    a = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return (c[:, a] - c[:, b]).norm(dim=-1)  # (M, n_pairs)


def distance_correlation(pred, true) -> float:
    """Pearson correlation between predicted and true distances, over all entries (e.g. (M, P) flattened).

    NaN when either set is constant (correlation undefined, e.g. a model that never moves).
    """
    p = _tensor(pred, torch.float64).flatten()
    t = _tensor(true, torch.float64).flatten()
    if p.shape != t.shape or p.numel() < 2:
        raise InputError(
            f"distance_correlation: pred has {p.numel()} and true {t.numel()} entries; "
            "pass matching arrays of >= 2"
        )
    p, t = p - p.mean(), t - t.mean()
    denom = torch.sqrt((p * p).sum() * (t * t).sum())
    return float((p * t).sum() / denom) if denom > 0 else float("nan")


def count_clashes(
    coords,
    chain_ids=None,
    threshold: float = 4.0,
    exclude_neighbours: int = 1,
    max_elements: int = 2**22,
):
    """Number of residue pairs closer than ``threshold`` Å, each pair counted once.

    coords (n_res, 3) → int, or (M, n_res, 3) → (M,) int64 tensor. Pairs in the same chain with
    ``|i − j| <= exclude_neighbours`` (rows of coords, i.e. sequence neighbours: bonded Cα are ~3.8 Å apart)
    are not clashes; residues of different chains are never neighbours. chain_ids: (n_res,) any hashable
    labels, default one chain. Distances are computed in row chunks of at most ``max_elements`` entries,
    so memory stays bounded for large complexes.
    """
    x = _tensor(coords, torch.float32)
    single = x.dim() == 2
    x = x[None] if single else x  # (M, n, 3)
    M, n, _ = x.shape
    if chain_ids is None:
        chain = torch.zeros(n, dtype=torch.long)
    else:
        chain = torch.from_numpy(np.unique(np.asarray(chain_ids), return_inverse=True)[1].reshape(-1)).long()
        if len(chain) != n:
            raise InputError(
                f"count_clashes: {len(chain)} chain ids for {n} residues; give one chain id per residue"
            )
    chunk = max(1, max_elements // max(1, M * n))
    counts = torch.zeros(M, dtype=torch.int64)
    for start in range(0, n, chunk):
        # Exact differences (no |a|² + |b|² − 2ab expansion), so pairs at the threshold are decided correctly.
        d = torch.cdist(
            x[:, start : start + chunk], x, compute_mode="donot_use_mm_for_euclid_dist"
        )  # (M, c, n)
        m, i, j = torch.nonzero(d < threshold, as_tuple=True)  # close pairs are few: filter only those
        i = i + start
        # Count pair (i, j) once, at i < j; drop same-chain sequence neighbours.
        keep = (j > i) & ~((chain[i] == chain[j]) & (j - i <= exclude_neighbours))
        counts += torch.bincount(m[keep], minlength=M)
    return int(counts[0]) if single else counts


def atom_metrics(
    pred_coords,
    true_coords,
    groups: Sequence,
    pairs: Sequence[tuple[int, int]] | None = None,
    chain_ids=None,
    weights=None,
) -> dict:
    """``distance_corr`` and ``clashes_mean`` for M predicted structures against their M true ones.

    pred_coords, true_coords (M, n_res, 3) Å, structure m of each describing the same state; groups/pairs/
    weights as in :func:`centre_of_mass_distances`; chain_ids as in :func:`count_clashes`. Also returns
    ``clashes`` (M ints, per predicted structure) and ``clashes_true_mean`` (the true structures' own
    count, the floor a model can be compared with).
    """
    d_pred = centre_of_mass_distances(pred_coords, groups, pairs, weights)
    d_true = centre_of_mass_distances(true_coords, groups, pairs, weights)
    pred = _tensor(pred_coords, torch.float32)
    clashes = count_clashes(pred.reshape(-1, *pred.shape[-2:]), chain_ids)  # (M,)
    true = _tensor(true_coords, torch.float32)
    clashes_true = count_clashes(true.reshape(-1, *true.shape[-2:]), chain_ids)  # (M,)
    return {
        "distance_corr": distance_correlation(d_pred, d_true),
        "clashes_mean": float(clashes.double().mean()),
        "clashes": clashes.tolist(),
        "clashes_true_mean": float(clashes_true.double().mean()),
    }


def residue_groups(residue_numbers, chain_ids, domains: dict | None = None) -> tuple[list[str], list, list]:
    """Residue groups for the distance correlation → (group names, groups, pairs).

    With ``domains`` ({name: [first, last] residue number}, inclusive, every chain): one group per domain
    plus ``CORE`` (every other residue, group 0), and the pairs (domain, CORE) — the cryoSPHERE protocol on
    AdK (LID–CORE, NMP–CORE). Without domains and with several chains: one group per chain and every chain
    pair (rigid subunit motion). One chain and no domains: no groups (nothing to correlate).
    residue_numbers, chain_ids (n_res,) as in :class:`cryobench_lab.io.structures.Structure`.
    """
    numbers = np.asarray(residue_numbers)
    if domains:
        labels = np.zeros(len(numbers), np.int64)
        for k, (name, bounds) in enumerate(domains.items(), start=1):
            lo, hi = bounds
            inside = (numbers >= lo) & (numbers <= hi)
            if not inside.any():
                raise InputError(
                    f"data.domains.{name}: residues {lo}-{hi} match no residue of the structure "
                    f"(numbers {numbers.min()}-{numbers.max()}); fix the range or drop the domain"
                )
            labels[inside] = k
        names = ["CORE", *domains]
        groups = [np.flatnonzero(labels == k) for k in range(len(names))]
        if groups[0].size == 0:
            raise InputError("data.domains: the domains cover every residue, so CORE is empty; leave a CORE")
        return names, groups, [(k, 0) for k in range(1, len(names))]
    chains = np.asarray(chain_ids)
    names = list(dict.fromkeys(chains.tolist()))  # file order
    if len(names) < 2:
        return [], [], []
    groups = [np.flatnonzero(chains == c) for c in names]
    return names, groups, list(combinations(range(len(names)), 2))


def atom_metric_keys(names: Sequence[str], pairs: Sequence[tuple[int, int]]) -> list[str]:
    """The keys :func:`per_image_atom_metrics` returns for these residue groups, in its order."""
    pair_keys = [f"dist_corr_{names[a]}_{names[b]}" for a, b in pairs]
    return pair_keys + ["distance_corr", "clashes_mean", "clashes_median", "clashes_true_median"]


def per_image_atom_metrics(
    pred_coords,
    true_coords,
    names: Sequence[str],
    groups: Sequence,
    pairs: Sequence[tuple[int, int]],
    chain_ids=None,
    clash_rows=None,
) -> dict:
    """Atom metrics of per-image predicted structures against the true structure of each image's state.

    pred_coords, true_coords (N, n_res, 3) Å (row i: image i's prediction and its state's truth); names/
    groups/pairs from :func:`residue_groups`; chain_ids (n_res,); clash_rows: rows whose clashes are counted
    (default all; clash counting is O(n_res²) per structure). Returns ``dist_corr_<a>_<b>`` per pair
    (Pearson r over images of the two groups' centre distance), ``distance_corr`` (mean of those, NaN
    without pairs), ``clashes_mean`` and ``clashes_median`` (per predicted structure) and
    ``clashes_true_median`` (the true structures' own count, the floor to compare with).
    """
    out: dict = {}
    if pairs:
        d_pred = centre_of_mass_distances(pred_coords, groups, pairs)  # (N, P)
        d_true = centre_of_mass_distances(true_coords, groups, pairs)
        corrs = [distance_correlation(d_pred[:, p], d_true[:, p]) for p in range(len(pairs))]
        for key, r in zip(atom_metric_keys(names, pairs), corrs):
            out[key] = r
        out["distance_corr"] = float(np.mean(corrs))
    else:
        out["distance_corr"] = float("nan")
    rows = slice(None) if clash_rows is None else torch.as_tensor(np.asarray(clash_rows), dtype=torch.long)
    clashes = count_clashes(_tensor(pred_coords, torch.float32)[rows], chain_ids).double()  # (M,)
    true_clashes = count_clashes(_tensor(true_coords, torch.float32)[rows], chain_ids).double()
    out["clashes_mean"] = float(clashes.mean())
    out["clashes_median"] = float(clashes.median())
    out["clashes_true_median"] = float(true_clashes.median())
    return out


def superposed_rmsd(coords, ref) -> torch.Tensor:
    """RMSD (Å) of ``coords (n, 3)`` to each of ``ref (M, n, 3)`` or ``(n, 3)`` after the optimal rigid
    superposition (Kabsch, rotations only, no mirror) → (M,) float64."""
    x = _tensor(coords, torch.float64)
    y = _tensor(ref, torch.float64)
    y = y[None] if y.dim() == 2 else y  # (M, n, 3)
    if x.dim() != 2 or y.shape[1:] != x.shape:
        raise InputError(f"superposed_rmsd: coords {tuple(x.shape)} and ref {tuple(y.shape)} must hold the same residues")
    x = x - x.mean(0)
    y = y - y.mean(1, keepdim=True)
    U, _, Vh = torch.linalg.svd(x.T @ y)  # (M, 3, 3): x·R ≈ y with R = U S Vh
    d = torch.sign(torch.linalg.det(U @ Vh))
    S = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    R = U @ S @ Vh
    return ((x @ R - y) ** 2).sum(-1).mean(-1).sqrt()
