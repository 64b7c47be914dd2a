"""Rigidly dock an atomic model into a map (rotation + translation maximising the real-space correlation).

    python -m cryobench_lab.dock --model model.pdb --map consensus.mrc --out docked.pdb [--center X Y Z]

The model's heavy atoms are drawn as the simulator draws atoms (one Gaussian per atom holding its electrons,
σ = max(1 Å, 0.75·apix)) and superposed on the map by :func:`cryobench_lab.metrics.alignment.fit_atoms`: a
global rotation grid (20°) with translations by FFT, then local refinement (to ~0.3°). The map must show
protein as positive density. Every atom of the file (hydrogens, waters and ligands too) moves by the fitted
transform; the output is in the input's frame.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from cryobench_lab.errors import InputError
from cryobench_lab.io.mrc import read_mrc
from cryobench_lab.io.structures import read_structure, write_structure
from cryobench_lab.metrics.alignment import fit_atoms


def dock(model: str, density: np.ndarray, apix: float, center=None) -> tuple[np.ndarray, np.ndarray, float, object]:
    """Fit ``model`` (PDB/mmCIF) into ``density (D, D, D)`` [z, y, x] at ``apix`` Å/voxel; ``center`` (Å,
    the model file's frame) is the position of the box centre (voxel D // 2), default ``(D // 2)·apix`` on
    each axis (a map whose MRC origin is 0). Returns ``rotation (3, 3)``, ``translation (3,)`` Å (moved atoms
    = ``x @ R.T + t`` in the file's frame), the correlation and the whole structure (every atom kept)."""
    D = density.shape[-1]
    if density.ndim != 3 or density.shape != (D, D, D):
        raise InputError(f"--map: a cubic 3D map is needed, got shape {density.shape}")
    c = np.full(3, (D // 2) * apix) if center is None else np.asarray(center, dtype=np.float64)
    heavy = read_structure(model, keep_ligands=True)
    if heavy.n_atoms == 0:
        raise InputError(f"{model}: no heavy atoms; pass an atomic model (PDB/mmCIF)")
    fit = fit_atoms(torch.from_numpy(heavy.atom_coords - c).double(), torch.from_numpy(heavy.atom_numbers).double(),
                    torch.from_numpy(density), apix)
    R = fit["rotation"].double().numpy()
    t = fit["translation"].double().numpy() + c - R @ c  # the same transform in the file's frame
    full = read_structure(model, keep_hydrogens=True, keep_waters=True, keep_ligands=True)
    return R, t, fit["score"], full


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cryobench_lab.dock", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="atomic model to move (PDB/mmCIF, .gz too)")
    ap.add_argument("--map", required=True, help="map to dock into (.mrc, protein positive)")
    ap.add_argument("--apix", type=float, help="voxel size in Å (default: the map header's)")
    ap.add_argument("--center", type=float, nargs=3, metavar=("X", "Y", "Z"),
                    help="position of the map's centre voxel (D//2) in the model file's frame, Å "
                         "(default: D//2 · apix; structures of the simulator are centred: pass 0 0 0)")
    ap.add_argument("--out", required=True, help="docked model (.pdb, or .cif for mmCIF)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        density, apix = read_mrc(args.map)
        apix = args.apix or apix
        if not apix > 0:
            raise InputError(f"{args.map}: the header has no voxel size; pass --apix <Å per voxel>")
        R, t, score, full = dock(args.model, density, apix, args.center)
        write_structure(args.out, full, full.atom_coords.astype(np.float64) @ R.T + t)
    except InputError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    angle = np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1.0, 1.0)))
    print(f"wrote {args.out}: rotated {angle:.1f}°, then translated by {np.round(t, 1).tolist()} Å; correlation {score:.3f}")


if __name__ == "__main__":
    main()
