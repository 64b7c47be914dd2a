"""Segmentations of a residue chain into K segments: learned (cryoSPHERE's Gaussian mixture) or fixed blocks.

Residue i sits at ``s_i = (i + ½) / n`` on the unit interval (residues in file order, chains concatenated).

Learned (:class:`GMMSegmentation`): segment k has a mean ``μ_k``, a std ``σ_k`` and a proportion logit
``a_k`` (``π = softmax(a)``), each with a variational Gaussian posterior ``N(m, s²)`` and a Gaussian prior.
With one sample (training) or the posterior means (evaluation)::

    ℓ_ik = log π_k − log σ_k − ½ ((s_i − μ_k) / σ_k)²,    w_ik = softmax_k(ℓ_ik / τ),  τ = 0.05.

Priors (unit-interval units): ``μ_k ~ N((k + ½)/K, (1/K)²)`` (equal contiguous blocks),
``σ_k ~ N(1/(2K), (1/(2K))²)``, ``a_k ~ N(0, 1)``. The posteriors start at the prior means with a small
spread (``init_spread`` × the prior std), so training starts from equal blocks.

Fixed (:class:`FixedSegmentation`): contiguous equal residue blocks, one-hot, no parameters, KL 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _kl_gauss(m: torch.Tensor, s: torch.Tensor, m0: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """KL(N(m, s²) ‖ N(m0, s0²)) summed over all entries."""
    return (torch.log(s0 / s) + (s**2 + (m - m0) ** 2) / (2 * s0**2) - 0.5).sum()


def block_labels(n_residues: int, n_segments: int) -> torch.Tensor:
    """Contiguous equal blocks: segment index of each residue, (n_residues,) int64."""
    return torch.div(torch.arange(n_residues) * n_segments, n_residues, rounding_mode="floor")


class GMMSegmentation(nn.Module):
    """Learned Gaussian-mixture segmentation with variational posteriors; see the module docstring."""

    def __init__(self, n_residues: int, n_segments: int, tau: float = 0.05, init_spread: float = 0.1):
        super().__init__()
        K = n_segments
        self.n_segments, self.tau = K, tau
        self.register_buffer("positions", (torch.arange(n_residues) + 0.5) / n_residues)  # (n,)
        prior_mean = torch.stack([(torch.arange(K) + 0.5) / K, torch.full((K,), 0.5 / K), torch.zeros(K)])  # (3, K)
        prior_std = torch.stack([torch.full((K,), 1.0 / K), torch.full((K,), 0.5 / K), torch.ones(K)])  # (3, K)
        # rows: means, stds, proportion logits
        self.register_buffer("prior_mean", prior_mean)
        self.register_buffer("prior_std", prior_std)
        self.post_mean = nn.Parameter(prior_mean.clone())
        # softplus⁻¹ of the initial posterior std
        s = init_spread * prior_std
        self.post_rho = nn.Parameter(s + torch.log(-torch.expm1(-s)))

    def posterior_std(self) -> torch.Tensor:
        return F.softplus(self.post_rho) + 1e-6  # (3, K)

    def forward(self, sample: bool) -> torch.Tensor:
        """Weights ``(n_residues, K)``, rows summing to 1; ``sample`` draws from the posteriors."""
        p = self.post_mean
        if sample:
            p = p + self.posterior_std() * torch.randn_like(p)
        mu, sigma, logits = p[0], p[1].abs() + 1e-3, p[2]
        z = (self.positions[:, None] - mu) / sigma  # (n, K)
        ell = torch.log_softmax(logits, 0) - torch.log(sigma) - 0.5 * z**2
        return torch.softmax(ell / self.tau, dim=1)

    def kl(self) -> torch.Tensor:
        return _kl_gauss(self.post_mean, self.posterior_std(), self.prior_mean, self.prior_std)

    def labels(self) -> torch.Tensor:
        """Hard segment of each residue under the posterior means, (n,) int64."""
        return self.forward(sample=False).argmax(1)


class FixedSegmentation(nn.Module):
    """Contiguous equal residue blocks, not learned (one-hot weights, KL 0)."""

    def __init__(self, n_residues: int, n_segments: int):
        super().__init__()
        self.n_segments = n_segments
        self.register_buffer("weights", F.one_hot(block_labels(n_residues, n_segments), n_segments).float())

    def forward(self, sample: bool) -> torch.Tensor:
        return self.weights  # (n, K)

    def kl(self) -> torch.Tensor:
        return self.weights.new_zeros(())

    def labels(self) -> torch.Tensor:
        return self.weights.argmax(1)

