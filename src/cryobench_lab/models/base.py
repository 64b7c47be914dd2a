"""The shared base of every method and the evaluation contract.

Evaluation never special-cases a method: it calls

- :meth:`ReconstructionModule.embed` on batches → per-image ``latent`` (B, d) and/or ``class_probs`` (B, K);
- :meth:`ReconstructionModule.decode` on (latent, class) pairs → volumes (M, D, D, D) at the data's box and
  pixel size, density positive.

A method without a latent returns ``latent=None``; a method without classes returns ``class_probs=None``
(one class).

Atom hooks (optional; the defaults return None = "no atoms"):

- :meth:`ReconstructionModule.structure` on latents → per-residue (Cα/C1′) coordinates (M, n_res, 3) Å in
  the box frame, residues in the order of the data's structures. When the dataset carries per-state atomic
  models (``DatasetInfo.gt_structures``), the scorer (callbacks/evaluation.py ``atom_scores``) calls it on
  every labelled image's latent and computes the distance correlation of the residue groups
  (``DatasetInfo.domains``, else chains) and the Cα clashes against each image's true state;
- :meth:`ReconstructionModule.segment_labels` → the segment of each residue (n_res,), scored by ARI
  against those residue groups;
- :meth:`ReconstructionModule.base_structure` → the residue coordinates (n_res, 3) of the base model a
  deformation method starts from; the scorer reports its superposed Cα RMSD to each state beside that
  state's FSC-AUC (how far each state is from where the method starts).

A method never computes metrics itself; a metric it cannot produce is written as NaN under the same key.

Resume contract (run.py, callbacks/reliability.py): a run killed at any point continues from its last
end-of-epoch checkpoint and ends with the uninterrupted run's result when everything a method learns or
counts lives in parameters or persistent buffers (per-image tables included), schedules depend on
``current_epoch`` rather than on Python counters, and randomness comes from torch's global generator (its
state is saved). Weights are restored before ``on_fit_start``/``on_train_start``, so a data-dependent
initialisation there must be skipped when a persistent flag says it was done.

The same contract for every method (tests/test_contract.py runs it over every ``conf/model/*.yaml``):

- optimisers come from ``configure_optimizers`` (manual optimisation steps them through ``self.optimizers()``
  and ``manual_backward``), so their states are in ``last.ckpt`` and the divergence guard sees every step;
  ``training_step`` returns its loss (or None for a method without one);
- state that lives beyond one epoch is a persistent buffer, a parameter, or saved by
  ``on_save_checkpoint``/``on_load_checkpoint``;
- DDP: sums accumulated over an epoch are named in ``rank_summed_buffers``, per-image rows a method overwrites
  in ``rank_merged_rows`` (callbacks/distributed.py), so every rank's epoch-end step sees the whole data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch

from cryobench_lab.data.particles import DatasetInfo
from cryobench_lab.physics.ctf import ctf_from_params
from cryobench_lab.physics.lattice import freq_grid_2d


class ReconstructionModule(L.LightningModule):
    """Base LightningModule: data facts, CTF rendering and the evaluation contract."""

    #: epochs used when ``trainer.max_epochs`` is not set
    default_epochs: int = 1
    #: run sub-folder for the method's own outputs, written by ``write_outputs(out_dir, datamodule)`` when
    #: fitting ends; None: the method writes none (or writes them itself)
    outputs_dir: Optional[str] = None

    def __init__(self, info: DatasetInfo, name: str):
        super().__init__()
        self.info = info
        self.method_name = name
        self.D = info.box_size
        self.apix = info.apix

    def ctf(self, batch: dict, box: Optional[int] = None) -> Optional[torch.Tensor]:
        """CTF of each image on the centred frequency grid of a ``box``-px image at the data's pixel size.

        ``box`` larger than D samples the same CTF more finely (for padded images). Returns (B, box, box), or
        None when the data carries no CTF.
        """
        if "ctf" not in batch:
            return None
        box = box or self.D
        freqs = freq_grid_2d(box, self.apix, device=batch["ctf"].device)  # (box, box, 2) 1/Å
        return ctf_from_params(freqs[None], batch["ctf"])

    def train_on_every_particle(self) -> None:
        """Make the DataModule train on every particle (call from ``setup``).

        Methods that keep per-image state (auto-decoded latents, EM posteriors) learn an image's entry only
        from that image, so a held-out split would leave those entries at their initial values.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "train_indices"):
            datamodule.train_indices = np.arange(self.info.n_particles)

    def on_fit_end(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.outputs_dir and datamodule is not None and hasattr(datamodule, "all_dataloader"):
            self.write_outputs(Path(self.trainer.default_root_dir) / self.outputs_dir, datamodule)

    # ---- evaluation contract -------------------------------------------------------------------------
    def embed(self, batch: dict) -> dict:
        """Per-image latents and class probabilities: ``{"latent": (B, d) | None, "class_probs": (B, K) | None}``."""
        raise NotImplementedError

    def decode(self, latent: Optional[torch.Tensor], classes: Optional[torch.Tensor]) -> torch.Tensor:
        """Volumes (M, D, D, D) for M latents (M, d) and/or class indices (M,)."""
        raise NotImplementedError

    def structure(self, latent: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Residue coordinates (M, n_res, 3) Å (box frame) for latents (M, d); None: the method has no atoms."""
        return None

    def base_structure(self) -> Optional[torch.Tensor]:
        """Residue coordinates (n_res, 3) Å (box frame) of the atomic model the method starts from, as placed
        for training; None: the method has no base model. Scored: its RMSD to each state (``per_state.csv``)."""
        return None

    def segment_labels(self) -> Optional[np.ndarray]:
        """Segment index of each residue (n_res,) int64; None: the method has no segmentation."""
        return None

    @torch.no_grad()
    def embed_all(self, loader) -> dict:
        """Run :meth:`embed` over a loader; returns concatenated ``latent``, ``class_probs`` and ``index``."""
        latents, probs, index = [], [], []
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out = self.embed(batch)
            if out.get("latent") is not None:
                latents.append(out["latent"].cpu())
            if out.get("class_probs") is not None:
                probs.append(out["class_probs"].cpu())
            # A tensor from a DataLoader worker lives in shared memory that holds a file descriptor until the
            # tensor is freed: keeping it would hold one descriptor per batch (the 100,000-image soak in
            # bench/lazy_memory.py reached 471), so keep a private copy.
            index.append(batch["index"].cpu().clone())
        return {
            "latent": torch.cat(latents) if latents else None,
            "class_probs": torch.cat(probs) if probs else None,
            "index": torch.cat(index),
        }
