"""Oracle reconstruction: Wiener-filtered Fourier backprojection with known poses and CTF.

One volume per ground-truth state (or one consensus volume without labels). Each image is re-centred by
its shift (optionally zero-padded by ``pad`` in real space first), and its spectrum is splatted (trilinear)
into a Fourier volume together with its CTF: ``num = Σ CTF·F``, ``den = Σ CTF²``, separately for two half
sets (even/odd particle index). The Wiener solve (:func:`~cryobench_lab.physics.backprojection.wiener_solve`)
uses a per-shell regulariser: ``wiener="constant"`` (default, ``reg`` times the shell's mean CTF² weight, as
cryoDRGN's ``backproject_voxel``) or ``wiener="fsc"`` (RELION-style, from the half maps' FSC).

The real-space volume is cropped back to the data's box and multiplied by a soft sphere inscribed in the
box (``sphere_mask``): outside it there is only reconstruction noise, which would otherwise lower the FSC at
every shell. Measured choices (bench/oracle_vs_cryodrgn.py, BENCHMARKS.md): ``pad=1`` beats ``pad=2`` at
the particle counts used here (the finer grid leaves voxels with few samples, so noise is amplified), and
no sinc² gridding correction (it amplifies noise at the box edges more than it restores signal).

This is not trained by gradient descent: one pass over the data accumulates the sums and the solve runs at
the end of the epoch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from cryobench_lab.data.particles import DatasetInfo
from cryobench_lab.metrics.masks import soft_sphere_mask
from cryobench_lab.models.base import ReconstructionModule
from cryobench_lab.physics.backprojection import wiener_solve
from cryobench_lab.physics.fft import fft2_center, ifft3_center
from cryobench_lab.physics.shift import phase_shift_2d
from cryobench_lab.physics.slicing import insert_slices


class Backprojection(ReconstructionModule):
    """Per-state (oracle) or consensus Wiener backprojection; see the module docstring."""

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
        sphere_mask: bool = True,
    ):
        super().__init__(info, name)
        if wiener not in ("fsc", "constant"):
            raise ValueError(f"model.wiener must be 'fsc' or 'constant', got {wiener!r}")
        if not info.has_poses:
            raise ValueError("model=backproject needs poses: pass data.poses= or a star/cs file with angles")
        self.automatic_optimization = False
        self.use_labels = use_labels and info.n_states > 0
        self.n_classes = info.n_states if self.use_labels else 1
        self.pad = pad
        self.wiener = wiener
        self.reg = reg
        self.ssnr_floor = ssnr_floor
        self.sphere_mask = sphere_mask
        P = pad * self.D
        self.P = P
        # (classes, halves, P, P, P) accumulators; buffers so they follow the module's device
        self.register_buffer("num", torch.zeros(self.n_classes, 2, P, P, P, dtype=torch.complex64), persistent=False)
        self.register_buffer("den", torch.zeros(self.n_classes, 2, P, P, P), persistent=False)
        self.register_buffer("volumes", torch.zeros(self.n_classes, self.D, self.D, self.D))
        self.register_buffer("half_fsc", torch.zeros(self.n_classes, P // 2))

    def configure_optimizers(self):
        return None

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
        classes = batch["label"].clamp(min=0) if self.use_labels else torch.zeros_like(batch["label"])
        halves = batch["index"] % 2
        for c in classes.unique():
            for h in (0, 1):
                sel = (classes == c) & (halves == h)
                if sel.any():
                    insert_slices(weighted[sel], batch["rot"][sel], ctf2[sel], self.num[c, h], self.den[c, h])
        return None

    def on_train_epoch_end(self) -> None:
        self.solve()

    @torch.no_grad()
    def solve(self) -> None:
        """Turn the accumulated sums into real-space volumes (fills ``volumes`` and ``half_fsc``)."""
        P, D = self.P, self.D
        lo = (P - D) // 2
        mask = soft_sphere_mask(D).to(self.volumes) if self.sphere_mask else 1.0
        for c in range(self.n_classes):
            V, self.half_fsc[c] = wiener_solve(self.num[c], self.den[c], self.wiener, self.reg, self.ssnr_floor)
            vol = ifft3_center(V).real[lo : lo + D, lo : lo + D, lo : lo + D]
            self.volumes[c] = vol * mask

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
