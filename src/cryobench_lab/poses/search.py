"""Hierarchical pose search over SO(3) × in-plane shifts against a known volume (pure torch).

Conventions (docs/conventions.md): a pose is ``R (3, 3)`` and a re-centring shift ``t`` px ``[x, y]``; the
image's centred spectrum re-centred by ``+t`` equals ``CTF · slice(R)``, where ``slice(R)`` samples the
volume's spectrum at ``[kx, ky, 0] @ R``.

Score of a pose on image ``i`` (nats when ``noise_power`` is the per-shell power of the noise spectrum):

    E(R, t) = Σ_{k in the half plane, |k| < r} w_k |Y_i(k) e^{−2πi k·t/D} − CTF_i(k) S_R(k)|² / N(|k|)

The search (:class:`PoseSearch`):

1. base level: every rotation of a quasi-uniform grid of spacing ``base_spacing_deg`` (Fibonacci viewing
   directions × uniform in-plane angles) × a square shift grid within ``±max_shift`` px, at a band radius
   where that spacing is resolvable. The slices of the base grid do not depend on the image, so they are
   sampled once per volume; the image-dependent part is one real matrix product per batch.
2. each image keeps its ``n_keep`` best rotations (each with its best shift);
3. each level halves the rotation and shift steps: every kept candidate is replaced by its 3×3×3 local
   rotations (axis-angle offsets) × 3×3 local shifts, the band radius grows with the resolution the step
   needs (``r = 2 / step_rad`` px, capped at ``max_radius``), and half as many candidates are kept (one
   after the last level): the candidates' scores separate as the band grows.

:meth:`PoseSearch.local` runs the levels alone around given poses (local search once poses are roughly
known).

The volume is given as a centred spectrum oversampled ``pad``-fold (:func:`physics.slicing.volume_spectrum`),
cropped to the band the search uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryobench_lab.physics.lattice import grid_2d
from cryobench_lab.physics.rotations import local_rotations, so3_grid
from cryobench_lab.physics.slicing import sample_spectrum


def shift_grid(max_shift: float, step: float) -> torch.Tensor:
    """Square grid of shifts ``[x, y]`` px with spacing ``step`` within ``±max_shift`` → ``(T, 2)`` (centre first)."""
    n = int(math.floor(max_shift / step + 1e-6))
    a = torch.arange(-n, n + 1, dtype=torch.float32) * step
    g = torch.stack(torch.meshgrid(a, a, indexing="xy"), -1).reshape(-1, 2)
    return g[torch.argsort(g.norm(dim=-1), stable=True)]


def band_points(D: int, radius: float, device=None) -> dict:
    """Half-plane frequencies ``|k| < radius`` of a ``D × D`` centred spectrum: ``iy, ix (P,)``, ``freqs (P, 2)``
    [kx, ky] cycles/box, ``shell (P,)`` and ``weight (P,)`` (½ for the zero frequency, its own partner)."""
    k = grid_2d(D, device=device)  # (D, D, 2)
    kx, ky = k[..., 0], k[..., 1]
    r2 = kx.square() + ky.square()
    sel = (r2 < radius**2) & ((ky > 0) | ((ky == 0) & (kx >= 0)))
    iy, ix = torch.nonzero(sel, as_tuple=True)
    freqs = k[iy, ix]
    weight = torch.ones(len(iy), device=device)
    weight[(freqs == 0).all(-1)] = 0.5
    return {"iy": iy, "ix": ix, "freqs": freqs, "shell": r2[iy, ix].sqrt().round().long(), "weight": weight}


def crop_spectrum(spectrum: torch.Tensor, radius: float, pad: int) -> torch.Tensor:
    """The central part of an oversampled centred spectrum that holds every frequency ``|k| ≤ radius + 1``
    (cycles per image box): same centre convention, smaller box (faster interpolation)."""
    Dv = spectrum.shape[-1]
    half = min(Dv // 2, int(math.ceil((radius + 1) * pad)) + 1)
    lo = Dv // 2 - half
    return spectrum[lo : lo + 2 * half, lo : lo + 2 * half, lo : lo + 2 * half]


@dataclass
class SearchConfig:
    """Settings of :class:`PoseSearch` (px are image pixels at the training box D)."""

    base_spacing_deg: float = 15.0  # rotation grid of the global level (≈4.4k rotations)
    levels: int = 3  # the base level and 2 halvings of the steps (final rotation step 3.75°)
    n_keep: int = 4  # candidates kept per image after the base level
    max_shift: float = 0.1  # shift range, a fraction of D (±6.4 px at D = 64)
    max_radius: float = 0.5  # band radius cap, a fraction of D/2
    min_radius: int = 4  # band radius floor (px)


class PoseSearch:
    """Hierarchical search of poses of images against one volume; see the module docstring.

    ``spectrum (Dv, Dv, Dv)`` complex: the volume's centred spectrum oversampled ``pad``-fold; ``D`` the image
    box. The base level's slices are sampled here, once.
    """

    def __init__(self, spectrum: torch.Tensor, D: int, pad: int = 2, config: SearchConfig | None = None):
        self.cfg = config or SearchConfig()
        self.D, self.pad = D, pad
        self.max_radius = max(self.cfg.min_radius, self.cfg.max_radius * D / 2)
        self.spectrum = crop_spectrum(spectrum, self.max_radius, pad)
        self.device = spectrum.device
        self.base_rot = so3_grid(self.cfg.base_spacing_deg).to(self.device)  # (G, 3, 3)
        self.base_step = math.radians(self.cfg.base_spacing_deg)
        self.base_pts = band_points(D, self.radius(self.base_step), self.device)
        coords = self.base_pts["freqs"] @ self.base_rot[:, :2, :]  # (G, P, 3)
        self.base_slices = sample_spectrum(self.spectrum, coords, pad)  # (G, P)
        # shift step resolvable at the band radius: phase error ≤ π/4 at half a step
        self.base_shift_step = D / (4 * self.radius(self.base_step))
        self.base_shifts = shift_grid(self.cfg.max_shift * D, self.base_shift_step).to(self.device)

    def radius(self, step_rad: float) -> float:
        """Band radius (px) at which a rotation step of ``step_rad`` moves the outermost frequency by 2 px."""
        return float(min(self.max_radius, max(self.cfg.min_radius, 2.0 / step_rad)))

    def _data(self, spectra, ctf, noise_power, pts):
        """Observed values ``Y (B, P)``, CTF ``(B, P)`` and weights ``w/N (P,)`` at the band points."""
        Y = spectra[:, pts["iy"], pts["ix"]]
        C = ctf[:, pts["iy"], pts["ix"]] if ctf is not None else torch.ones_like(Y.real)
        w = pts["weight"]
        if noise_power is not None:
            w = w / noise_power[pts["shell"].clamp(max=len(noise_power) - 1)]
        return Y, C, w

    def _ramps(self, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """``exp(−2πi k·t/D)`` for shifts ``t (..., 2)`` at ``freqs (P, 2)`` → ``(..., P)`` (re-centres by +t)."""
        phase = -2.0 * math.pi / self.D * (t @ freqs.T)
        return torch.polar(torch.ones_like(phase), phase)

    @torch.no_grad()
    def search(self, spectra: torch.Tensor, ctf: torch.Tensor | None = None,
               noise_power: torch.Tensor | None = None) -> dict:
        """Poses of images with observed centred spectra ``spectra (B, D, D)`` (not re-centred) and CTF
        ``(B, D, D)`` (None: no CTF); ``noise_power (D//2 + 1,)`` per-shell noise power (None: 1).

        Returns ``rot (B, 3, 3)``, ``trans (B, 2)`` px and ``energy (B,)`` (E at the final level's band).
        """
        B = spectra.shape[0]
        pts = self.base_pts
        Y, C, w = self._data(spectra, ctf, noise_power, pts)
        S = self.base_slices  # (G, P)
        T = len(self.base_shifts)
        Yr = Y[:, None] * self._ramps(self.base_shifts, pts["freqs"])[None]  # (B, T, P) re-centred
        A = (C * w)[:, None] * Yr  # (B, T, P)
        cross = torch.cat([A.real, A.imag], -1).reshape(B * T, -1) @ torch.cat([S.real, S.imag], -1).T  # (B·T, G)
        norm = (C.square() * w) @ S.abs().square().T  # (B, G)
        E = norm[:, None] - 2 * cross.reshape(B, T, -1)  # (B, T, G), up to the constant Σ w|Y|²
        E, best_t = E.min(1)  # best shift per rotation (B, G)
        keep = min(self.cfg.n_keep, E.shape[1])
        _, idx = E.topk(keep, dim=1, largest=False)  # (B, n)
        rot = self.base_rot[idx]  # (B, n, 3, 3)
        trans = self.base_shifts[best_t.gather(1, idx)]  # (B, n, 2)
        step, shift_step = self.base_step, self.base_shift_step
        energy = None
        for level in range(1, self.cfg.levels):
            step, shift_step = step / 2, shift_step / 2
            keep = 1 if level == self.cfg.levels - 1 else max(1, keep // 2)
            rot, trans, energy = self._refine(spectra, ctf, noise_power, rot, trans, step, shift_step, keep)
        if energy is None:  # a single level: the energies of the base band
            energy = E.gather(1, idx[:, :1])
        Y, C, w = self._data(spectra, ctf, noise_power, band_points(self.D, self.radius(step), self.device))
        return {"rot": rot[:, 0], "trans": trans[:, 0], "energy": energy[:, 0] + (Y.abs().square() * w).sum(1)}

    @torch.no_grad()
    def local(self, spectra: torch.Tensor, ctf: torch.Tensor | None, noise_power: torch.Tensor | None,
              rot: torch.Tensor, trans: torch.Tensor, step_deg: float = 7.5, levels: int = 3) -> dict:
        """Local search around poses ``rot (B, 3, 3)``, ``trans (B, 2)`` px: ``levels`` levels of 27 local
        rotations × 9 local shifts, the first with rotation step ``step_deg``, each next one at half the
        steps. Arguments and result as :meth:`search`; the given pose is among the candidates, so the
        result never scores worse than it at the first level's band."""
        step = math.radians(step_deg)
        shift_step = self.D / (4 * self.radius(step))
        rot, trans = rot[:, None], trans[:, None]
        for _ in range(levels):
            rot, trans, energy = self._refine(spectra, ctf, noise_power, rot, trans, step, shift_step, 1)
            step, shift_step = step / 2, shift_step / 2
        Y, C, w = self._data(spectra, ctf, noise_power, band_points(self.D, self.radius(2 * step), self.device))
        return {"rot": rot[:, 0], "trans": trans[:, 0], "energy": energy[:, 0] + (Y.abs().square() * w).sum(1)}

    def _refine(self, spectra, ctf, noise_power, rot, trans, step, shift_step, keep):
        """One level: local rotations × local shifts around each candidate; the best ``keep`` per image."""
        pts = band_points(self.D, self.radius(step), self.device)
        Y, C, w = self._data(spectra, ctf, noise_power, pts)
        B, n = rot.shape[:2]
        local = local_rotations(step).to(rot)  # (27, 3, 3)
        cand = (local[None, None] @ rot[:, :, None]).reshape(B, -1, 3, 3)  # (B, n·27, 3, 3)
        coords = pts["freqs"] @ cand[..., :2, :]  # (B, n·27, P, 3)
        S = sample_spectrum(self.spectrum, coords, self.pad).reshape(B, n, 27, -1)  # (B, n, 27, P)
        offsets = shift_grid(shift_step, shift_step).to(trans)  # (9, 2)
        shifts = trans[:, :, None] + offsets  # (B, n, 9, 2)
        A = (C * w)[:, None, None] * Y[:, None, None] * self._ramps(shifts, pts["freqs"])  # (B, n, 9, P)
        cross = torch.einsum("bnsp,bnrp->bnsr", A.real, S.real) + torch.einsum("bnsp,bnrp->bnsr", A.imag, S.imag)
        norm = torch.einsum("bp,bnrp->bnr", C.square() * w, S.abs().square())
        E = norm[:, :, None] - 2 * cross  # (B, n, 9, 27)
        E, best_s = E.min(2)  # (B, n, 27)
        E = E.reshape(B, -1)
        Ek, idx = E.topk(keep, dim=1, largest=False)  # (B, keep) over n·27
        rot = cand.gather(1, idx[..., None, None].expand(-1, -1, 3, 3))
        s = best_s.reshape(B, -1).gather(1, idx)  # (B, keep)
        trans = shifts.reshape(B, -1, 2).gather(1, ((idx // 27) * 9 + s)[..., None].expand(-1, -1, 2))
        return rot, trans, Ek
