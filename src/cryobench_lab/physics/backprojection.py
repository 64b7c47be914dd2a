"""Wiener solve of Fourier backprojection sums (pure torch).

The sums come from :func:`~cryobench_lab.physics.slicing.insert_slices` over two half sets h of the images:
``num_h = Σ CTF·Y`` (complex) and ``den_h = Σ CTF²`` on a centred ``(P, P, P)`` spectrum. The estimate is
``V = Σ_h num_h / (Σ_h den_h + λ(k))`` with a per-shell regulariser:

- ``wiener="constant"``: ``λ(k) = reg · ⟨den⟩_shell(k)``, a Tikhonov term proportional to the shell's mean
  CTF² weight (cryoDRGN's ``backproject_voxel`` uses one such constant for the whole volume);
- ``wiener="fsc"``: the RELION-style 1/τ² estimate from the half maps,
  ``SSNR_full(k) = 2·FSC_half(k) / (1 − FSC_half(k))``, ``λ(k) = ⟨den⟩_shell(k) / SSNR_full(k)``, so shells
  where the half maps disagree (no signal yet) are suppressed.

:func:`oracle_wiener_solve` is the Wiener filter given the truth: ``λ(k) = β(k) / S(k)``, with ``S(k)`` the
signal power per voxel of the shell (from the ground-truth spectrum) and ``β(k)`` the noise power per unit
of CTF² weight (:func:`half_set_noise`). Each voxel's unregularised estimate ``X = num / den`` is the signal
plus noise of variance ``β / den``, so ``num / (den + β / S)`` is its posterior mean under a Gaussian prior
of variance ``S``: the minimum-mean-square-error estimate for that shell's SSNR.

:func:`gridding_correction`: trilinear insertion convolves the spectrum with a triangle kernel, which
multiplies the real-space volume by ``sinc²`` along each axis; dividing by it restores the volume.
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


def half_set_noise(num: torch.Tensor, den: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Noise power per unit CTF² weight ``β(k)`` per shell, ``(n_shells,)``, from the two half sets.

    The half estimates ``X_h = num_h / den_h`` share the signal, so ``X_0 − X_1`` is noise of variance
    ``β (1/den_0 + 1/den_1)``; ``β`` is the shell mean of ``|X_0 − X_1|² / (1/den_0 + 1/den_1)`` over the voxels
    both halves sample. Measured this way, ``β`` already carries the trilinear weights and the correlation of
    neighbouring samples of zero-padded images, which a per-pixel image noise variance would not.
    ``num (2, P, P, P)`` complex, ``den (2, P, P, P)``.
    """
    P = num.shape[-1]
    shells = shell_index(P, num.device)
    den0, den1 = den[0], den[1]
    both = (den0 > 0) & (den1 > 0)
    # |X_0 − X_1|² / (1/den_0 + 1/den_1), written without divisions by small weights
    diff = (num[0] * den1 - num[1] * den0).abs() ** 2 / (den0 * den1 * (den0 + den1)).clamp(min=torch.finfo(den.dtype).tiny)
    flat = shells.clamp(max=n_shells - 1)[both]
    total = torch.zeros(n_shells, dtype=den.dtype, device=den.device).index_add_(0, flat, diff[both])
    count = torch.zeros(n_shells, dtype=den.dtype, device=den.device).index_add_(0, flat, torch.ones_like(diff[both]))
    return total / count.clamp(min=1)


def oracle_wiener_solve(num: torch.Tensor, den: torch.Tensor, signal_power: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectrum ``(P, P, P)`` from half-set sums ``num (2, P, P, P)`` and ``den (2, P, P, P)`` with the known
    per-shell signal power ``signal_power (P//2,)`` (same units as ``|num / den|²``), zero beyond radius
    P/2; and the noise power ``β (P//2,)`` it used (:func:`half_set_noise`)."""
    P = num.shape[-1]
    n_shells = P // 2
    shells = shell_index(P, num.device).clamp(max=n_shells - 1)
    beta = half_set_noise(num, den, n_shells)
    lam = beta / signal_power.to(beta).clamp(min=torch.finfo(beta.dtype).tiny)  # (n_shells,)
    V = num.sum(0) / (den.sum(0) + lam[shells]).clamp(min=torch.finfo(den.dtype).tiny)
    V[shell_index(P, num.device) >= n_shells] = 0
    return V, beta


def shell_power(spectrum: torch.Tensor) -> torch.Tensor:
    """Mean ``|F|²`` over each integer shell of a centred ``(P, P, P)`` spectrum → ``(P//2,)``."""
    P = spectrum.shape[-1]
    return shell_mean(spectrum.abs() ** 2, shell_index(P, spectrum.device), P // 2)


def gridding_correction(P: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Real-space apodisation of trilinear gridding on a ``(P, P, P)`` box: ``Π_axes sinc²(x / P)``, x in
    voxels from the centre (index ``P // 2``). Divide a reconstruction by it → ``(P, P, P)``."""
    x = (torch.arange(P, dtype=torch.float64, device=device) - P // 2) / P
    w = torch.sinc(x) ** 2  # (P,)
    return (w[:, None, None] * w[None, :, None] * w[None, None, :]).to(dtype)
