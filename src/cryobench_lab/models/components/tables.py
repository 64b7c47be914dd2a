"""Auto-decoded per-image parameters: class logits and per-class conformation latents, one row per image.

Rows are ``nn.Embedding(sparse=True)`` tables so that an optimiser (``torch.optim.SparseAdam``) touches
only the rows of the images in the batch: a dense Adam would keep moving every other image's row with its
stale momentum.
"""

from __future__ import annotations

import torch
from torch import nn


class PerImageTables(nn.Module):
    """Class logits ``(N, K)`` (zeros: uniform classes) and latents ``(N, K, d)`` (small random values).

    A table is omitted when it would be constant (K = 1: no logits; d = 0: no latents).
    """

    def __init__(self, n_images: int, n_classes: int, latent_dim: int, latent_init_std: float = 0.1, seed: int = 0):
        super().__init__()
        self.n_classes = n_classes
        self.latent_dim = latent_dim
        self.logits: nn.Embedding | None = None
        self.latents: nn.Embedding | None = None
        if n_classes > 1:
            self.logits = nn.Embedding(n_images, n_classes, sparse=True)
            nn.init.zeros_(self.logits.weight)
        if latent_dim > 0:
            g = torch.Generator().manual_seed(seed)
            self.latents = nn.Embedding(n_images, n_classes * latent_dim, sparse=True)
            with torch.no_grad():
                self.latents.weight.copy_(torch.randn(n_images, n_classes * latent_dim, generator=g) * latent_init_std)

    def forward(self, index: torch.Tensor) -> dict:
        """Parameters of images ``index (B,)``: ``logits (B, K) | None``, ``mu (B, K, d) | None``, ``logvar None``."""
        logits = self.logits(index) if self.logits is not None else None
        mu = self.latents(index).reshape(-1, self.n_classes, self.latent_dim) if self.latents is not None else None
        return {"logits": logits, "mu": mu, "logvar": None}
