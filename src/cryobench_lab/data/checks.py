"""Cheap start-up checks of inputs that look wrong but cannot be proven wrong: each gives one warning line.

- Defocus: CTF files give defocus in Å; real data lie within 0.1–10 µm (1,000–100,000 Å). Most particles
  outside that range usually means µm or nm in an Å column, and every CTF is then wrong.
- Poses: a consensus backprojection of a few hundred images, split into two half sets, at a small box. With
  the given poses the half maps must agree at low resolution clearly better than with the same poses
  dealt to other images (a shuffle, which keeps the pose distribution but breaks the pairing). Transposed
  or inverted rotations, or poses of another particle order, agree no better than the shuffle.
"""

from __future__ import annotations

import numpy as np
import torch

from cryobench_lab.physics.backprojection import wiener_solve
from cryobench_lab.physics.ctf import ctf_image, rescale_ctf_params
from cryobench_lab.physics.fft import fft2_center
from cryobench_lab.physics.shift import phase_shift_2d
from cryobench_lab.physics.slicing import insert_slices

DEFOCUS_RANGE = (1e3, 1e5)  # Å (0.1–10 µm)
DEFOCUS_OUTSIDE = 0.05  # warn when more than this fraction of particles lies outside DEFOCUS_RANGE
POSE_IMAGES = 400  # images of the consensus backprojection (evenly spaced over the data set)
POSE_BOX = 32  # px, the box the images are Fourier-cropped to for it
POSE_MARGIN = 0.15  # mean low-resolution half-map FSC the given poses must gain over shuffled ones
POSE_SEED = 0


def defocus_warning(ctf: np.ndarray, source: str) -> str | None:
    """One line when more than ``DEFOCUS_OUTSIDE`` of the particles' defocus lies outside 0.1–10 µm.

    ``ctf`` (N, 9) cryoDRGN layout, defocus U/V in Å (columns 2, 3).
    """
    df = np.asarray(ctf[:, 2:4], dtype=np.float64)  # (N, 2) Å
    if not len(df):
        return None
    outside = ((df < DEFOCUS_RANGE[0]) | (df > DEFOCUS_RANGE[1])).any(axis=1)
    if outside.mean() <= DEFOCUS_OUTSIDE:
        return None
    return (f"{source}: defocus spans {df.min():g} to {df.max():g} Å (median {np.median(df):g} Å) and "
            f"{100 * outside.mean():.0f}% of particles lie outside 1000-100000 Å (0.1-10 µm); defocus must be "
            "given in Å (values in µm or nm give wrong CTFs): check the units of the CTF columns")


@torch.no_grad()
def half_map_agreement(images: torch.Tensor, rot: torch.Tensor, trans: torch.Tensor,
                       ctf: torch.Tensor | None, box: int = POSE_BOX) -> float:
    """Mean half-map FSC over shells 2 … box/4 of a CTF-weighted backprojection at ``box`` px.

    ``images (n, D, D)``, ``rot (n, 3, 3)``, ``trans (n, 2)`` px at D (re-centring shifts), ``ctf (n, 9)``
    at D or None; half sets are alternate images.
    """
    D = images.shape[-1]
    box = min(box, D)
    lo = D // 2 - box // 2
    F = fft2_center(images.float())[:, lo : lo + box, lo : lo + box]  # (n, box, box) low frequencies
    F = phase_shift_2d(F, trans.float() * box / D)
    c = ctf_image(rescale_ctf_params(ctf.float(), box), box) if ctf is not None else torch.ones(F.shape)
    num = torch.zeros(2, box, box, box, dtype=torch.complex64)
    den = torch.zeros(2, box, box, box)
    for h in (0, 1):
        insert_slices(F[h::2] * c[h::2], rot[h::2].float(), c[h::2] ** 2, num[h], den[h])
    _, fsc = wiener_solve(num, den)  # (box // 2,)
    return float(fsc[2 : box // 4 + 1].mean())


def pose_warning(images: torch.Tensor, rot: torch.Tensor, trans: torch.Tensor, ctf: torch.Tensor | None,
                 source: str) -> tuple[str | None, dict]:
    """One line when the given poses make half maps agree no better than shuffled poses, and the scores.

    Arguments as :func:`half_map_agreement` (a few hundred images); the shuffle keeps each image's shift and
    CTF and deals the rotations to other images.
    """
    perm = torch.from_numpy(np.random.default_rng(POSE_SEED).permutation(len(rot)))
    given = half_map_agreement(images, rot, trans, ctf)
    shuffled = half_map_agreement(images, rot[perm], trans, ctf)
    scores = {"given": given, "shuffled": shuffled, "n_images": len(rot)}
    if given >= shuffled + POSE_MARGIN:
        return None, scores
    return (f"{source}: under the given poses, half maps of {len(rot)} images agree no better than under shuffled "
            f"poses (low-resolution half-map FSC {given:.2f} vs {shuffled:.2f}): the poses may be transposed, "
            "inverted, or in another particle order (or the CTF is wrong); check them before trusting any "
            "result"), scores


def startup_warnings(dataset, source: str) -> list[str]:
    """The warning lines of a built :class:`~cryobench_lab.data.particles.ParticleDataset`: its defocus (when
    it has a CTF) and its poses (when it has some), on ``POSE_IMAGES`` evenly spaced images."""
    lines = []
    if dataset.ctf is not None:
        lines.append(defocus_warning(dataset.ctf.numpy(), source))
    if dataset.meta.rot is not None and len(dataset) >= 2 * POSE_BOX:
        idx = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), POSE_IMAGES)).round().astype(np.int64))
        batch = dataset[idx]
        lines.append(pose_warning(batch["images"], batch["rot"], batch["trans"], batch.get("ctf"), source)[0])
    return [line for line in lines if line]
