"""Part discovery for part-aware Gaussian mixtures: seeded k-means++ and the two-level anchor clustering.

Everything here is numpy on CPU and deterministic for a seed (k-means++ draws from a
``numpy.random.Generator``; Lloyd iterations are deterministic), so a run resumed from a checkpoint
rediscovers the same anchors.
"""

from __future__ import annotations

import numpy as np


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared distances between rows of x (n, f) and c (k, f) → (n, k)."""
    return np.maximum((x**2).sum(1)[:, None] + (c**2).sum(1)[None, :] - 2.0 * x @ c.T, 0.0)


def kmeans_pp(x: np.ndarray, k: int, seed: int = 0, n_iter: int = 100, n_init: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """k-means with k-means++ seeding on points ``x (n, f)`` → ``labels (n,)`` int64 and ``centroids (k, f)``.

    ``n_init`` seedings from one generator, the lowest within-cluster sum of squares is kept. k is capped
    at the number of distinct points.
    """
    x = np.asarray(x, np.float64)
    n = len(x)
    k = int(max(1, min(k, len(np.unique(x, axis=0)))))
    rng = np.random.default_rng(seed)
    best = (np.inf, None, None)
    for _ in range(n_init):
        centroids = [x[rng.integers(n)]]
        d2 = ((x - centroids[0]) ** 2).sum(1)
        for _ in range(1, k):
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
            centroids.append(x[rng.choice(n, p=p)])
            d2 = np.minimum(d2, ((x - centroids[-1]) ** 2).sum(1))
        c = np.stack(centroids)
        for _ in range(n_iter):
            dist = _sq_dist(x, c)  # (n, k)
            labels = dist.argmin(1)
            new = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        dist = _sq_dist(x, c)
        labels = dist.argmin(1)
        inertia = dist[np.arange(n), labels].sum()
        if inertia < best[0]:
            best = (inertia, labels.astype(np.int64), c)
    return best[1], best[2]


def calinski_harabasz(x: np.ndarray, labels: np.ndarray) -> float:
    """Calinski–Harabasz index of a clustering: between- over within-cluster dispersion, each per degree of
    freedom, ``(B / (k − 1)) / (W / (n − k))``; 0 for a single cluster."""
    x = np.asarray(x, np.float64)
    ids, labels = np.unique(labels, return_inverse=True)
    n, k = len(x), len(ids)
    if k < 2 or k >= n:
        return 0.0
    sizes = np.bincount(labels, minlength=k)
    centroids = np.stack([x[labels == j].mean(0) for j in range(k)])  # (k, f)
    between = (sizes * ((centroids - x.mean(0)) ** 2).sum(1)).sum()
    within = ((x - centroids[labels]) ** 2).sum()
    return float(between / (k - 1) / max(within / (n - k), 1e-30))


# How close to the best Calinski–Harabasz index a smaller count must be, in paired bootstrap standard errors
# of the difference, to be preferred (BENCHMARKS.md, issue 6, session 8): on the 18 stage-1 checkpoints
# measured, splits that merely halve a part scored within 0.19–0.24 SE of the best, and merges of parts that
# move or appear apart were 0.71 SE or more worse. The customary one-SE rule (1.0) merged two assembly parts.
SE_TOLERANCE = 0.5


def fewest_within_error(ks: np.ndarray, ch: np.ndarray, paired_se: np.ndarray) -> int:
    """From the best-scoring count ``ks[argmax ch]``, merge one part at a time while the index of the smaller
    count stays within :data:`SE_TOLERANCE` paired standard errors of the best; return where that stops.

    Counts are only walked down through: a much smaller count that scores as well as the best across a
    valley of worse ones (parts nested in larger groups, like chains added one by one, where 2 groups
    "early" and "late" also score high) is a different partition, not a simpler version of the best.
    """
    j = int(np.argmax(ch))
    while j > 0 and ch.max() - ch[j - 1] <= SE_TOLERANCE * paired_se[j - 1]:
        j -= 1
    return int(ks[j])


def choose_k(x: np.ndarray, k_max: int, seed: int = 0, n_boot: int = 20) -> int:
    """Number of clusters in 2..k_max by :func:`fewest_within_error` on the Calinski–Harabasz index.

    The error of ``CH(best) − CH(k)`` is paired: both are recomputed on the same ``n_boot`` resamples of the
    rows of ``x``, so noise common to every k cancels. Plain argmax CH splits a part that moves as one when
    that raises the index by less than its own resampling noise: on adk seed 1 it rated 4 parts 495 and 3
    parts 491, with a paired error of 16. CH is chosen over the mean silhouette, which on the adk response
    profiles rates 2 and 3 parts within 0.01 and merges the NMP domain into the CORE.
    """
    x = np.asarray(x, np.float64)
    ks = np.arange(2, max(2, k_max) + 1)
    full = np.array([calinski_harabasz(x, kmeans_pp(x, k, seed)[0]) for k in ks])
    best = int(full.argmax())
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, len(ks)))
    for b in range(n_boot):
        xb = x[rng.integers(len(x), size=len(x))]
        boot[b] = [calinski_harabasz(xb, kmeans_pp(xb, k, seed + b)[0]) for k in ks]
    return fewest_within_error(ks, full, (boot - boot[:, best : best + 1]).std(0))


def principal_components(x: np.ndarray, r: int) -> np.ndarray:
    """Scores of the rows of ``x (n, f)`` on its first ``r`` principal components → ``(n, r)``."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, :r] * s[:r]


