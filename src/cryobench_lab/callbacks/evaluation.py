"""Score a model with the shared protocols and deliver the results to files and loggers.

:func:`score_model` is the one scorer: the evaluation callback calls it after training (and every
``metrics.eval_every`` epochs), and ``python -m cryobench_lab.eval`` calls it on a finished run. It writes
into the run folder:

- ``metrics.json``: every number under ``split/key`` (keys in metrics/protocols.py, identical for every
  method), plus per-state and per-image details;
- ``volumes/state_XXX.mrc``: the decoded volume representing each ground-truth state, or
  ``volumes/class_XXX.mrc`` per class when the data has no ground truth (voxel size set);
- ``figures/*.png``: FSC curves, latent embedding, confusion matrix, class sizes, volume montage; for a
  method with a base atomic model (``base_structure``) and data with per-state structures, each state's
  FSC-AUC against the base's Cα RMSD to that state (``fsc_vs_base_rmsd.png``);
- ``per_state.csv``: ``state, base_rmsd, fsc_auc`` (RMSD in Å after superposition, nan without a base).

The scalar keys depend only on the dataset (which ground truth it carries) and the options, never on the
method: a metric a method cannot produce (classification without classes, atom metrics without
``structure``) is written as NaN. Atom metrics (when the data carry ``gt_structures``): the model's
``structure(latent)`` of every labelled image against its state's true structure (metrics/atoms.py).

Scalars reach the Lightning loggers (W&B, CSV) through ``log_metrics`` and figures through W&B's
``log_image``; model code never touches a logger.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from cryobench_lab import plots
from cryobench_lab.callbacks.exports import write_run_exports
from cryobench_lab.callbacks.references import reference_scores
from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import atomic_path, write_json_atomic
from cryobench_lab.io.mrc import write_mrc
from cryobench_lab.io.structures import read_structure
from cryobench_lab.metrics.alignment import aligned_decoder, pose_scores
from cryobench_lab.metrics.atoms import atom_metric_keys, per_image_atom_metrics, residue_groups, superposed_rmsd
from cryobench_lab.metrics.classes import classification_metrics
from cryobench_lab.metrics.latent import assigned_latent, pca_embedding
from cryobench_lab.metrics.masks import soft_sphere_mask, support_mask, volume_mask
from cryobench_lab.metrics.protocols import GTMASK, MASKED, per_conformation_fsc, per_image_fsc

MONTAGE_MAX = 6  # volumes shown in the montage (evenly spaced states)
CLASH_IMAGES = 500  # predicted structures whose clashes are counted (evenly spaced images; O(n_res²) each)
CLASS_KEYS = ("ari", "nmi", "n_empty_classes")
SUPPORT_STATES = 200  # ground-truth-support mask: union over at most this many evenly spaced states (Spike-MD has 100,000)


@dataclass
class ScoreOptions:
    fsc_mask: str = "none"  # none | sphere | gt (threshold + dilate + soft edge of each ground-truth volume) | dataset
    per_image_n: int = 100  # images for the per-image FSC; 0 skips it
    save_volumes: bool = True
    figures: bool = True
    per_conformation: bool = True  # false: per-image FSC only (one image per state, e.g. Spike-MD)
    references: bool = True  # also score the consensus floor and the oracle (callbacks/references.py)


def _masks(option: str, gt: torch.Tensor, dataset_mask: torch.Tensor | None = None):
    if option == "none":
        return None
    if option == "dataset":  # the mask the dataset ships (CryoBench: init_mask/mask.mrc)
        if dataset_mask is None:
            raise ValueError("metrics.fsc_mask=dataset: this dataset has no mask of its own; use none, sphere or gt")
        return dataset_mask
    if option == "sphere":
        return soft_sphere_mask(gt.shape[-1])
    if option == "gt":
        return torch.stack([volume_mask(v) for v in gt])
    raise ValueError(f"metrics.fsc_mask must be none, sphere, gt or dataset, got {option!r}")


@torch.no_grad()
def score_model(model, datamodule, out_dir: Path, options: ScoreOptions, split: str = "val") -> tuple[dict, dict]:
    """Evaluate ``model`` on every particle of ``datamodule``; returns (metrics, figure paths).

    Metrics are keyed ``f"{split}/{key}"``; non-scalar details (``per_state``, ``confusion`` ...) too.
    """
    info = datamodule.info
    out_dir = Path(out_dir)
    was_training = model.training
    model.eval()
    emb = model.embed_all(datamodule.all_dataloader())
    order = torch.argsort(emb["index"])
    latent = emb["latent"][order] if emb["latent"] is not None else None
    probs = emb["class_probs"][order] if emb["class_probs"] is not None else None
    device = model.device

    def decode(z, classes):
        z = z.to(device) if z is not None else None
        return model.decode(z, classes.to(device)).float().cpu()

    result: dict = {}
    figures: dict = {}
    fig_dir = out_dir / "figures"
    vol_dir = out_dir / "volumes"
    labels = torch.as_tensor(info.labels) if info.labels is not None else None
    pose_source = getattr(model, "poses", None)
    if hasattr(pose_source, "estimates") and info.has_poses:
        # estimated poses (poses=search): their errors, and volumes aligned to the truth (frame, handedness)
        assigned = probs.argmax(1) if probs is not None else None
        rot, trans = pose_source.estimates()
        result.update(pose_scores(rot.cpu(), trans.cpu(), datamodule.dataset.rot, datamodule.dataset.trans, assigned))
        if labels is not None and info.gt_volumes is not None:
            decode, result["volume_alignment"] = aligned_decoder(decode, assigned, latent, labels, info.gt_volumes)
    if labels is not None and info.gt_volumes is not None:
        mask = _masks(options.fsc_mask, info.gt_volumes, info.mask)
        # A dataset with its own mask is also scored under it (CryoBench's masked FSC): keys *_masked; every
        # dataset with ground truth under the union of the ground-truth supports: keys *_gtmask.
        states = np.unique(np.linspace(0, len(info.gt_volumes) - 1, min(len(info.gt_volumes), SUPPORT_STATES)).round().astype(int))
        variants = {GTMASK: support_mask([info.gt_volumes[s] for s in states])}
        if info.mask is not None and options.fsc_mask != "dataset":
            variants[MASKED] = info.mask
        state_volumes: dict[int, torch.Tensor] = {}

        def keep(state: int, vol: torch.Tensor) -> None:
            state_volumes[state] = vol
            if options.save_volumes:
                write_mrc(vol_dir / f"state_{state:03d}.mrc", vol.numpy(), apix=info.apix)

        conf = {"per_state": []}
        if options.per_conformation:
            conf = per_conformation_fsc(decode, labels, latent, probs, info.gt_volumes, info.apix, mask=mask, on_volume=keep, variants=variants)
        result.update(conf)
        if options.references and options.per_conformation:  # one image per state (Spike-MD): no per-state reference
            result.update(reference_scores(datamodule, {"": mask, **{f"_{k}": m for k, m in variants.items()}}))
        if options.per_image_n > 0:
            result.update(per_image_fsc(decode, labels, latent, probs, info.gt_volumes, info.apix, n=options.per_image_n, mask=mask, variants=variants))
        if options.figures and conf["per_state"]:
            figures["fsc"] = plots.plot_fsc_curves(fig_dir / "fsc.png", conf["per_state"], info.apix)
            shown = sorted(state_volumes)[:: max(1, len(state_volumes) // MONTAGE_MAX)][:MONTAGE_MAX]
            figures["volumes"] = plots.plot_volume_montage(
                fig_dir / "volumes.png", torch.stack([state_volumes[s] for s in shown]),
                [f"state {s}" for s in shown], apix=info.apix,
            )
    elif options.save_volumes:
        n_classes = probs.shape[1] if probs is not None else 1
        for k in range(n_classes):
            vol = decode(None, torch.tensor([k]))[0]
            write_mrc(vol_dir / f"class_{k:03d}.mrc", vol.numpy(), apix=info.apix)
    if labels is not None:
        result.update({k: float("nan") for k in CLASS_KEYS})  # overwritten below by a method with classes
    if probs is not None:
        n_classes = probs.shape[1]
        assigned = probs.argmax(1)
        if labels is not None:
            cls = classification_metrics(assigned, labels, n_classes=n_classes)
            result.update(cls)
            if options.figures:
                figures["confusion"] = plots.plot_confusion(fig_dir / "confusion.png", cls["confusion"])
        else:
            sizes = torch.bincount(assigned, minlength=n_classes)
            result.update(class_sizes=sizes.tolist(), n_empty_classes=int((sizes == 0).sum()))
        if options.figures:
            figures["class_sizes"] = plots.plot_class_sizes(fig_dir / "class_sizes.png", result["class_sizes"], result.get("confusion"))
    if labels is not None and info.gt_structures:
        result.update(atom_scores(model, latent, probs, info))
    if result.get("per_state"):
        rmsd = base_rmsds(model, info)
        for row in result["per_state"] if rmsd is not None else ():  # only methods with a base model
            row["base_rmsd"] = float(rmsd[row["state"]])
        write_per_state_csv(out_dir / "per_state.csv", result["per_state"])
        if rmsd is not None and options.figures:
            figures["fsc_vs_base_rmsd"] = plots.plot_auc_vs_rmsd(
                fig_dir / "fsc_vs_base_rmsd.png", result["per_state"], title=f"{getattr(model, 'method_name', 'model')}: per-state FSC-AUC")
    if latent is not None and options.figures:
        z = assigned_latent(latent, probs)
        if z.shape[1] >= 2:
            embedding, explained = pca_embedding(z, 2)
            axis_labels = [f"PC{i + 1} ({100 * float(e):.0f}% var.)" for i, e in enumerate(explained)]
        else:
            embedding, axis_labels = z, ["latent z"]
        figures["latent"] = plots.plot_latent(fig_dir / "latent_pca.png", embedding, labels, axis_labels=axis_labels,
                                              classes=probs.argmax(1) if probs is not None else None)
    if options.save_volumes:  # files other tools read (callbacks/exports.py), before metrics.json
        write_run_exports(out_dir, model, info, result, latent, probs, labels, decode)
    if was_training:
        model.train()
    return {f"{split}/{k}": v for k, v in result.items()}, figures


def load_gt_structures(info) -> list:
    """The per-state atomic models of ``info.gt_structures`` (``state_XXX.*``, label order) → Structures."""
    files = sorted(p for p in Path(info.gt_structures).glob("state_*.*") if not p.name.endswith(".tmp"))
    if len(files) < info.n_states:
        raise InputError(
            f"data.gt_structures: {info.gt_structures} holds {len(files)} state_XXX structures for "
            f"{info.n_states} labelled states; give one per state or unset it"
        )
    return [read_structure(f) for f in files[: info.n_states]]


@torch.no_grad()
def atom_scores(model, latent, probs, info) -> dict:
    """Atom metrics of ``model.structure`` on every labelled image (keys: metrics/atoms.py
    :func:`per_image_atom_metrics` plus ``segmentation_ari``); NaN where the model has no atoms.

    latent (N, d) / (N, K, d) in particle order; the truth of image i is the structure of its state.
    ``segmentation_ari``: ARI between the model's ``segment_labels()`` and the residue groups (domains).
    """
    truth = load_gt_structures(info)
    ref = truth[0]
    names, groups, pairs = residue_groups(ref.residue_numbers, ref.residue_chain_ids, info.domains)
    sizes = sorted({len(t.residue_numbers) for t in truth})
    if len(sizes) > 1:
        # Compositional states or distinct complexes: no one residue set for a deformed model to follow.
        print(f"[cryobench_lab] atom metrics not defined: the ground-truth states in {info.gt_structures} have "
              f"{sizes[0]}–{sizes[-1]} residues, not one residue set", file=sys.stderr)
        return {k: float("nan") for k in [*atom_metric_keys(names, pairs), "segmentation_ari"]}
    labels = torch.as_tensor(info.labels).long()
    known = torch.nonzero(labels >= 0).squeeze(1)
    true = torch.from_numpy(np.stack([t.residue_coords for t in truth]))[labels[known]]  # (N', n, 3)
    z = assigned_latent(latent, probs) if latent is not None else None
    pred = model.structure(z[known]) if z is not None else model.structure(None)
    clash_rows = np.unique(np.linspace(0, len(known) - 1, min(CLASH_IMAGES, len(known))).round().astype(int))
    if pred is not None and pred.shape[-2] != true.shape[1]:
        print(f"[cryobench_lab] atom metrics skipped: the model has {pred.shape[-2]} residues, the ground-truth "
              f"structures {true.shape[1]}; give the model a base structure with the same residues", file=sys.stderr)
        pred = None
    if pred is None:  # no atoms: the same keys, NaN
        out = per_image_atom_metrics(true, true, names, groups, pairs, ref.residue_chain_ids, clash_rows)
        out = {k: (v if k == "clashes_true_median" else float("nan")) for k, v in out.items()}
    else:
        pred = pred.float().cpu().expand(len(known), -1, -1)  # a latent-free model: one structure for all
        out = per_image_atom_metrics(pred, true, names, groups, pairs, ref.residue_chain_ids, clash_rows)
    segments = model.segment_labels() if hasattr(model, "segment_labels") else None
    out["segmentation_ari"] = float("nan")
    if segments is not None and groups:
        domain = np.zeros(len(ref.residue_numbers), np.int64)
        for k, g in enumerate(groups):
            domain[g] = k
        out["segmentation_ari"] = float(classification_metrics(torch.as_tensor(segments), torch.as_tensor(domain))["ari"])
    return out


def base_rmsds(model, info) -> np.ndarray | None:
    """Superposed Cα RMSD (Å) of the model's base structure to every state's true structure, (S,); None when
    the model has no base, the data no per-state structures, or the residues differ."""
    base = model.base_structure() if hasattr(model, "base_structure") else None
    if base is None or not info.gt_structures:
        return None
    truth = load_gt_structures(info)
    if any(len(t.residue_coords) != base.shape[0] for t in truth):
        return None
    return superposed_rmsd(base, np.stack([t.residue_coords for t in truth])).numpy()


def write_per_state_csv(path: Path, per_state: list) -> None:
    """``state,base_rmsd,fsc_auc`` per ground-truth state (base_rmsd in Å, ``nan`` without a base model)."""
    lines = ["state,base_rmsd,fsc_auc"] + [f"{r['state']},{r.get('base_rmsd', float('nan')):.4f},{r['auc']:.6f}" for r in per_state]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def scalar_metrics(metrics: dict) -> dict:
    """The float/int entries of a metrics dict (what loggers receive)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class EvaluationCallback(L.Callback):
    """Runs :func:`score_model` after ``fit`` (and every ``eval_every`` epochs) and delivers the results."""

    def __init__(self, datamodule, out_dir: str, options: ScoreOptions, eval_every: int = 0, header: dict | None = None):
        self.datamodule = datamodule
        self.out_dir = Path(out_dir)
        self.options = options
        self.eval_every = eval_every
        self.header = header or {}
        self.t_start = 0.0
        self.first_epoch: int | None = None  # the epoch this session's training started at (> 0 when resumed)
        self.metrics: dict = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t_start = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_epoch = trainer.current_epoch  # after a resume restored the loops (not yet at on_fit_start)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:  # DDP: intermediate scores on rank 0 only, like the final ones
            return
        epoch = trainer.current_epoch + 1
        if self.eval_every and epoch % self.eval_every == 0 and epoch < trainer.max_epochs:
            options = ScoreOptions(self.options.fsc_mask, per_image_n=0, save_volumes=False, figures=False,
                                   per_conformation=self.options.per_conformation, references=False)
            metrics, _ = score_model(pl_module, self.datamodule, self.out_dir, options)
            for logger in trainer.loggers:
                logger.log_metrics(scalar_metrics(metrics), step=trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:  # DDP: rank 0 holds the whole (synchronised) model and scores alone
            return
        wall = time.perf_counter() - self.t_start
        info = self.datamodule.info
        metrics, figures = score_model(pl_module, self.datamodule, self.out_dir, self.options)
        epochs = max(trainer.current_epoch, 1)
        # images/s of this session: a resumed run trained only the epochs since its checkpoint, and a rerun
        # of a finished run trained none (NaN rather than a number from zero work)
        trained = max(trainer.current_epoch - self.first_epoch, 1) if self.first_epoch is not None else 0
        self.metrics = {
            **self.header,
            "method": pl_module.method_name,
            "n_particles_total": info.n_particles,  # all states (data.n_particles is per state)
            "box_size": info.box_size,
            "apix": info.apix,
            "train/wall_time_s": wall,
            "train/images_per_s": info.n_particles * trained / wall if wall > 0 and trained > 0 else float("nan"),
            "train/epochs": epochs,
            **metrics,
        }
        write_json_atomic(self.out_dir / "metrics.json", self.metrics)
        for logger in trainer.loggers:
            logger.log_metrics(scalar_metrics(self.metrics), step=trainer.global_step)
            if hasattr(logger, "log_image") and figures:
                logger.log_image(key="figures", images=[str(p) for p in figures.values()], caption=list(figures))
