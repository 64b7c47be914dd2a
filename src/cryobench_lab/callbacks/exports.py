"""A run's files for the field's own tools, written by the scorer before ``metrics.json`` (writers in
io/exports.py):

- ``fsc/state_XXX.txt``: each ground-truth state's FSC curve (columns: resolution 1/Å, FSC), as CryoBench
  and cryoDRGN's ``plot_fsc`` read them;
- ``z.pkl``: the latent of every image (cryoDRGN format, float32 (N, zdim); methods with a latent);
- ``classes/class_XXX.mrc``: each of the model's own classes at the mean latent of its images, and
  ``run_model.star`` (RELION): those maps, ``rlnClassDistribution`` (share of the images) and
  ``rlnEstimatedResolution``: FSC = 0.143 (CryoBench first-below, unmasked) of the class map against the
  ground-truth state most of its images come from; 999 where no ground truth says (RELION's "unknown");
- ``chimerax.cxc``: opens each state's map with its ground-truth model, the classes, and the traversals as
  series (``open <run>/chimerax.cxc`` in ChimeraX).

:class:`LatentSnapshots` writes ``z.<epoch>.pkl`` during training (``metrics.latents_every``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from cryobench_lab.io.exports import (
    UNKNOWN_RESOLUTION,
    save_latents,
    write_chimerax_script,
    write_fsc_curves,
    write_model_star,
)
from cryobench_lab.io.mrc import write_mrc
from cryobench_lab.metrics.fsc import fsc_summary
from cryobench_lab.metrics.latent import assigned_latent


def _class_maps(out_dir: Path, decode, z, probs, labels, info) -> tuple[list[str], list[float], list[float]]:
    """Write ``classes/class_XXX.mrc``; returns (relative paths, shares of the images, resolutions Å)."""
    n = len(z) if z is not None else (len(probs) if probs is not None else info.n_particles)
    assigned = probs.argmax(1) if probs is not None else torch.zeros(n, dtype=torch.long)
    n_classes = probs.shape[1] if probs is not None else 1
    refs, shares, resolutions = [], [], []
    for k in range(n_classes):
        members = torch.nonzero(assigned == k).squeeze(1)
        centre = None
        if z is not None:  # an empty class is shown at the mean latent of all images
            centre = (z[members] if len(members) else z).mean(0, keepdim=True)
        vol = decode(centre, torch.tensor([k]))[0]
        ref = f"classes/class_{k:03d}.mrc"
        write_mrc(out_dir / ref, vol.numpy(), apix=info.apix)
        res = UNKNOWN_RESOLUTION
        if labels is not None and info.gt_volumes is not None and len(members):
            known = labels[members][labels[members] >= 0]
            if len(known):
                state = int(torch.bincount(known).argmax())
                res = fsc_summary(vol, info.gt_volumes[state], info.apix)["res_0.143"]
        refs.append(ref)
        shares.append(len(members) / n)
        resolutions.append(res)
    return refs, shares, resolutions


def _gt_structure(info, state: int) -> str | None:
    if not info.gt_structures:
        return None
    files = sorted(p for p in Path(info.gt_structures).glob(f"state_{state:03d}.*") if not p.name.endswith(".tmp"))
    return str(files[0].resolve()) if files else None


def _series(model, z, probs, out_dir: Path) -> list[dict]:
    """Traversals the method writes after fitting (models' ``write_outputs``), by their known names; none
    when scoring elsewhere than the run folder (``eval`` into ``<run>/eval``)."""
    out = []
    try:
        root = Path(model.trainer.default_root_dir).resolve()
    except RuntimeError:  # not attached to a trainer: re-scored from a checkpoint
        return out
    if root != Path(out_dir).resolve():
        return out
    steps = int(getattr(model, "hparams", {}).get("traversal_steps", 0) or 0)
    if getattr(model, "outputs_dir", None) == "structures":
        out.append({"name": "atomic model along the first principal axis", "model": "structures/traversal.pdb"})
    elif getattr(model, "outputs_dir", None) == "classes" and z is not None and steps >= 2 and probs is not None:
        sizes = torch.bincount(probs.argmax(1), minlength=probs.shape[1])
        for k in torch.nonzero(sizes >= 2).squeeze(1).tolist():
            out.append({"name": f"class {k} along its first principal axis",
                        "maps": [f"classes/class_{k:03d}_traversal_{j:02d}.mrc" for j in range(steps)]})
    return out


@torch.no_grad()
def write_run_exports(out_dir: Path, model, info, result: dict, latent, probs, labels, decode) -> list[Path]:
    """Write every file listed in the module docstring into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    per_state = result.get("per_state") or []
    written = write_fsc_curves(out_dir / "fsc", per_state, info.apix)
    z = assigned_latent(latent, probs) if latent is not None else None
    if z is not None:
        written.append(save_latents(out_dir / "z.pkl", z))
    refs, shares, resolutions = _class_maps(out_dir, decode, z, probs, labels, info)
    written += [out_dir / r for r in refs]
    written.append(write_model_star(out_dir / "run_model.star", refs, shares, resolutions, info.apix, info.box_size))
    groups = []
    for s in sorted(int(p["state"]) for p in per_state):
        model_file = _gt_structure(info, s)
        groups.append({"name": f"ground-truth state {s}: decoded map and true model",
                       "maps": [f"volumes/state_{s:03d}.mrc"], "models": [model_file] if model_file else []})
    groups.append({"name": "the model's classes", "maps": refs, "models": []})
    written.append(write_chimerax_script(out_dir / "chimerax.cxc", groups, _series(model, z, probs, out_dir)))
    return written


class LatentSnapshots(L.Callback):
    """``z.<epoch>.pkl`` (0-based epoch, cryoDRGN's naming) every ``every`` epochs for a method with latents;
    an extra inference pass over the particles each time, hence off by default (``metrics.latents_every``)."""

    def __init__(self, datamodule, out_dir: str, every: int):
        self.datamodule, self.out_dir, self.every = datamodule, Path(out_dir), every

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.every or not trainer.is_global_zero or (trainer.current_epoch + 1) % self.every:
            return
        was_training = pl_module.training
        pl_module.eval()
        emb = pl_module.embed_all(self.datamodule.all_dataloader())
        if was_training:
            pl_module.train()
        if emb["latent"] is None:
            return
        order = torch.argsort(emb["index"])
        probs = emb["class_probs"][order] if emb["class_probs"] is not None else None
        z = assigned_latent(emb["latent"][order], probs)
        save_latents(self.out_dir / f"z.{trainer.current_epoch}.pkl", np.asarray(z))
