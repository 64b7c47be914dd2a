"""How good can the segment VAE's residue-Gaussian volumes be on a simulated dataset? (issue 5 diagnosis)

The segment VAE represents a structure by one Gaussian per residue at Cα (σ = model.sigma, 2 Å by default;
the residue's electrons),
while the data are simulated from every heavy atom. Three numbers bound its per-conformation FSC-AUC:

1. ``truth``: each state's true Cα positions, voxelised as residue Gaussians, against the state's volume:
   the score of a perfect prediction of the residue positions.
2. ``best_rigid_blocks``: the best K contiguous equal residue blocks (rigid transforms fitted to the true
   Cα by least squares, from the base = state 0) can do, per K: what rigid segments can express.
3. ``likelihood_bias``: starting from the true Cα of a state, free per-residue displacements that maximise
   the training objective (image correlation with that state's particle images, known poses and CTF):
   how far from Cα the objective's optimum lies (RMS Å) and what that does to the FSC-AUC.

    .venv/bin/python bench/segvae_ceiling.py [--data adk] [--blocks 8 20 40] [--bias-states 0 9]

Writes bench/results/segvae_ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch
from hydra import compose, initialize_config_dir

from cryobench_lab.config import register_configs
from cryobench_lab.data.particles import ParticleDataModule
from cryobench_lab.metrics.fsc import fsc_summary
from cryobench_lab.models.components.atoms import (
    move_by_segments,
    quaternion_vector_to_matrix,
    residue_gaussians,
)
from cryobench_lab.models.components.segmentation import FixedSegmentation
from cryobench_lab.models.segment_vae import image_correlation
from cryobench_lab.physics.gaussians import voxelize_gaussians
from cryobench_lab.run import build_model

REPO = Path(__file__).resolve().parents[1]


def volume_auc(model, coords: torch.Tensor, gt: Path) -> float:
    """FSC-AUC of the model's residue Gaussians (its σ and amplitudes) at ``coords`` (n, 3) Å, box frame,
    against the volume ``gt`` (.mrc)."""
    vol = voxelize_gaussians(coords, model.sigmas, model.amplitudes, model.D, model.apix)
    return fsc_summary(vol.numpy(), mrcfile.read(gt), model.apix)["auc"]


def box_frame_residues(path: Path) -> torch.Tensor:
    """Residue (Cα/C1′) coordinates of a structure file, Å in the box frame → (n, 3)."""
    g = residue_gaussians(path)
    return torch.from_numpy(g.coords + g.offset)


def fit_blocks(x0: torch.Tensor, true: torch.Tensor, K: int, steps: int = 1500) -> torch.Tensor:
    """Least-squares rigid transforms of K equal blocks of x0 (n, 3) onto true (n, 3) → moved (n, 3)."""
    w = FixedSegmentation(len(x0), K)(False)  # (n, K)
    p = torch.zeros(1, K, 6, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.02)
    for _ in range(steps):
        y = move_by_segments(x0, w, quaternion_vector_to_matrix(p[..., :3]), p[..., 3:])[0]
        loss = ((y - true) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return y.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="adk")
    ap.add_argument("--blocks", type=int, nargs="+", default=[8, 20, 40])
    ap.add_argument("--bias-states", type=int, nargs="+", default=[0, 9])
    ap.add_argument("--bias-steps", type=int, default=60)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/segvae_ceiling.json")
    args = ap.parse_args()
    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=[f"data={args.data}", "model=segvae", "logger=csv"])
    dm = ParticleDataModule(cfg.data, seed=cfg.seed)
    dm.setup()
    model = build_model(cfg, dm.info)
    cifs = sorted(Path(dm.info.gt_structures).glob("state_*.cif"))
    vols = [c.parent.parent / "gt_volumes" / f"{c.stem}.mrc" for c in cifs]
    trues = [box_frame_residues(c) for c in cifs]
    x0 = trues[0] - trues[0].mean(0)
    out: dict = {"dataset": args.data, "machine": platform.node(), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "n_states": len(cifs), "structures": str(cifs[0].parent)}
    truth = [volume_auc(model, t, v) for t, v in zip(trues, vols)]
    out["truth"] = {"per_state": truth, "mean": float(np.mean(truth))}
    print(f"truth Cα as residue Gaussians: mean FSC-AUC {np.mean(truth):.4f}")
    out["best_rigid_blocks"] = {}
    for K in args.blocks:
        rmsd, auc = [], []
        for t, v in zip(trues, vols):
            y = fit_blocks(x0, t - trues[0].mean(0), K) + trues[0].mean(0)
            rmsd.append(float(((y - t) ** 2).sum(1).mean().sqrt()))
            auc.append(volume_auc(model, y, v))
        out["best_rigid_blocks"][K] = {"rmsd_per_state": rmsd, "auc_per_state": auc, "auc_mean": float(np.mean(auc))}
        print(f"best {K} rigid blocks: RMSD ≤ {max(rmsd):.2f} Å, mean FSC-AUC {np.mean(auc):.4f}")
    batches = list(dm.train_dataloader())
    out["likelihood_bias"] = {}
    for s in args.bias_states:
        sel = [{k: v[b["label"] == s] for k, v in b.items()} for b in batches]
        sel = [b for b in sel if len(b["images"])]
        true = trues[s] - model.offset
        d = torch.zeros_like(true, requires_grad=True)
        opt = torch.optim.Adam([d], lr=0.02)
        corr = []
        for _ in range(args.bias_steps + 1):
            opt.zero_grad()
            total = 0.0
            for b in sel:
                c = image_correlation(model.render((true + d)[None].expand(len(b["images"]), -1, -1), b), b["images"])
                (-c.sum()).backward()
                total += float(c.detach().sum())
            corr.append(total / sum(len(b["images"]) for b in sel))
            opt.step()
        moved = true + d.detach() + model.offset
        row = {"corr_at_truth": corr[0], "corr_at_optimum": corr[-1],
               "rms_displacement_A": float(d.detach().norm(dim=1).pow(2).mean().sqrt()),
               "auc_at_truth": truth[s], "auc_at_optimum": volume_auc(model, moved, vols[s])}
        out["likelihood_bias"][s] = row
        print(f"state {s}: objective moves residues {row['rms_displacement_A']:.2f} Å RMS from Cα "
              f"(corr {corr[0]:.4f} → {corr[-1]:.4f}, FSC-AUC {truth[s]:.4f} → {row['auc_at_optimum']:.4f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
