"""Segment VAE (cryoSPHERE, Ducrocq et al., ICLR 2025) and its two ablations, on one module.

A base atomic model becomes one Gaussian per residue (components/atoms.py: Cα or C1′, σ = 2 Å, amplitude
= the residue's electron count). An MLP encoder maps each re-centred image to a Gaussian posterior over
z (d = 8); an MLP decoder maps z to rigid transforms, and the moved Gaussians are projected with the
image's pose (pixel-integrated like ``physics.gaussians.project_gaussians``, via its one-σ fast form
``components.atoms.project_residues``; shifted by −t), multiplied by its
CTF in Fourier space and compared with the image.

``mode`` chooses what the decoder moves:

- ``learned`` (cryoSPHERE): K segments from a Gaussian mixture over the residue index with variational
  posteriors (components/segmentation.py); per segment a rotation (quaternion vector part, real part 1)
  about the base structure's centre and a translation (Å); residue i moves by ``Σ_k w_ik (R_k x_i + t_k)``.
- ``fixed``: the same with contiguous equal residue blocks, not learned and without segmentation KL.
- ``per_residue``: no segments; per residue a rotation about its local Cα–neighbour frame and a translation
  (components/atoms.py :func:`move_per_residue`). This is cryoSTAR's per-residue deformation without its
  elastic-network restraint; ``continuity_weight`` / ``clash_weight`` are the restraints available here.

Loss per batch: ``−corr(pred, image)`` (Pearson over the pixels of each image, averaged) +
``β_z(t)·KL(z)/D²`` + ``β_seg(t)·KL(seg)/D²`` + ``λ_cont·continuity`` + ``λ_clash·clash``.
KL terms are divided by the pixel count so that the correlation acts as a per-pixel likelihood (for unit-
norm images ``1 − corr = ‖a − b‖²/2``); the schedules ramp both β linearly from 0 to their value over
the first ``kl_warmup`` of training. Continuity: mean squared change of consecutive (same-chain) Cα
distances from the base's. Clash: mean over non-neighbour residue pairs of ``relu(c² − d²)²/c⁴`` with
``c = clash_threshold`` — exactly 0 (finite, zero gradient) without clashes, and smooth at d = 0.

Scale: images are normalised to unit std by the data module, and the Gaussians carry electrons. The
correlation loss is invariant to a global scale, so no scale enters training; the least-squares scale
``⟨pred, image⟩ / ⟨pred, pred⟩`` is tracked (running mean, buffer ``image_scale``) and logged, so that
``image_scale · render(...)`` is on the data's scale.

Volumes (``decode``, the evaluation contract). The residue Gaussians are the training representation; the
method's product is the deformed atomic model. With ``volume=atoms`` (default) every heavy atom of the base
moves with its residue, by the same blended segment transform ``Σ_k w_ik (R_k x + t_k)`` (or the residue's
own local-frame transform), and the volume is that model's density at the map's band limit, in e/Å³ (one
Gaussian per atom holding its electrons, σ = ``physics.gaussians.band_limited_sigma(apix)``; FSC barely
depends on σ, since a Gaussian blur scales each shell almost uniformly). ``volume=residues`` voxelises
the residue Gaussians themselves; they lack the side chains and backbone atoms around Cα, which caps their
FSC against atom-built maps (BENCHMARKS.md, issue 5).

Placement (``fit_base``): before training, the base is docked rigidly into the consensus map of the images
(components/consensus.py: one backprojection with the given poses, labels unused) by
``metrics.alignment.fit_atoms``; the fit (``fit_rotation``, ``offset``) is kept in the checkpoint. Without
it, the file's coordinates are taken as Å from the box centre.

Optimisation: Adam, ``lr`` for the encoder/decoder and ``seg_lr`` for the segmentation. The paper's
values (3e-5 / 3e-4, batch 128) are kept in ``conf/model/segvae_paper.yaml``; the CPU default
(``segvae.yaml``) uses a 10× larger network lr (the measurement is in that file's comment).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cryobench_lab.data.particles import DatasetInfo
from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import atomic_path
from cryobench_lab.io.structures import write_models
from cryobench_lab.metrics.alignment import fit_atoms
from cryobench_lab.models.base import ReconstructionModule
from cryobench_lab.models.components.atoms import (
    clash_penalty,
    local_frames,
    move_by_segments,
    move_per_residue,
    project_residues,
    quaternion_vector_to_matrix,
    residue_gaussians,
)
from cryobench_lab.models.components.consensus import consensus_map
from cryobench_lab.models.components.encoders import MLPEncoder
from cryobench_lab.models.components.segmentation import FixedSegmentation, GMMSegmentation
from cryobench_lab.physics.ctf import ctf_from_params
from cryobench_lab.physics.gaussians import atom_amplitudes, band_limited_sigma, voxelize_gaussians
from cryobench_lab.physics.shift import shift_images

MODES = ("learned", "fixed", "per_residue")
VOLUMES = ("atoms", "residues")


def _mlp(d_in: int, hidden: int, n_layers: int, d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.ReLU()]
    for _ in range(n_layers - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    out = nn.Linear(hidden, d_out)
    # zero output layer: training starts from the undeformed base structure (identity transforms)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


def image_correlation(pred: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over the pixels of each image pair, (B, D, D) × 2 → (B,)."""
    p = pred.flatten(1) - pred.flatten(1).mean(1, keepdim=True)
    o = obs.flatten(1) - obs.flatten(1).mean(1, keepdim=True)
    return (p * o).sum(1) / (p.norm(dim=1) * o.norm(dim=1)).clamp(min=1e-12)


