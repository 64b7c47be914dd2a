"""Amortised inference: an image encoder predicts each image's class logits and per-class latents.

The encoder sees the re-centred real-space image (shifted by +t, docs/conventions.md) inside the
inscribed circle. ``vae=True`` adds a log-variance per latent (a Gaussian posterior, cryoDRGN-style).
"""

from __future__ import annotations

import torch
from torch import nn

from cryobench_lab.physics.lattice import circular_mask


class MLPEncoder(nn.Module):
    """Flattened masked image → ``out_dim``: ``in → hidden``, ``n_layers`` residual ``hidden → hidden``
    (ReLU), ``hidden → out_dim`` (cryoDRGN's ``--enc-layers`` meaning)."""

    def __init__(self, box_size: int, out_dim: int, hidden: int = 256, n_layers: int = 3):
        super().__init__()
        self.register_buffer("mask", circular_mask(box_size, box_size // 2))
        self.inp = nn.Linear(int(self.mask.sum()), hidden)
        self.hidden = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(n_layers)])
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(images[:, self.mask]))
        for layer in self.hidden:
            h = torch.relu(h + layer(h))
        return self.out(h)  # (B, out_dim)


class CNNEncoder(nn.Module):
    """Strided convolutions (×2 downsampling each) to a 4 × 4 map, then a linear layer → ``out_dim``."""

    def __init__(self, box_size: int, out_dim: int, channels: int = 32, hidden: int = 256):
        super().__init__()
        self.register_buffer("mask", circular_mask(box_size, box_size // 2).float())
        blocks, c_in, size = [], 1, box_size
        while size > 4:
            blocks += [nn.Conv2d(c_in, channels, 3, stride=2, padding=1), nn.ReLU()]
            c_in, size = channels, (size + 1) // 2
        self.conv = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * size * size, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv((images * self.mask)[:, None]))  # (B, out_dim)


class AmortisedInference(nn.Module):
    """Encoder → ``logits (B, K) | None``, ``mu (B, K, d) | None``, ``logvar (B, K, d) | None``."""

    def __init__(self, kind: str, box_size: int, n_classes: int, latent_dim: int, vae: bool, hidden: int, n_layers: int):
        super().__init__()
        self.n_classes, self.latent_dim, self.vae = n_classes, latent_dim, vae
        n_logits = n_classes if n_classes > 1 else 0
        out_dim = n_logits + n_classes * latent_dim * (2 if vae else 1)
        if out_dim == 0:
            raise ValueError("an encoder needs something to infer: n_classes > 1 or latent_dim > 0")
        if kind == "mlp":
            self.encoder = MLPEncoder(box_size, out_dim, hidden, n_layers)
        elif kind == "cnn":
            self.encoder = CNNEncoder(box_size, out_dim, hidden=hidden)
        else:
            raise ValueError(f"encoder must be 'none', 'mlp' or 'cnn', got {kind!r}")
        self.n_logits = n_logits

    def forward(self, images: torch.Tensor) -> dict:
        out = self.encoder(images)
        K, d = self.n_classes, self.latent_dim
        logits = out[:, : self.n_logits] if self.n_logits else None
        rest = out[:, self.n_logits :]
        mu = rest[:, : K * d].reshape(-1, K, d) if d else None
        logvar = rest[:, K * d :].reshape(-1, K, d) if (d and self.vae) else None
        return {"logits": logits, "mu": mu, "logvar": logvar}
