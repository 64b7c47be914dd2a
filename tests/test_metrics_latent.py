"""Latent embeddings: PCA against numpy's SVD on data with known axes; per-class latent selection."""

import importlib.util

import numpy as np
import pytest
import torch

from cryobench_lab.errors import InputError
from cryobench_lab.metrics.latent import assigned_latent, pca_embedding, umap_embedding


def test_pca_recovers_known_axes_and_variances_and_matches_svd():
    rng = np.random.default_rng(0)
    std = np.array([5.0, 2.0, 0.5, 0.1])
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    x = (rng.normal(size=(20000, 4)) * std) @ q.T + 3.0  # principal axes = columns of q
    emb, explained = pca_embedding(torch.from_numpy(x).float(), n=2)
    assert emb.shape == (20000, 2) and explained.shape == (2,)
    np.testing.assert_allclose(explained.numpy(), std[:2] ** 2 / (std**2).sum(), rtol=0.03)
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    ref = u[:, :2] * s[:2]
    for k in range(2):  # same scores up to each axis's sign
        c = np.corrcoef(emb[:, k].numpy(), ref[:, k])[0, 1]
        assert abs(c) > 0.9999
    np.testing.assert_allclose(emb.numpy().var(0, ddof=1), s[:2] ** 2 / (len(x) - 1), rtol=1e-3)


def test_pca_sign_is_fixed_and_small_dimensions_are_handled():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(500, 3)) * [3.0, 1.0, 0.2])
    a, _ = pca_embedding(x)
    # the axes' signs follow the loadings (largest loading positive), not the eigen-solver: mirroring the
    # cloud keeps the axes and mirrors the scores
    b, _ = pca_embedding(-x)
    np.testing.assert_allclose(b.numpy(), -a.numpy(), atol=1e-9)
    loadings = torch.linalg.lstsq(x - x.mean(0), a).solution  # (3, 2)
    assert (loadings.gather(0, loadings.abs().argmax(0, keepdim=True)) > 0).all()
    one, ex = pca_embedding(x[:, :1], n=2)
    assert one.shape == (500, 1) and ex.item() == pytest.approx(1.0)
    with pytest.raises(InputError):
        pca_embedding(torch.zeros(1, 3))


def test_assigned_latent_picks_each_images_class():
    z = torch.arange(24.0).reshape(4, 3, 2)  # (N=4, K=3, d=2)
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    np.testing.assert_array_equal(
        assigned_latent(z, probs).numpy(), z[torch.arange(4), torch.tensor([0, 2, 1, 2])]
    )
    np.testing.assert_array_equal(assigned_latent(z, None).numpy(), z[:, 0])
    flat = torch.randn(5, 2)
    assert assigned_latent(flat, None) is flat


def test_umap_is_optional():
    out = umap_embedding(torch.randn(50, 4))
    if importlib.util.find_spec("umap") is None:
        assert out is None
    else:
        assert out.shape == (50, 2)
