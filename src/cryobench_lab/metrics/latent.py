"""Low-dimensional views of the latent space, for figures coloured by ground-truth state."""

from __future__ import annotations

import importlib.util

import torch

from cryobench_lab.errors import InputError


def assigned_latent(latent: torch.Tensor, class_probs: torch.Tensor | None) -> torch.Tensor:
    """Each image's latent in its assigned class → (N, d).

    latent (N, d) is returned as is; (N, K, d) per-class latents are indexed at ``argmax class_probs``
    (class 0 when there are no class probabilities), as the per-conformation protocol does.
    """
    if latent.dim() == 2:
        return latent
    classes = class_probs.argmax(1) if class_probs is not None else torch.zeros(len(latent), dtype=torch.long)
    return latent[torch.arange(len(latent)), classes]


def pca_embedding(latent: torch.Tensor, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal-component scores of latents (N, d) → ``(embedding (N, min(n, d)), explained (min(n, d),))``.

    ``explained`` is each component's fraction of the total variance. Computed in float64 from the d × d
    covariance (cheap for any N); each axis's sign is fixed so that its largest loading is positive, which
    makes the picture reproducible across runs and platforms.
    """
    z = torch.as_tensor(latent).detach().cpu().double()
    if z.dim() != 2 or len(z) < 2:
        raise InputError(f"pca_embedding: latent has shape {tuple(z.shape)}; pass (N, d) latents with N >= 2")
    z = z - z.mean(0)
    cov = z.T @ z / (len(z) - 1)  # (d, d)
    evals_all, evecs_all = torch.linalg.eigh(cov)  # (d,), (d, d)
    evals_all = evals_all.clamp_min(0)  # round-off can make a null direction slightly negative
    order = torch.argsort(evals_all, descending=True)[: min(n, z.shape[1])]
    evals, evecs = evals_all[order], evecs_all[:, order]  # (k,), (d, k)
    sign = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))  # (1, k)
    evecs = evecs * sign
    total = evals_all.sum()
    explained = evals / total if total > 0 else torch.zeros_like(evals)
    return z @ evecs, explained


def umap_embedding(latent: torch.Tensor, n: int = 2, seed: int = 0) -> torch.Tensor | None:
    """UMAP of latents (N, d) → (N, n) float32, or None when ``umap-learn`` is not installed."""
    if importlib.util.find_spec("umap") is None:
        return None
    import umap

    z = torch.as_tensor(latent).detach().cpu().numpy()
    return torch.from_numpy(umap.UMAP(n_components=n, random_state=seed).fit_transform(z)).float()