class SegmentVAE(ReconstructionModule):
    """cryoSPHERE segment VAE (``mode=learned``) and its ablations; see the module docstring."""

    outputs_dir = "structures"

    def __init__(
        self,
        info: DatasetInfo,
        name: str = "segvae",
        mode: str = "learned",
        structure: str | None = None,
        center: bool = False,
        n_segments: int = 20,
        latent_dim: int = 8,
        sigma: float = 2.0,
        tau: float = 0.05,
        encoder_hidden: int = 256,
        encoder_layers: int = 3,
        decoder_hidden: int = 256,
        decoder_layers: int = 3,
        lr: float = 3e-4,
        seg_lr: float = 3e-4,
        kl_weight: float = 1.0,
        kl_seg_weight: float = 1.0,
        kl_warmup: float = 0.2,
        continuity_weight: float = 0.0,
        clash_weight: float = 0.0,
        clash_threshold: float = 4.0,
        epochs: int = 30,
        traversal_steps: int = 10,
        volume: str = "atoms",
        fit_base: bool = False,
    ):
        super().__init__(info, name)
        if mode not in MODES:
            raise ValueError(f"model.mode must be one of {', '.join(MODES)}, got {mode!r}")
        if volume not in VOLUMES:
            raise ValueError(f"model.volume must be one of {', '.join(VOLUMES)}, got {volume!r}")
        if not info.has_poses:
            raise ValueError("the segment VAE uses known poses: pass data.poses= or a star/cs file with angles")
        path = structure or info.structure
        if not path:
            raise InputError("model.structure: no base atomic model; pass model.structure=<PDB/mmCIF> (presets set it)")
        self.save_hyperparameters(ignore=["info"])
        self.default_epochs = epochs
        self.mode = mode
        self.base = residue_gaussians(path, center=center)
        n = self.base.n_residues
        self.register_buffer("coords0", torch.from_numpy(self.base.coords))  # (n, 3) Å about the centre
        self.register_buffer("offset", torch.from_numpy(self.base.offset))  # (3,) Å box frame
        self.register_buffer("amplitudes", torch.from_numpy(self.base.amplitudes))  # (n,)
        self.register_buffer("sigmas", torch.full((n,), float(sigma)))
        self.register_buffer("image_scale", torch.tensor(0.0))
        # rigid fit of the base into the consensus map (fit_base): rotation applied to the file's coordinates
        self.register_buffer("fit_rotation", torch.eye(3))
        self.register_buffer("base_fitted", torch.tensor(False))
        # the heavy atoms, moved with their residues for volumes and structures (not used in training)
        self.register_buffer("atom_coords0", torch.from_numpy(self.base.atom_coords), persistent=False)  # (n_atoms, 3) Å
        self.register_buffer("atom_residue", torch.from_numpy(self.base.atom_residue), persistent=False)  # (n_atoms,)
        self.register_buffer("atom_numbers", torch.from_numpy(self.base.atom_numbers), persistent=False)  # (n_atoms,)
        self._register_load_state_dict_pre_hook(self._restore_fit)
        # rfft2 frequencies in 1/Å (rows ky in FFT order, then one extra row at ky = +D/2; columns kx ≥ 0)
        # (integer indices / (D·apix), the same float operations as physics.lattice.freq_grid_2d)
        ky = torch.cat([torch.fft.fftfreq(self.D, d=1 / self.D).round(), torch.tensor([self.D / 2])])  # (D+1,)
        kx = torch.arange(self.D // 2 + 1, dtype=torch.float32)  # (D//2+1,)
        grid = torch.stack(torch.meshgrid(kx, ky, indexing="xy"), -1) / (self.D * self.apix)  # (D+1, D//2+1, 2)
        self.register_buffer("rfft_freqs", grid, persistent=False)
        chain = np.unique(self.base.chain_ids, return_inverse=True)[1].reshape(-1)
        same_chain = torch.from_numpy(chain[1:] == chain[:-1])
        self.register_buffer("bond_pairs", torch.nonzero(same_chain).squeeze(1))  # (n_bonds,) i of pairs (i, i+1)
        d0 = (self.coords0[1:] - self.coords0[:-1]).norm(dim=-1)
        self.register_buffer("bond_lengths", d0[self.bond_pairs])
        idx = torch.arange(n)
        neighbours = ((idx[:, None] - idx[None, :]).abs() <= 1) & torch.from_numpy(chain[:, None] == chain[None, :])
        self.register_buffer("clash_pairs", torch.triu(~neighbours, diagonal=1))  # (n, n) bool
        self.n_clash_pairs = int(self.clash_pairs.sum())
        self.segmentation: nn.Module | None = None
        if mode == "per_residue":
            origins, axes = local_frames(self.coords0, self.base.chain_ids)
            self.register_buffer("frame_origins", origins)
            self.register_buffer("frame_axes", axes)
            n_transforms = n
        else:
            if not 1 <= n_segments <= n:
                raise ValueError(f"model.n_segments must be in [1, {n}] (residues), got {n_segments}")
            self.segmentation = (GMMSegmentation(n, n_segments, tau) if mode == "learned" else FixedSegmentation(n, n_segments))
            n_transforms = n_segments
        self.n_transforms = n_transforms
        self.encoder = MLPEncoder(self.D, 2 * latent_dim, encoder_hidden, encoder_layers)
        self.decoder = _mlp(latent_dim, decoder_hidden, decoder_layers, 6 * n_transforms)

    # ---- base placement ------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.hparams.fit_base and not bool(self.base_fitted):
            dm = self.trainer.datamodule
            fit = self.dock_base(consensus_map(dm.all_dataloader(), self.D, self.apix))
            print(f"[segvae] base docked into the consensus map: correlation {fit['score']:.3f}", flush=True)

    @torch.no_grad()
    def dock_base(self, density: torch.Tensor) -> dict:
        """Move the base rigidly to its best fit in ``density (D, D, D)`` (metrics.alignment.fit_atoms on its
        heavy atoms); the residues, atoms, local frames and centre move together. Returns the fit."""
        fit = fit_atoms((self.atom_coords0 + self.offset).cpu(), self.atom_numbers.cpu(), density.cpu(), self.apix)
        R, t = fit["rotation"].to(self.coords0), fit["translation"].to(self.coords0)
        # new tensors, not in-place: the buffers share memory with the file's arrays (self.base)
        self.coords0 = self.coords0 @ R.T
        self.atom_coords0 = self.atom_coords0 @ R.T
        self.offset = self.offset @ R.T + t  # the centre moves with the base
        self.fit_rotation = R @ self.fit_rotation
        if self.mode == "per_residue":
            self.frame_origins = self.frame_origins @ R.T
            self.frame_axes = R @ self.frame_axes
        self.base_fitted = torch.tensor(True, device=self.coords0.device)
        return fit

    def _restore_fit(self, state: dict, prefix: str, *args) -> None:
        # load_state_dict pre-hook (every loading path): atom coordinates are not saved (they come from the
        # file), so re-apply the saved fit; a state dict from before fit_base has none (identity)
        state.setdefault(prefix + "fit_rotation", torch.eye(3))
        state.setdefault(prefix + "base_fitted", torch.tensor(False))
        R = state[prefix + "fit_rotation"].to(self.atom_coords0)
        self.atom_coords0 = torch.from_numpy(self.base.atom_coords).to(self.atom_coords0) @ R.T

    # ---- model -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        groups = [{"params": list(self.encoder.parameters()) + list(self.decoder.parameters()), "lr": self.hparams.lr}]
        seg = [p for p in (self.segmentation.parameters() if self.segmentation is not None else []) if p.requires_grad]
        if seg:
            groups.append({"params": seg, "lr": self.hparams.seg_lr})
        return torch.optim.Adam(groups)

    def posterior(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder on the re-centred images → posterior mean and log-variance, (B, d) each."""
        centred = shift_images(batch["images"], batch["trans"]) if "trans" in batch else batch["images"]
        out = self.encoder(centred)
        d = self.hparams.latent_dim
        return out[:, :d], out[:, d:].clamp(-10.0, 10.0)

    def transforms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder: z (B, d) → rotations (B, T, 3, 3) and translations (B, T, 3) Å, T segments or residues."""
        out = self.decoder(z).reshape(z.shape[0], self.n_transforms, 6)
        return quaternion_vector_to_matrix(out[..., :3]), out[..., 3:]

    def deform(self, z: torch.Tensor, sample_segmentation: bool = False, atoms: bool = False) -> torch.Tensor:
        """Residue coordinates for latents z (B, d) → (B, n_res, 3) Å about the base's centre; with ``atoms``
        the atoms instead, (B, n_atoms, 3): with segments, each atom moves by its residue's blended segment
        transform; per residue, each atom keeps its offset from its Cα in the residue's local frame, rebuilt on
        the moved Cα trace (a residue's own rotation is not seen by its isotropic Gaussian, so applying it to the
        atoms would scatter side chains at random)."""
        rot, trans = self.transforms(z)
        if self.mode == "per_residue":
            moved = move_per_residue(self.coords0, self.frame_origins, self.frame_axes, rot, trans)  # (B, n, 3)
            if not atoms:
                return moved
            r = self.atom_residue
            local = torch.einsum("aji,aj->ai", self.frame_axes[r], self.atom_coords0 - self.coords0[r])  # (n_atoms, 3)
            out = []
            for coords in moved:
                axes = local_frames(coords, self.base.chain_ids)[1]
                out.append(coords[r] + torch.einsum("aij,aj->ai", axes[r], local))
            return torch.stack(out)
        weights = self.segmentation(sample_segmentation)  # (n, K)
        if atoms:
            return move_by_segments(self.atom_coords0, weights[self.atom_residue], rot, trans)
        return move_by_segments(self.coords0, weights, rot, trans)

    def render(self, coords: torch.Tensor, batch: dict) -> torch.Tensor:
        """Images of residue coordinates (B, n, 3) Å (about the centre) in each image's pose, shift and CTF
        → (B, D, D) in the Gaussians' units (amplitude·Å)."""
        centres = coords + self.offset
        shifts = -batch["trans"] if "trans" in batch else None
        img = project_residues(centres, self.hparams.sigma, self.amplitudes, batch["rot"], self.D, self.apix, shifts)
        if "ctf" not in batch:
            return img
        return self.apply_ctf(img, batch["ctf"])

    def apply_ctf(self, img: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``ifft2_center(fft2_center(img) · CTF).real`` for images (B, D, D) and cryoDRGN CTF params (B, 9).

        The CTF is centrosymmetric, so filtering with it commutes with the centring shifts and keeps real
        images real: half-spectrum transforms with the CTF on the rfft2 grid, half the work of
        ``ifft2_center(fft2_center(img) · CTF).real`` and the same result. On the Nyquist row (ky = ±D/2,
        one row of the DFT) that real part applies the mean of the CTF at ky = −D/2 and +D/2; so does
        this, from the grid's extra last row (+D/2). irfft2 does the same for the Nyquist column itself.
        """
        ctf = ctf_from_params(self.rfft_freqs[None], params)  # (B, D + 1, D//2+1)
        h = self.D // 2
        corner = ctf[:, self.D, h].clone()  # (±D/2, ±D/2) is its own partner: CTF(D/2, D/2)
        ctf[:, h] = 0.5 * (ctf[:, h] + ctf[:, self.D])
        ctf[:, h, h] = corner
        return torch.fft.irfft2(torch.fft.rfft2(img) * ctf[:, : self.D], s=(self.D, self.D))

    def _progress(self, batch_idx: int) -> float:
        if self._trainer is None:
            return 1.0
        n_batches = max(int(self.trainer.num_training_batches), 1)
        return (self.current_epoch + batch_idx / n_batches) / max(self.trainer.max_epochs, 1)

    def continuity(self, coords: torch.Tensor) -> torch.Tensor:
        """Mean squared change (Å²) of consecutive same-chain Cα distances from the base's, coords (B, n, 3)."""
        i = self.bond_pairs
        d = (coords[:, i + 1] - coords[:, i]).norm(dim=-1)  # (B, n_bonds)
        return ((d - self.bond_lengths) ** 2).mean()

    def clash(self, coords: torch.Tensor) -> torch.Tensor:
        """:func:`components.atoms.clash_penalty` of coords (B, n, 3) at ``clash_threshold``."""
        return clash_penalty(coords, self.clash_pairs, int(self.n_clash_pairs), self.hparams.clash_threshold)

    def losses(self, batch: dict, progress: float = 1.0) -> dict:
        mu, logvar = self.posterior(batch)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        coords = self.deform(z, sample_segmentation=self.training)
        pred = self.render(coords, batch)
        corr = image_correlation(pred, batch["images"])
        ramp = min(1.0, progress / self.hparams.kl_warmup) if self.hparams.kl_warmup > 0 else 1.0
        n_pix = self.D * self.D
        kl_z = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)).mean()
        kl_seg = self.segmentation.kl() if self.segmentation is not None else corr.new_zeros(())
        loss = -corr.mean() + ramp * (self.hparams.kl_weight * kl_z + self.hparams.kl_seg_weight * kl_seg) / n_pix
        out = {"corr": corr.mean(), "kl_z": kl_z, "kl_seg": kl_seg}
        if self.hparams.continuity_weight > 0:
            out["continuity"] = self.continuity(coords)
            loss = loss + self.hparams.continuity_weight * out["continuity"]
        if self.hparams.clash_weight > 0:
            out["clash"] = self.clash(coords)
            loss = loss + self.hparams.clash_weight * out["clash"]
        with torch.no_grad():  # least-squares scale of the rendering onto the (unit-std) images
            scale = (pred * batch["images"]).sum() / (pred * pred).sum().clamp(min=1e-30)
            self.image_scale.copy_(scale if self.image_scale == 0 else 0.9 * self.image_scale + 0.1 * scale)
        out["loss"] = loss
        return out

    def training_step(self, batch: dict, batch_idx: int):
        out = self.losses(batch, self._progress(batch_idx))
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=True, on_step=True, on_epoch=False,
                      batch_size=batch["images"].shape[0])
        self.log("train/image_scale", self.image_scale, on_step=True, on_epoch=False)
        return out["loss"]

    # ---- evaluation contract -----------------------------------------------------------------------------
    def embed(self, batch: dict) -> dict:
        mu, _ = self.posterior(batch)
        return {"latent": mu, "class_probs": None}

    @torch.no_grad()
    def structure(self, latent: torch.Tensor | None, atoms: bool = False) -> torch.Tensor:
        """Residue (Cα/C1′) coordinates for latents (M, d) → (M, n_res, 3) Å in the box frame (box centre 0),
        residues in the base file's order; None: the latent prior's mean (one structure). With ``atoms``:
        the heavy atoms, (M, n_atoms, 3), in the base file's order."""
        if latent is None:
            latent = torch.zeros(1, self.hparams.latent_dim)
        # with atoms, bounds move_by_segments' (chunk, K, n_atoms, 3) moved copies
        chunk = max(1, (1 << 22) // (3 * self.n_transforms * len(self.atom_coords0))) if atoms else 256
        out = [self.deform(z.to(self.coords0.device), atoms=atoms) + self.offset for z in latent.split(chunk)]
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor | None, classes: torch.Tensor | None) -> torch.Tensor:
        """Volumes (M, D, D, D) of the structures at latents (M, d); ``volume=atoms``: the density (e/Å³) of
        the moved heavy atoms at the map's band limit (physics.gaussians.band_limited_sigma); ``residues``:
        the residue Gaussians that are trained (σ = ``sigma``, amplitudes in electrons)."""
        if latent is None:
            latent = torch.zeros(1 if classes is None else len(classes), self.hparams.latent_dim)
        if self.hparams.volume == "residues":
            return torch.stack([voxelize_gaussians(c, self.sigmas, self.amplitudes, self.D, self.apix) for c in self.structure(latent)])
        sigma = band_limited_sigma(self.apix)
        sigmas = torch.full_like(self.atom_numbers, sigma)
        amplitudes = atom_amplitudes(self.atom_numbers, sigma)
        return torch.stack([voxelize_gaussians(c, sigmas, amplitudes, self.D, self.apix) for c in self.structure(latent, atoms=True)])

    def base_structure(self) -> torch.Tensor:
        """The base's residue coordinates (n_res, 3) Å in the box frame, as placed (docked) for training."""
        return (self.coords0 + self.offset).detach().cpu()

    def segment_labels(self) -> np.ndarray | None:
        """Segment of each residue (posterior means), (n_res,) int64; None for per_residue (no segments)."""
        if self.segmentation is None:
            return None
        with torch.no_grad():
            return self.segmentation.labels().cpu().numpy()

    # ---- outputs ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_outputs(self, out_dir: Path, datamodule, n_images: int = 10) -> dict:
        """Multi-model atomic structures, every atom moved with its residue and its residue's segment in the
        B-factor column (ChimeraX: ``coordset #1`` plays them, ``color bfactor`` colours by segment):
        ``images.pdb`` for the first ``n_images`` particles, ``traversal.pdb`` along the first principal
        axis of the latents, ``segmentation.pdb`` (the base); ``z.npy`` latents. Returns what it wrote."""
        was_training = self.training
        self.eval()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        emb = self.embed_all(datamodule.all_dataloader())
        z = emb["latent"][torch.argsort(emb["index"])]  # (N, d) in particle order
        with atomic_path(out_dir / "z.npy") as tmp:
            np.save(tmp, z.numpy())
        segments = self.segment_labels()
        labels = (segments if segments is not None else np.arange(self.base.n_residues)).astype(float)
        labels = labels[self.base.atom_residue]  # (n_atoms,)
        st = self.base.structure.gemmi_structure
        write_models(out_dir / "segmentation.pdb", st, (self.atom_coords0 + self.offset)[None].cpu().numpy(), labels)
        write_models(out_dir / "images.pdb", st, self.structure(z[:n_images], atoms=True).cpu().numpy(), labels)
        zc = z - z.mean(0)
        axis = torch.linalg.svd(zc, full_matrices=False).Vh[0]  # (d,)
        scores = zc @ axis
        lo, hi = torch.quantile(scores, torch.tensor([0.05, 0.95]))
        steps = torch.linspace(float(lo), float(hi), max(2, self.hparams.traversal_steps))
        traversal = z.mean(0) + steps[:, None] * axis
        write_models(out_dir / "traversal.pdb", st, self.structure(traversal, atoms=True).cpu().numpy(), labels)
        written = {"dir": str(out_dir), "files": ["segmentation.pdb", "images.pdb", "traversal.pdb", "z.npy"]}
        if was_training:
            self.train()
        return written

