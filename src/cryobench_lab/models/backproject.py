"""Reference reconstructions with known poses and CTF: the oracle given the truth, and the consensus floor.

Fourier backprojection: each image is re-centred by its shift, zero-padded ``pad``-fold in real space, and
its spectrum is splatted (trilinear) into a ``(P, P, P)`` Fourier volume (``P = pad · D``) together with its
CTF: ``num = Σ CTF·Y``, ``den = Σ CTF²``, separately for two half sets (even/odd particle index). The Wiener
solve (physics/backprojection.py) then uses one of three regularisers:

- ``wiener="oracle"``: the optimal per-shell Wiener filter given the truth,
  ``V = num / (den + β(k) / S(k))``. ``S(k)`` is the signal power per voxel of the state's ground-truth
  spectrum (padded like the data) times the data's scale, fitted by least squares of ``num`` on
  ``den · GT`` over all states; ``β(k)`` is the noise power per unit CTF² weight, measured from the
  disagreement of the half sets. Needs labels and ground-truth volumes.
- ``wiener="fsc"``: RELION-style, the SSNR from the half maps' FSC (no ground truth).
- ``wiener="constant"`` (default): Tikhonov, ``reg`` times the shell's mean CTF² weight (cryoDRGN's
  ``backproject_voxel``).

``gridding_correction`` divides the real-space result by the ``sinc²`` apodisation of trilinear gridding
(as RELION does). The volume is cropped back to the data's box and multiplied by a soft sphere inscribed in
the box (``sphere_mask``).

Three configs (conf/model): ``backproject`` (defaults: ``pad=1 wiener=constant gridding_correction=false``),
the plain labelled reconstruction, per state with true poses and CTF; ``oracle`` (``wiener=oracle``), the
reference GIVEN THE TRUTH (labels, poses, CTF, per-shell SSNR); and
``consensus`` (``use_labels=false wiener=fsc``), one homogeneous reconstruction of all images with the true
poses and CTF and no labels, the floor every heterogeneity method must beat. None is an upper bound on
methods that pool states or carry priors (support, smoothness), and they do beat it. The scorer computes the
oracle and the consensus for every run (callbacks/references.py). Measured (bench/results/2026-12-08_oracle.md):
at these particle counts (300–1000 images per state) ``pad=2`` with the gridding correction scores far lower
FSC-AUC than ``pad=1`` without it (the finer grid leaves Fourier voxels without samples, which a per-voxel
Wiener filter sets to zero), and the minimum-mean-square-error ``wiener=oracle`` scores slightly lower FSC
than the weaker Tikhonov term (FSC rewards under-regularisation), though its squared error is lower.

This is not trained by gradient descent: one pass over the data accumulates the sums and the solve runs at
the end of the epoch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from cryobench_lab.data.particles import DatasetInfo
from cryobench_lab.errors import InputError
from cryobench_lab.metrics.masks import soft_sphere_mask
from cryobench_lab.models.base import ReconstructionModule
from cryobench_lab.physics.backprojection import gridding_correction, oracle_wiener_solve, shell_power, wiener_solve
from cryobench_lab.physics.fft import fft2_center, ifft3_center
from cryobench_lab.physics.shift import phase_shift_2d
from cryobench_lab.physics.slicing import insert_slices, volume_spectrum

WIENER_MODES = ("oracle", "fsc", "constant")


class Backprojection(ReconstructionModule):
    """Per-state oracle or consensus Wiener backprojection; see the module docstring."""

    default_epochs = 1
    rank_summed_buffers = ("num", "den")  # DDP: summed over ranks each epoch (callbacks/distributed.py)

    def __init__(
        self,
        info: DatasetInfo,
        name: str = "backproject",
        use_labels: bool = True,
        pad: int = 1,
        wiener: str = "constant",
        reg: float = 1.0,
        ssnr_floor: float = 1e-3,
        gridding_correction: bool = False,
        sphere_mask: bool = True,
    ):
        super().__init__(info, name)
        if wiener not in WIENER_MODES:
            raise InputError(f"model.wiener must be one of {', '.join(WIENER_MODES)}, got {wiener!r}")
        if not info.has_poses:
            raise InputError("model=backproject needs poses: pass data.poses= or a star/cs file with angles")
        self.automatic_optimization = False
        self.use_labels = use_labels and info.n_states > 0
        if wiener == "oracle" and (not self.use_labels or info.gt_volumes is None):
            raise InputError(
                "model.wiener=oracle needs labels and ground-truth volumes (data.labels=, data.gt_volumes=) and "
                "model.use_labels=true; use model.wiener=fsc for a reconstruction without ground truth"
            )
        self.n_classes = info.n_states if self.use_labels else 1
        self.pad = pad
        self.wiener = wiener
        self.reg = reg
        self.ssnr_floor = ssnr_floor
        self.gridding_correction = gridding_correction
        self.sphere_mask = sphere_mask
        P = pad * self.D
        self.P = P
        # (classes, halves, P, P, P) accumulators; buffers so they follow the module's device
        self.register_buffer("num", torch.zeros(self.n_classes, 2, P, P, P, dtype=torch.complex64), persistent=False)
        self.register_buffer("den", torch.zeros(self.n_classes, 2, P, P, P), persistent=False)
        self.register_buffer("volumes", torch.zeros(self.n_classes, self.D, self.D, self.D))
        # per class: the half maps' FSC (fsc, constant) or the noise power β per unit CTF² (oracle), per shell
        self.register_buffer("half_fsc", torch.zeros(self.n_classes, P // 2))
        self.scale = float("nan")  # oracle: the fitted scale of the data relative to the ground truth

    def configure_optimizers(self):
        return None

    def setup(self, stage: str | None = None) -> None:
        # every image, like the methods it is compared with and the scorer's references (a held-out split
        # would give it 10 % fewer images than they see)
        self.train_on_every_particle()

    def _padded_spectra(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-centred spectra of zero-padded images and their CTF weights, both (B, P, P)."""
        D, P = self.D, self.P
        lo = (P - D) // 2
        padded = F.pad(batch["images"], (lo, P - D - lo, lo, P - D - lo))  # (B, P, P)
        spectra = phase_shift_2d(fft2_center(padded), batch["trans"])  # (B, P, P) complex
        ctf = self.ctf(batch, box=P)
        if ctf is None:
            ctf = torch.ones_like(spectra.real)
        return spectra * ctf, ctf**2

    def training_step(self, batch: dict, batch_idx: int):
        weighted, ctf2 = self._padded_spectra(batch)
        labels = batch["label"]
        classes = labels if self.use_labels else torch.zeros_like(labels)
        halves = batch["index"] % 2
        for c in classes[classes >= 0].unique():  # images of unknown state (−1) are left out of the oracle
            for h in (0, 1):
                sel = (classes == c) & (halves == h)
                if sel.any():
                    insert_slices(weighted[sel], batch["rot"][sel], ctf2[sel], self.num[c, h], self.den[c, h])
        return None

    def on_train_epoch_end(self) -> None:
        self.solve()

    def _gt_spectrum(self, c: int) -> torch.Tensor:
        """Centred spectrum ``(P, P, P)`` of state c's ground-truth volume, padded like the data."""
        return volume_spectrum(torch.as_tensor(self.info.gt_volumes[c]).float().to(self.volumes.device), self.pad)

    def _fit_scale(self) -> float:
        """Least-squares scale ``a`` of ``num ≈ a · den · GT`` over every state (images are normalised)."""
        top, bottom = 0.0, 0.0
        for c in range(self.n_classes):
            G = self._gt_spectrum(c)
            top += float((self.num[c].sum(0) * G.conj()).real.sum())
            bottom += float((self.den[c].sum(0) * G.abs() ** 2).sum())
        return top / bottom if bottom > 0 else float("nan")

    @torch.no_grad()
    def solve(self) -> None:
        """Turn the accumulated sums into real-space volumes (fills ``volumes`` and ``half_fsc``)."""
        P, D = self.P, self.D
        lo = (P - D) // 2
        mask = soft_sphere_mask(D).to(self.volumes) if self.sphere_mask else 1.0
        apodisation = gridding_correction(P, device=self.volumes.device) if self.gridding_correction else None
        if self.wiener == "oracle":
            self.scale = self._fit_scale()
        for c in range(self.n_classes):
            if self.wiener == "oracle":
                signal = self.scale**2 * shell_power(self._gt_spectrum(c))  # (P//2,) per voxel, data units
                V, self.half_fsc[c] = oracle_wiener_solve(self.num[c], self.den[c], signal)
            else:
                V, self.half_fsc[c] = wiener_solve(self.num[c], self.den[c], self.wiener, self.reg, self.ssnr_floor)
            vol = ifft3_center(V).real  # (P, P, P)
            if apodisation is not None:
                vol = vol / apodisation
            self.volumes[c] = vol[lo : lo + D, lo : lo + D, lo : lo + D] * mask

    # ---- evaluation contract -------------------------------------------------------------------------
    def embed(self, batch: dict) -> dict:
        if not self.use_labels:
            return {"latent": None, "class_probs": None}
        probs = F.one_hot(batch["label"].clamp(min=0), self.n_classes).float()  # oracle assignment
        return {"latent": None, "class_probs": probs}

    def decode(self, latent: Optional[torch.Tensor], classes: Optional[torch.Tensor]) -> torch.Tensor:
        if classes is None:
            classes = torch.zeros(1 if latent is None else latent.shape[0], dtype=torch.long)
        return self.volumes[classes.to(self.volumes.device)]
