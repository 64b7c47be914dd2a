"""Score a trained model with the shared protocol and write the results where users and loggers find them.

Writes into the run folder:
- ``metrics.json``: every scalar under the same keys for every method (``val/fsc_auc``, ...), plus
  per-state curves;
- ``volumes/state_XXX.mrc``: the decoded volume that represents each ground-truth state (voxel size set);
  ``volumes/class_XXX.mrc`` when the data has no ground truth;
- ``figures/fsc.png``: the per-state FSC curves.
Scalars reach the Lightning loggers (W&B, CSV) through ``log_metrics``; model code never touches a logger.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from cryobench_lab.io.mrc import write_mrc
from cryobench_lab.metrics.conformations import representatives
from cryobench_lab.metrics.fsc import fsc_summary


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)


def _fsc_figure(path: Path, curves: list[dict], apix: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for c in curves:
        ax.plot(np.asarray(c["freq"]) / apix, c["curve"], lw=1, label=f"state {c['state']}")
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.axhline(0.143, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    if len(curves) <= 12:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


class EvaluationCallback(L.Callback):
    """Runs the per-conformation FSC protocol after ``fit`` and writes metrics, volumes and figures."""

    def __init__(self, datamodule, out_dir: str, fsc_mask: str = "none", save_volumes: bool = True):
        self.datamodule = datamodule
        self.out_dir = Path(out_dir)
        self.fsc_mask = fsc_mask
        self.save_volumes = save_volumes
        self.t_start = None
        self.metrics: dict = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t_start = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        wall = time.perf_counter() - self.t_start
        info = self.datamodule.info
        pl_module.eval()
        emb = pl_module.embed_all(self.datamodule.all_dataloader())
        metrics: dict = {
            "method": pl_module.method_name,
            "dataset": info.source,
            "n_particles": info.n_particles,
            "box_size": info.box_size,
            "apix": info.apix,
            "train/wall_time_s": wall,
            "train/images_per_s": info.n_particles * trainer.current_epoch / wall if wall > 0 else 0.0,
        }
        vol_dir = self.out_dir / "volumes"
        if info.labels is not None and info.gt_volumes is not None:
            labels = torch.as_tensor(info.labels)[emb["index"]]
            reps = representatives(labels, emb["latent"], emb["class_probs"])
            curves = []
            mask = self._mask(info.box_size)
            for rep in reps:
                latent = rep["latent"][None] if rep["latent"] is not None else None
                vol = pl_module.decode(latent, torch.tensor([rep["class"]]))[0].detach().cpu()
                gt = info.gt_volumes[rep["state"]]
                summary = fsc_summary(vol, gt, apix=info.apix, mask=mask)
                curves.append({"state": rep["state"], **summary})
                if self.save_volumes:
                    write_mrc(vol_dir / f"state_{rep['state']:03d}.mrc", vol.numpy(), apix=info.apix)
            aucs = np.array([c["auc"] for c in curves])
            metrics.update({
                "val/fsc_auc": float(aucs.mean()),
                "val/fsc_auc_std": float(aucs.std()),
                "val/fsc_auc_median": float(np.median(aucs)),
                "val/fsc_res_0.5": float(np.mean([c["res_0.5"] for c in curves])),
                "val/fsc_res_0.143": float(np.mean([c["res_0.143"] for c in curves])),
                "per_state": curves,
            })
            _fsc_figure(self.out_dir / "figures" / "fsc.png", curves, info.apix)
        elif self.save_volumes:
            n_classes = emb["class_probs"].shape[1] if emb["class_probs"] is not None else 1
            for k in range(n_classes):
                vol = pl_module.decode(None, torch.tensor([k]))[0].detach().cpu()
                write_mrc(vol_dir / f"class_{k:03d}.mrc", vol.numpy(), apix=info.apix)
        self.metrics = metrics
        write_json_atomic(self.out_dir / "metrics.json", metrics)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float) and "/" in k}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)

    def _mask(self, D: int):
        if self.fsc_mask == "none":
            return None
        if self.fsc_mask == "sphere":
            from cryobench_lab.physics.lattice import spherical_mask

            return spherical_mask(D, D // 2).float()
        raise ValueError(f"metrics.fsc_mask must be 'none' or 'sphere', got {self.fsc_mask!r}")
