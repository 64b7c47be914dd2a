"""Fourier shell correlation exactly as CryoBench computes it (domain.md §3).

- Optionally multiply both volumes by a real-space mask, then ``F = fftshift(fftn(fftshift(v)))``.
- ``r`` = distance of each voxel's grid coordinates (−D/2 … D/2−1 on every axis) from the origin.
- Shell ``i = 1 … D/2 − 1`` is ``{i − 1 ≤ r < i}`` (shell 1 is the zero frequency alone);
  ``fsc[i] = Re Σ F1·conj(F2) / √(Σ|F1|² · Σ|F2|²)``; ``fsc[0] = 1``.
- One deliberate difference: CryoBench's code returns 1.0 for a shell whose denominator is 0, which
  scores an all-zero prediction (e.g. a collapsed ReLU decoder) as perfect. Here a shell that is zero in
  both volumes is 1.0 (they agree) and a shell that is zero in only one of them is 0.0.
- Frequencies ``freq[i] = i / D`` cycles/px for ``i = 0 … D/2 − 1``.
- AUC: trapezoid area under ``(freq, fsc)``, not normalised (a perfect curve gives ``(D/2 − 1)/D``,
  ≈ 0.49 at D = 128) — the CryoBench leaderboard number.

Computed in float64 with numpy; accepts numpy arrays or torch tensors.
"""

import numpy as np

from cryobench_lab.errors import InputError


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def fsc(vol1, vol2, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """FSC between two ``(D, D, D)`` volumes → ``(freq, curve)``, each ``(D // 2,)`` float64.

    ``freq`` in cycles/px; ``mask`` is an optional real-space ``(D, D, D)`` weight applied to both volumes.
    """
    v1, v2 = _as_numpy(vol1), _as_numpy(vol2)
    if v1.shape != v2.shape or v1.ndim != 3 or len(set(v1.shape)) != 1:
        raise InputError(
            f"fsc: volumes have shapes {v1.shape} and {v2.shape}; pass two cubic (D, D, D) volumes of one box"
        )
    if mask is not None:
        m = _as_numpy(mask)
        if m.shape != v1.shape:
            raise InputError(
                f"fsc: mask has shape {m.shape}, volumes {v1.shape}; use a mask of the volumes' box"
            )
        v1, v2 = v1 * m, v2 * m
    D = v1.shape[0]
    F1 = np.fft.fftshift(np.fft.fftn(np.fft.fftshift(v1)))
    F2 = np.fft.fftshift(np.fft.fftn(np.fft.fftshift(v2)))

    x = np.arange(-D // 2, D // 2)
    z, y, xx = np.meshgrid(x, x, x, indexing="ij")
    r = np.sqrt(xx**2 + y**2 + z**2)  # exact for perfect squares, so shell edges are unambiguous
    shell = np.floor(r).astype(np.int64) + 1  # {i − 1 ≤ r < i} ↔ floor(r) = i − 1
    keep = shell < D // 2
    shell, F1, F2 = shell[keep], F1[keep], F2[keep]

    n = D // 2
    cross = np.bincount(shell, weights=(F1 * np.conj(F2)).real, minlength=n)
    p1 = np.bincount(shell, weights=np.abs(F1) ** 2, minlength=n)
    p2 = np.bincount(shell, weights=np.abs(F2) ** 2, minlength=n)
    denom = np.sqrt(p1 * p2)
    nz = denom > 0
    # Zero denominators: both volumes empty in the shell → 1 (agreement), only one empty → 0.
    curve = np.where((p1 == 0) & (p2 == 0), 1.0, 0.0)
    curve[nz] = cross[nz] / denom[nz]
    curve[0] = 1.0
    freq = np.arange(n) / D
    return freq, curve


def fsc_auc(freq, curve) -> float:
    """Trapezoid area under the FSC curve over ``freq`` in cycles/px (CryoBench's FSC-AUC, not normalised)."""
    return float(np.trapezoid(np.asarray(curve, dtype=np.float64), np.asarray(freq, dtype=np.float64)))


def fsc_resolution(freq, curve, threshold: float, apix: float = 1.0, convention: str = "cryobench"):
    """Resolution in Å (``1 / freq × apix``) where the FSC crosses ``threshold``.

    - ``"cryobench"``: the FIRST shell whose FSC is below the threshold (CryoBench's
      ``get_fsc_cutoff``); if the curve never drops below it, the Nyquist limit ``2 · apix``.
    - ``"cryodrgn"``: the LAST (highest-frequency) shell with FSC ≥ threshold (cryoDRGN's
      ``get_fsc_thresholds``, used by ``cryodrgn_utils fsc``); ``None`` if no shell beyond the zero
      frequency reaches it.
    On a curve that falls monotonically, cryobench reports one shell finer than cryodrgn (the first shell
    below vs the last one above); when the curve dips and recovers, cryodrgn can report a much finer value.
    """
    freq = np.asarray(freq, dtype=np.float64)
    curve = np.asarray(curve, dtype=np.float64)
    if convention == "cryobench":
        below = np.flatnonzero(curve < threshold)
        return float(apix / freq[below[0]]) if below.size else 2.0 * apix
    if convention == "cryodrgn":
        above = np.flatnonzero((curve >= threshold) & (freq > 0))
        return float(apix / freq[above[-1]]) if above.size else None
    raise InputError(f"fsc_resolution: convention={convention!r} is unknown; use 'cryobench' or 'cryodrgn'")


def fsc_summary(vol1, vol2, apix: float, mask=None) -> dict:
    """FSC curve, AUC and CryoBench-convention resolutions (Å) at 0.5 and 0.143, as JSON-friendly values.

    Keys: ``curve`` and ``freq`` (lists; freq in cycles/px), ``auc``, ``res_0.5``, ``res_0.143``.
    """
    freq, curve = fsc(vol1, vol2, mask)
    return {
        "curve": curve.tolist(),
        "freq": freq.tolist(),
        "auc": fsc_auc(freq, curve),
        "res_0.5": fsc_resolution(freq, curve, 0.5, apix),
        "res_0.143": fsc_resolution(freq, curve, 0.143, apix),
    }
