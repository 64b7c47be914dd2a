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


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient of a clustering (Euclidean); 0 when there is a single cluster."""
    x = np.asarray(x, np.float64)
    ids = np.unique(labels)
    if len(ids) < 2:
        return 0.0
    sq = (x**2).sum(1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))  # (n, n)
    member = labels[:, None] == ids[None, :]  # (n, k)
    sums = d @ member  # (n, k) summed distance to each cluster
    sizes = member.sum(0)
    own = member.argmax(1)
    own_size = sizes[own]
    a = sums[np.arange(len(x)), own] / np.maximum(own_size - 1, 1)
    others = np.where(member, np.inf, sums / sizes[None, :])
    b = others.min(1)
    s = np.where(own_size > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-30), 0.0)
    return float(s.mean())


def choose_k(x: np.ndarray, k_max: int, seed: int = 0, max_points: int = 2048) -> int:
    """Number of clusters in 2..k_max with the highest mean silhouette (on at most ``max_points`` points)."""
    x = np.asarray(x, np.float64)
    if len(x) > max_points:
        x = x[np.random.default_rng(seed).choice(len(x), max_points, replace=False)]
    scores = {k: silhouette(x, kmeans_pp(x, k, seed)[0]) for k in range(2, max(2, k_max) + 1)}
    return max(scores, key=scores.get)


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
    features into ``n_parts`` parts (None: the count in 2..max_parts with the best silhouette) — Gaussians
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
