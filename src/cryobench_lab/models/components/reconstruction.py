"""Pieces shared by the Fourier-space reconstruction methods (oracle backprojection, multiclass EM, focused
classification): nearest-neighbour slice gridding, and the class STAR writer.

Nearest-neighbour gridding: a slice pixel at frequency ``k`` (cycles per image box, ``|k| < D/2``) under
pose ``R`` reads/writes the voxel nearest to ``pad · ([kx, ky, 0] @ R) + P // 2`` of a ``(P, P, P)``
spectrum, ``P = pad · D``. Gathering and scattering are exact adjoints, and each pixel touches ONE voxel,
so ``Σ_i A_iᵀ A_i`` is diagonal: the weighted least-squares (Wiener) solve ``num / (den + λ)`` is then the
exact maximiser of the Gaussian posterior, which is what makes an EM step an exact ascent step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from cryobench_lab.data.presets import default_cache_dir
from cryobench_lab.io.exports import portable_stack
from cryobench_lab.io.star import (
    image_locations,
    read_star,
    read_star_blocks,
    write_particle_star,
    write_star,
)
from cryobench_lab.physics.lattice import grid_2d


class NearestGrid:
    """Band pixels of a ``D × D`` image and their nearest voxels in a ``pad``-oversampled 3D spectrum.

    ``band``: flat indices (n,) of the centred image pixels with ``|k| < D/2 − 1/(2·pad)`` (the Nyquist disc
    less half a voxel, so every rounded voxel index stays within ``±(P/2 − 1)`` of the centre and Hermitian
    partners ``±k`` map to voxels ``±v``).
    """

    def __init__(self, D: int, pad: int = 2, device=None):
        self.D, self.pad, self.P = D, pad, pad * D
        k = grid_2d(D, device=device)  # (D, D, 2) cycles/box
        inside = k.square().sum(-1) < (D / 2 - 0.5 / pad) ** 2
        self.band = torch.nonzero(inside.reshape(-1)).squeeze(1)  # (n,)
        self.k = k.reshape(-1, 2)[self.band]  # (n, 2)

    def voxels(self, rot: torch.Tensor) -> torch.Tensor:
        """Flat voxel index of every band pixel under poses ``rot (..., 3, 3)`` → ``(..., n)`` int64."""
        pos = torch.einsum("nc,...cj->...nj", self.k.to(rot.dtype), rot[..., :2, :])  # (..., n, 3) [x, y, z]
        ijk = torch.round(pos * self.pad).long() + self.P // 2
        return (ijk[..., 2] * self.P + ijk[..., 1]) * self.P + ijk[..., 0]

    def take(self, images: torch.Tensor) -> torch.Tensor:
        """Band values of centred 2D arrays ``(..., D, D)`` → ``(..., n)``."""
        return images.reshape(*images.shape[:-2], -1)[..., self.band]


def write_class_star(path: Path, classes: np.ndarray, info, datamodule, max_prob: np.ndarray | None = None) -> None:
    """The input particle table with ``rlnClassNumber`` (1-based) and, given ``max_prob`` (N,), RELION's
    ``rlnMaxValueProbDistribution`` (the largest class posterior of each image); for a bare stack a new table
    from the loaded metadata; other inputs (cs, txt) get a warning (``classes.pkl`` has them).

    Image paths are relative to the new file; stacks in the dataset cache are linked beside it
    (io/exports.py ``portable_stack``), so the file still opens after the cache is cleaned or moved."""
    source = Path(info.source)
    star_dir = Path(path).parent
    if source.suffix == ".star" and source.exists():
        df = read_star(source)
        optics_columns = df.attrs.get("optics_columns", [])
        df = df.drop(columns=[c for c in optics_columns if c in df.columns and c != "rlnOpticsGroup"])
        paths, indices = image_locations(df, source, getattr(datamodule.cfg, "datadir", None))
        portable = {p: portable_stack(Path(p), star_dir, default_cache_dir()) for p in set(paths)}
        df["rlnImageName"] = [f"{i + 1}@{portable[p]}" for i, p in zip(indices, paths)]
        df["rlnClassNumber"] = classes + 1
        if max_prob is not None:
            df["rlnMaxValueProbDistribution"] = np.asarray(max_prob, dtype=np.float64)
        optics = read_star_blocks(source).get("optics")
        write_star(path, df, optics if optics is not None and len(optics) else None)
        return
    meta = datamodule.dataset.meta
    if source.suffix in (".mrcs", ".mrc"):
        stack = portable_stack(source, star_dir, default_cache_dir())
        names = [f"{i + 1}@{stack}" for i in range(len(classes))]
        write_particle_star(path, names, meta.rot, meta.trans_px, meta.ctf, apix=meta.apix, D=meta.D, labels=classes,
                            extra={"rlnMaxValueProbDistribution": max_prob} if max_prob is not None else None)
    else:
        rank_zero_warn(f"{source.name}: class assignments are written as classes.pkl only; a STAR file needs "
                       "per-particle image names, which only .star and .mrcs inputs give")
