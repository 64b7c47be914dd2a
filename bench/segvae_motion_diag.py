"""How much of the motion does a trained segment VAE recover, per state? (issue 25 item 1 diagnosis)

For a finished run folder: each state's representative latent (the per-conformation protocol's image
nearest the state's mean latent) is decoded to a Cα trace and compared with the state's true Cα (scoring
only): superposed RMSD of the prediction and of the base to the truth, the fraction of the base→state
distance recovered (1 − RMSD(pred)/RMSD(base)), and each domain's centre distance to CORE (Å: truth,
prediction, base).

    python bench/segvae_motion_diag.py <run folder> [<run folder> ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from cryobench_lab.callbacks.evaluation import load_gt_structures
from cryobench_lab.config import TrainConfig, register_configs
from cryobench_lab.data.particles import ParticleDataModule
from cryobench_lab.metrics.atoms import centre_of_mass_distances, residue_groups, superposed_rmsd
from cryobench_lab.metrics.conformations import representatives
from cryobench_lab.run import build_model


def diagnose(run: Path) -> list[dict]:
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run / "config.yaml"))
    dm = ParticleDataModule(cfg.data, seed=cfg.seed)
    dm.setup()
    info = dm.info
    model = build_model(cfg, info)
    model.load_state_dict(torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"])
    model.eval()
    emb = model.embed_all(dm.all_dataloader())
    z = emb["latent"][torch.argsort(emb["index"])]
    labels = torch.as_tensor(info.labels).long()
    reps = representatives(labels, z, None)
    truth = load_gt_structures(info)
    names, groups, pairs = residue_groups(truth[0].residue_numbers, truth[0].residue_chain_ids, info.domains)
    base = model.base_structure().double()
    rows = []
    for r in reps:
        s = r["state"]
        gt = torch.from_numpy(truth[s].residue_coords).double()
        pred = model.structure(r["latent"][None])[0].double()
        d = centre_of_mass_distances(torch.stack([gt, pred, base]), groups, pairs)  # (3, n_pairs)
        rb, rp = float(superposed_rmsd(base, gt)[0]), float(superposed_rmsd(pred, gt)[0])
        rows.append({"state": s, "rmsd_base": rb, "rmsd_pred": rp, "recovered": 1 - rp / rb,
                     **{f"{names[a]}-{names[b]} true/pred/base": tuple(np.round(d[:, k].numpy(), 1))
                        for k, (a, b) in enumerate(pairs)}})
    return rows


def main() -> None:
    register_configs()
    for run in map(Path, sys.argv[1:]):
        print(run)
        for row in diagnose(run):
            print("  " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
