"""Wiener solve of Fourier backprojection sums (pure torch).

The sums come from :func:`~cryobench_lab.physics.slicing.insert_slices` over two half sets h of the images:
``num_h = Σ CTF·Y`` (complex) and ``den_h = Σ CTF²`` on a centred ``(P, P, P)`` spectrum. The estimate is
``V = Σ_h num_h / (Σ_h den_h + λ(k))`` with a per-shell regulariser:

- ``wiener="constant"``: ``λ(k) = reg · ⟨den⟩_shell(k)``, a Tikhonov term proportional to the shell's mean
  CTF² weight (cryoDRGN's ``backproject_voxel`` uses one such constant for the whole volume);
- ``wiener="fsc"``: the RELION-style 1/τ² estimate from the half maps,
  ``SSNR_full(k) = 2·FSC_half(k) / (1 − FSC_half(k))``, ``λ(k) = ⟨den⟩_shell(k) / SSNR_full(k)``, so shells
  where the half maps disagree (no signal yet) are suppressed.
"""

from __future__ import annotations

import torch


def shell_index(P: int, device=None) -> torch.Tensor:
    """Integer radius of every voxel of a centred (P, P, P) grid, (P, P, P) int64."""
    k = torch.arange(P, device=device) - P // 2
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    return torch.round(r).long()


def shell_mean(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Mean of ``values`` over each integer shell, (n_shells,)."""
    flat = shells.reshape(-1).clamp(max=n_shells - 1)
    total = torch.zeros(n_shells, dtype=values.dtype, device=values.device).index_add_(0, flat, values.reshape(-1))
    count = torch.zeros(n_shells, dtype=values.dtype, device=values.device).index_add_(0, flat, torch.ones_like(values.reshape(-1)))
    return total / count.clamp(min=1)


def wiener_solve(num: torch.Tensor, den: torch.Tensor, wiener: str = "fsc", reg: float = 1.0,
                 ssnr_floor: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectrum ``(P, P, P)`` complex from half-set sums ``num (2, P, P, P)`` complex and ``den (2, P, P, P)``
    (module docstring), zero beyond radius P/2, and the half maps' FSC per shell ``(P//2,)``."""
    P = num.shape[-1]
    n_shells = P // 2
    shells = shell_index(P, num.device)
    den_full = den.sum(0)
    den_mean = shell_mean(den_full, shells, n_shells)
    halves = [num[h] / (den[h] + 1e-3 * den_mean.max() / 2 + torch.finfo(den.dtype).tiny) for h in (0, 1)]
    cross = shell_mean((halves[0] * halves[1].conj()).real, shells, n_shells)
    power = shell_mean(halves[0].abs() ** 2, shells, n_shells) * shell_mean(halves[1].abs() ** 2, shells, n_shells)
    fsc = cross / power.sqrt().clamp(min=1e-30)
    if wiener == "fsc":
        f = fsc.clamp(min=0.0, max=0.999)
        lam = den_mean / (2 * f / (1 - f)).clamp(min=ssnr_floor)  # (n_shells,)
    elif wiener == "constant":
        lam = reg * den_mean
    else:
        raise ValueError(f"wiener must be 'fsc' or 'constant', got {wiener!r}")
    V = num.sum(0) / (den_full + lam[shells.clamp(max=n_shells - 1)]).clamp(min=torch.finfo(den.dtype).tiny)
    V[shells >= n_shells] = 0
    return V, fsc
