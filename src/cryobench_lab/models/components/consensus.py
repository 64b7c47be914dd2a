"""The consensus map of a particle set: one Wiener-filtered Fourier backprojection of every image with its
given pose, shift and CTF, labels ignored (the map an atomic model is docked into before training).

Same estimator as ``model=backproject use_labels=false`` at ``pad=1``: trilinear splatting of each
re-centred image spectrum times its CTF into ``num`` and of CTF² into ``den``, per half set (even/odd index),
``wiener="constant"`` with ``reg = 1`` (cryoDRGN's ``backproject_voxel``), then a soft sphere inscribed in the
box.
"""

from __future__ import annotations

import torch

from cryobench_lab.metrics.masks import soft_sphere_mask
from cryobench_lab.physics.backprojection import wiener_solve
from cryobench_lab.physics.ctf import ctf_from_params
from cryobench_lab.physics.fft import fft2_center, ifft3_center
from cryobench_lab.physics.lattice import freq_grid_2d
from cryobench_lab.physics.shift import phase_shift_2d
from cryobench_lab.physics.slicing import insert_slices


@torch.no_grad()
def consensus_map(loader, D: int, apix: float) -> torch.Tensor:
    """Consensus volume ``(D, D, D)`` [z, y, x] of every batch of ``loader`` (batch dicts with ``images``,
    ``rot``, ``trans`` px, ``index`` and optionally ``ctf``), in the images' units."""
    num = torch.zeros(2, D, D, D, dtype=torch.complex64)
    den = torch.zeros(2, D, D, D)
    freqs = freq_grid_2d(D, apix)[None]  # (1, D, D, 2) 1/Å
    for batch in loader:
        spectra = phase_shift_2d(fft2_center(batch["images"].float().cpu()), batch["trans"].float().cpu())  # (B, D, D)
        ctf = ctf_from_params(freqs, batch["ctf"].float().cpu()) if "ctf" in batch else torch.ones_like(spectra.real)
        halves = batch["index"].cpu() % 2
        rot = batch["rot"].float().cpu()
        for h in (0, 1):
            sel = halves == h
            if sel.any():
                insert_slices(spectra[sel] * ctf[sel], rot[sel], ctf[sel] ** 2, num[h], den[h])
    V, _ = wiener_solve(num, den, "constant", 1.0)
    return ifft3_center(V).real * soft_sphere_mask(D)
