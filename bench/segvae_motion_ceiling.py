"""Per-state ceilings of the segment VAE's atomic volumes for a given base model (issue 25 item 1 diagnosis).

For each ground-truth state s of a dataset, the base's heavy atoms are moved onto the state using the
state's TRUE Cα trace (scoring-side knowledge: this bounds what any deformation of the base can score; no
method sees it), and the moved atoms' volume (the segment VAE's ``volume=atoms`` rendering) is scored
against the state's volume (FSC-AUC, the per-conformation protocol's FSC):

- ``rigid``: the whole base superposed on the state's Cα (Kabsch): a method that never deforms;
- ``blocks<K>``: K contiguous equal residue blocks, each superposed on its Cα (Kabsch per block): the best
  K rigid segments (fixed segmentation) can do;
- ``ca``: every residue's atoms translated so that its Cα sits exactly on the true Cα (side chains keep the
  base's orientation): the best a Cα-trace deformation of this base can do;
- ``ca_side<σ>``: ``ca`` with side-chain atoms drawn as Gaussians of σ Å (backbone as before);
- ``truth``: the state's own heavy atoms rendered the same way (the rendering's own ceiling).

    python bench/segvae_motion_ceiling.py --data adk --base adk/pdb1ake.pdb.gz [--sim-seed 1] [--blocks 20] [--side-sigma 2 3]

Prints one table row per state (with the base's Cα RMSD to it) and writes --out (JSON) if given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from cryobench_lab.config import register_configs
from cryobench_lab.data.particles import ParticleDataModule
from cryobench_lab.data.presets import STRUCTURES_DIR
from cryobench_lab.io.structures import read_structure
from cryobench_lab.metrics.atoms import superposed_rmsd
from cryobench_lab.metrics.fsc import fsc_summary
from cryobench_lab.models.components.segmentation import block_labels
from cryobench_lab.physics.gaussians import band_limited_sigma, voxelize_gaussians

REPO = Path(__file__).resolve().parents[1]


def kabsch(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R, t minimising |x R^T + t − y|² (rotations only), x and y (n, 3)."""
    cx, cy = x.mean(0), y.mean(0)
    U, _, Vt = np.linalg.svd((y - cy).T @ (x - cx))
    R = U @ np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))]) @ Vt
    return R, cy - cx @ R.T


def volume(atoms: np.ndarray, numbers: np.ndarray, D: int, apix: float, sigmas: np.ndarray | None = None) -> np.ndarray:
    """Density of one Gaussian per atom holding its electrons; σ = band_limited_sigma(apix) unless ``sigmas``."""
    z = torch.from_numpy(numbers).float()
    s = torch.full_like(z, band_limited_sigma(apix)) if sigmas is None else torch.from_numpy(sigmas).float()
    amp = z / ((2.0 * np.pi) ** 1.5 * s**3)
    return voxelize_gaussians(torch.from_numpy(atoms).float(), s, amp, D, apix).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="adk")
    ap.add_argument("--sim-seed", type=int, default=0)
    ap.add_argument("--base", default="adk/pdb1ake.pdb.gz", help="base model (path or bundled name)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[20])
    ap.add_argument("--side-sigma", type=float, nargs="*", default=[], help="also score 'ca' with side-chain atoms of this σ (Å)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=[f"data={args.data}", f"data.sim_seed={args.sim_seed}", "model=segvae", "logger=none"])
    dm = ParticleDataModule(cfg.data, seed=cfg.seed)
    dm.setup()
    info = dm.info
    base_path = Path(args.base) if Path(args.base).is_file() else STRUCTURES_DIR / args.base
    base = read_structure(base_path, keep_ligands=True)
    res_of_atom = base.atom_residue_index
    ca0 = base.residue_coords.astype(np.float64)
    files = sorted(p for p in Path(info.gt_structures).glob("state_*.*") if not p.name.endswith(".tmp"))
    rows = []
    for s, f in enumerate(files[: info.n_states]):
        st = read_structure(f, keep_ligands=True)
        ca = st.residue_coords.astype(np.float64)
        gt = info.gt_volumes[s].numpy()
        def auc(atoms, numbers=base.atom_numbers):
            return fsc_summary(volume(atoms, numbers, info.box_size, info.apix), gt, info.apix)["auc"]
        row = {"state": s, "base_rmsd": float(superposed_rmsd(ca0, ca)[0])}
        R, t = kabsch(ca0, ca)
        row["rigid"] = auc(base.atom_coords @ R.T + t)
        for K in args.blocks:
            labels = block_labels(len(ca0), K).numpy()
            moved = np.empty_like(base.atom_coords, dtype=np.float64)
            for k in range(K):
                Rk, tk = kabsch(ca0[labels == k], ca[labels == k])
                rows_k = labels[np.maximum(res_of_atom, 0)] == k
                moved[rows_k] = base.atom_coords[rows_k] @ Rk.T + tk
            row[f"blocks{K}"] = auc(moved)
        shift = ca - ca0 @ R.T - t  # per residue, after the global superposition
        on_ca = base.atom_coords @ R.T + t + shift[np.maximum(res_of_atom, 0)]
        row["ca"] = auc(on_ca)
        side = ~np.isin(base.atom_names, ["N", "CA", "C", "O"])
        for sc in args.side_sigma:  # side chains drawn blurred: their positions are the base's, not the state's
            sig = np.where(side, sc, band_limited_sigma(info.apix))
            row[f"ca_side{sc:g}"] = fsc_summary(volume(on_ca, base.atom_numbers, info.box_size, info.apix, sig), gt, info.apix)["auc"]
        row["truth"] = auc(st.atom_coords, st.atom_numbers)
        rows.append(row)
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"data": args.data, "sim_seed": args.sim_seed, "base": str(args.base), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