def response_profile(shift: np.ndarray, gate: np.ndarray, sigma: float) -> np.ndarray:
    """How each Gaussian responds to the latent: ``shift (L, n, 3)`` Å and ``gate (L, n)`` predicted at L
    latents, and the mixture's typical std σ (Å) → ``(n, 4L)``.

    Each Gaussian's deviation from its own mean over the latents. Shifts are measured as the relative L2
    change they cause in a Gaussian of std σ, ``d / (√2 σ)`` to first order, the scale of a gate change Δg
    (which changes the density by Δg). One σ for all Gaussians, so the members of a part that moves as one
    have the same profile whatever their widths. A shift changes the density only as far as the Gaussian
    is on, so it is weighted by the gate at that latent (deviation from the gate-weighted mean shift): the
    network's shifts of a Gaussian that is off are arbitrary, and would otherwise split a chain that is
    absent in most images by where its invisible Gaussians drift.
    """
    shift = np.asarray(shift, np.float64)
    gate = np.asarray(gate, np.float64)
    w = gate[..., None] / np.maximum(gate.sum(0), 1e-12)[None, :, None]  # (L, n, 1) sums to 1 over L
    d = gate[..., None] * (shift - (w * shift).sum(0)) / (np.sqrt(2.0) * float(sigma))  # (L, n, 3)
    g = gate - gate.mean(0)  # (L, n)
    return np.concatenate([d.transpose(1, 0, 2).reshape(d.shape[1], -1), g.T], 1)


def allocate(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` anchors over clusters in proportion to their ``sizes`` (largest remainder, ≥ 1 each)."""
    sizes = np.asarray(sizes, np.float64)
    total = max(total, len(sizes))
    quota = sizes / sizes.sum() * total
    counts = np.maximum(np.floor(quota).astype(np.int64), 1)
    while counts.sum() < total:
        counts[np.argmax(quota - counts)] += 1
    while counts.sum() > total:
        j = np.argmax(np.where(counts > 1, counts - quota, -np.inf))
        counts[j] -= 1
    return np.minimum(counts, sizes.astype(np.int64))


def discover_anchors(
    features: np.ndarray, positions: np.ndarray, n_parts: int | None, n_anchors: int, max_parts: int = 8, seed: int = 0
) -> dict:
    """Two-level clustering of Gaussians into parts and anchors.

    features ``(n, f)`` and positions ``(n, 3)`` Å of the coarse Gaussians. Level 1: k-means++ on the
    features into ``n_parts`` parts (None: the count in 2..max_parts chosen by :func:`choose_k`) — Gaussians
    that move and appear together. Level 2: inside each part, k-means++ on the positions; ``n_anchors`` in
    total are allocated to parts in proportion to their sizes. Each anchor is the Gaussian nearest its
    position centroid. Returns ``part (n,)``, ``anchor (n,)`` (Gaussian → anchor), ``anchor_index (K,)``
    (the anchors' Gaussian indices), ``anchor_part (K,)`` and ``n_parts``.
    """
    features = np.asarray(features, np.float64)
    positions = np.asarray(positions, np.float64)
    k = choose_k(features, max_parts, seed) if n_parts is None else int(n_parts)
    part, _ = kmeans_pp(features, k, seed)
    ids = np.unique(part)
    part = np.searchsorted(ids, part)  # parts numbered 0..P-1 without gaps
    counts = allocate(np.bincount(part), n_anchors)
    anchor = np.zeros(len(part), np.int64)
    anchor_index, anchor_part = [], []
    for p, c in enumerate(counts):
        members = np.flatnonzero(part == p)
        local, centroids = kmeans_pp(positions[members], c, seed + 1 + p)
        for j in range(len(centroids)):
            inside = members[local == j]
            if len(inside) == 0:
                continue
            nearest = inside[((positions[inside] - centroids[j]) ** 2).sum(1).argmin()]
            anchor[inside] = len(anchor_index)
            anchor_index.append(nearest)
            anchor_part.append(p)
    return {"part": part, "anchor": anchor, "anchor_index": np.array(anchor_index, np.int64),
            "anchor_part": np.array(anchor_part, np.int64), "n_parts": len(ids)}
