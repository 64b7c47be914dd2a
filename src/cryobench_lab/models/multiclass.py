"""Multiclass refinement (``model=multiclass``): K voxel volumes and class priors fitted by EM.

The objective (RELION's 3D classification) is the log posterior

    L = Σ_i log Σ_j π_j Σ_g p(g) N(X_i | CTF_i · S_g(R_i, V_j), σ_i²) + Σ_j log N(V_j | 0, τ_j²)

with images X_i compared on the Nyquist disc of their re-centred spectra, S a nearest-neighbour
central slice of the ``pad``-oversampled spectrum of V_j (models/components/reconstruction.py), white
Gaussian noise of real-space std σ_i per image (``noise="image"``) or one σ for all (``noise="global"``;
in Fourier space the variance is D²σ² per coefficient, so ``E = ‖X − CTF·S‖² / 2D²σ²`` is the real-space
Gaussian energy by Parseval), and a Gaussian (Wiener) prior of per-shell variance τ_j²(k) on the
Fourier coefficients of each volume. Poses are the given ones, or (``pose_search="local"``) marginalised
over a local grid g around them with a uniform prior: rotations ``ΔR · R_i`` with ``ΔR`` every
combination of {−1, 0, 1}·``local_step_deg`` about x, y and z (27), times shifts {−1, 0, 1}·
``shift_step_px`` on x and y (9).

The likelihood compares only pixels whose voxel lies inside the current resolution band: the shells below
the first one where every class's SSNR = τ²·⟨Σ γ CTF²/D²σ²⟩ drops below 1 (RELION's current resolution;
at least 4 px), re-estimated with τ². Beyond it the class volumes are mostly each class's own images' noise,
and comparing there lets every image prefer the class that already holds it (measured on tomotwin3: the
same volumes give ARI 0.73 over the full band, 0.99 within 16 px). Backprojection still uses every pixel,
so the SSNR and the band can grow.

One epoch is one EM iteration over every particle:

- E-step (each batch): posteriors γ_ijg ∝ π_j p(g) N(...) under the current parameters; each image's σ_i is
  updated from its own γ-weighted residual (image-local, so done in the batch); the γ-weighted
  CTF-multiplied spectra and CTF² are scattered into per-class Fourier accumulators (weights below 1e-6
  skipped).
- M-step (epoch end): ``V_j = num_j / (den_j + 1/τ_j²)``, π_j = mean γ_ij, the global σ when shared.
  With nearest-neighbour gridding each of these is the exact maximiser given the others, so with a fixed
  τ² the iteration is a generalised EM step and L never decreases (tests/test_multiclass.py).
- τ_j²(k) (``prior_update=True``) is re-estimated after every M-step by the method of moments:
  ``⟨|num/den|² − 1/den⟩_shell`` (signal power = power of the unregularised estimate minus its noise
  variance), as RELION re-estimates τ² from the data each iteration; this changes the objective between
  iterations. ``prior_update=False`` keeps the estimate from initialisation.

Initialisation (K > 1), so that classes start apart without being fitted to any dataset: epoch 0
backprojects every particle into one consensus V_cons (σ_i² starts at each image's band power, the noise
bound for SNR → 0; τ² by the moment estimate). The next ``pca_passes`` epochs run EM for probabilistic PCA
of the residuals ``X_i − a_i·CTF·S(V_cons)`` (Roweis 1998; the 3D-variability model; a_i a per-image
scale): M = min(K − 1, 3)
principal volumes W from seeded white noise, per-image least-squares coordinates z_i, W from the voxelwise
normal equations with the consensus Wiener prior. After the last pass, k-means++ on the z_i (in the metric
of W, so distances are between volumes V_cons + W z) splits the particles into K groups; class j starts at
``V_cons + W z̄_j`` with π_j the group's share. Then one EM iteration per epoch.

Outputs (``on_fit_end`` into the run folder's ``classes/``): ``class_XXX.mrc``, ``posteriors.pkl``
(N, K) float32, ``classes.pkl`` (N,) 0-based, ``class_XXX_indices.pkl``, ``class_sizes.json`` (sizes and
π), ``log_likelihood.json`` (L per iteration) and ``particles_classes.star`` (``rlnClassNumber``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from cryobench_lab.data.particles import DatasetInfo
from cryobench_lab.io.atomic import write_json_atomic
from cryobench_lab.io.mrc import write_mrc
from cryobench_lab.io.pickles import save_pickle
from cryobench_lab.metrics.masks import soft_sphere_mask
from cryobench_lab.models.base import ReconstructionModule
from cryobench_lab.models.components.reconstruction import NearestGrid, write_class_star
from cryobench_lab.physics.backprojection import shell_index, shell_mean
from cryobench_lab.physics.fft import fft2_center, fft3_center, ifft3_center
from cryobench_lab.physics.rotations import axis_angle_to_matrix
from cryobench_lab.physics.shift import phase_ramp

# Posterior weights below this are not backprojected (their share of any voxel is negligible).
_MIN_WEIGHT = 1e-6


def local_rotation_grid(step_deg: float) -> torch.Tensor:
    """The 27 rotations ``exp([a, b, c]×)``, ``a, b, c ∈ {−1, 0, 1} · step_deg`` (axis-angle, degrees) → (27, 3, 3).

    Index 13 is the identity."""
    s = math.radians(step_deg)
    offsets = torch.tensor([[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)], dtype=torch.float64)
    return axis_angle_to_matrix(offsets * s).float()


def local_shift_grid(step_px: float) -> torch.Tensor:
    """The 9 shifts ``{−1, 0, 1}² · step_px`` as ``[x, y]`` px → (9, 2). Index 4 is zero."""
    return torch.tensor([[a, b] for b in (-1, 0, 1) for a in (-1, 0, 1)], dtype=torch.float32) * step_px


class MulticlassEM(ReconstructionModule):
    """K voxel volumes and class priors by expectation–maximisation; see the module docstring.

    Args (``model.*`` keys of conf/model/multiclass.yaml):
        n_classes: K.
        epochs: default ``trainer.max_epochs``: 1 + ``pca_passes`` initialisation epochs (K > 1), then one EM
            iteration per epoch.
        pca_passes: passes of the principal-volume EM used to initialise the classes (K > 1).
        pad: oversampling of each class's Fourier volume (P = pad · D).
        noise: ``image`` (σ_i per image) or ``global`` (one σ).
        prior_update: re-estimate the Wiener prior τ² after every M-step (else keep the initial estimate).
        pose_search: ``none`` (given poses) or ``local`` (marginalise over the local grid).
        local_step_deg: rotation step of the local grid in degrees; None: ``360 / (π D)``, the angle that
            moves the Nyquist ring (radius D/2 px in Fourier space) by one pixel.
        shift_step_px: shift step of the local grid in px (at the training box).
        sphere_mask: soft sphere inscribed in the box applied to the output volumes.
        seed: seeds the initial principal volumes and k-means++.
    """

    outputs_dir = "classes"
    # DDP (callbacks/distributed.py): each rank runs the E-step on its share of every batch; the epoch's sums
    # are added over ranks and the per-image rows each rank wrote are gathered before the M-step, so every
    # rank solves the M-step of the whole data.
    rank_summed_buffers = ("num", "den", "class_weight", "residual_sum", "loglik_sum", "count_sum", "pca_den")
    rank_merged_rows = ("sigma2", "pca_z")

    def __init__(
        self,
        info: DatasetInfo,
        name: str = "multiclass",
        n_classes: int = 3,
        epochs: int = 10,
        pca_passes: int = 4,
        pad: int = 2,
        noise: str = "image",
        prior_update: bool = True,
        pose_search: str = "none",
        local_step_deg: float | None = None,
        shift_step_px: float = 1.0,
        sphere_mask: bool = True,
        seed: int = 0,
    ):
        super().__init__(info, name)
        if n_classes < 1 or pca_passes < 1:
            raise ValueError(f"n_classes and pca_passes must be >= 1, got {n_classes}, {pca_passes}")
        if noise not in ("image", "global"):
            raise ValueError(f"model.noise must be 'image' or 'global', got {noise!r}")
        if pose_search not in ("none", "local"):
            raise ValueError(f"model.pose_search must be 'none' or 'local', got {pose_search!r}")
        if not info.has_poses:
            raise ValueError(f"model={name} refines around given poses: pass data.poses= or a star/cs file with angles")
        self.save_hyperparameters(ignore=["info"])
        self.automatic_optimization = False
        self.default_epochs = epochs
        self.K = n_classes
        self.grid = NearestGrid(self.D, pad)
        P = self.grid.P
        step = local_step_deg if local_step_deg is not None else 360.0 / (math.pi * self.D)
        local = pose_search == "local"
        self.register_buffer("rot_grid", local_rotation_grid(step) if local else torch.eye(3)[None], persistent=False)
        self.register_buffer("shift_grid", local_shift_grid(shift_step_px) if local else torch.zeros(1, 2), persistent=False)
        self.register_buffer("spectra", torch.zeros(n_classes, P, P, P, dtype=torch.complex64))  # (K, P, P, P)
        self.register_buffer("tau2", torch.ones(n_classes, P // 2))  # (K, shells) prior variance
        self.register_buffer("log_pi", torch.full((n_classes,), -math.log(n_classes)))
        self.register_buffer("sigma2", torch.full((info.n_particles,), float("nan")))  # (N,) real-space σ²
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))  # 0: initialisation, then EM
        # accumulators of one epoch
        self.register_buffer("num", torch.zeros(n_classes, P**3, dtype=torch.complex64), persistent=False)
        self.register_buffer("den", torch.zeros(n_classes, P**3), persistent=False)
        self.register_buffer("class_weight", torch.zeros(n_classes, dtype=torch.float64), persistent=False)
        self.register_buffer("residual_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("loglik_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("count_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("band_shell", torch.tensor(P // 2))  # likelihood band: voxel shells < this
        # initialisation: consensus, then principal volumes W (M ≤ 3) of the heterogeneity and coordinates z;
        # the consensus and W carry over between epochs, so they are saved with the checkpoint
        self.n_pca = pca_passes if n_classes > 1 else 0
        self.M = min(n_classes - 1, 3)
        self.register_buffer("consensus_spectrum", torch.zeros(P, P, P, dtype=torch.complex64))
        self.register_buffer("components", torch.zeros(self.M, P**3, dtype=torch.complex64))
        self.register_buffer("pca_den", torch.zeros(self.M * self.M if self.n_pca else 0, P**3), persistent=False)
        self.register_buffer("pca_z", torch.zeros(info.n_particles, self.M), persistent=False)
        self.log_likelihood: list[float] = []  # L per EM iteration (data term + prior); in the checkpoint
        self._shells = shell_index(P)
        self.mask = soft_sphere_mask(self.D) if sphere_mask else None

    # ---- data hooks (focused classification overrides these) -----------------------------------------------
    def observations(self, batch: dict) -> torch.Tensor:
        """Re-centred spectra of the images on the band, (B, n) complex."""
        spectra = fft2_center(batch["images"]) * phase_ramp(batch["trans"], self.D)  # (B, D, D)
        return self.grid.take(spectra)

    def constrain(self, spectra: torch.Tensor) -> torch.Tensor:
        """Volume spectra (K, P, P, P) after the M-step's solve; identity here, a support mask when focused."""
        return spectra

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        # every particle's posterior is needed, so every particle is in every EM iteration
        self.train_on_every_particle()

    def configure_optimizers(self):
        return None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["em_log_likelihood"] = list(self.log_likelihood)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.log_likelihood = list(checkpoint.get("em_log_likelihood", []))

    def on_train_epoch_start(self) -> None:
        self.num.zero_()
        self.pca_den.zero_()
        self.den.zero_()
        self.class_weight.zero_()
        self.residual_sum.zero_()
        self.count_sum.zero_()
        self.loglik_sum.zero_()
        self._shells = self._shells.to(self.device)
        self.grid.band, self.grid.k = self.grid.band.to(self.device), self.grid.k.to(self.device)

    def training_step(self, batch: dict, batch_idx: int):
        {"consensus": self._consensus_step, "pca": self._pca_step, "em": self._em_step}[self.phase()](batch)

    def on_train_epoch_end(self) -> None:
        self.m_step()
        if self.log_likelihood:
            self.log("em/log_likelihood", self.log_likelihood[-1], on_epoch=True)
        self.log("em/band_px", float(self.band_shell) / self.grid.pad, on_epoch=True)
        for j, p in enumerate(self.log_pi.exp().tolist()):
            self.log(f"em/class_prior_{j}", p, on_epoch=True)

    # ---- E-step ----------------------------------------------------------------------------------------------
    def _ctf_band(self, batch: dict) -> torch.Tensor:
        ctf = self.ctf(batch)
        if ctf is None:
            return torch.ones(len(batch["images"]), len(self.grid.band), device=self.device)
        return self.grid.take(ctf)  # (B, n)

    def e_step(self, batch: dict, sigma2: torch.Tensor | None = None) -> dict:
        """Posteriors and energies of a batch under the current parameters.

        Returns ``log_post`` (B, K, S, G) log posteriors over class, shift and rotation, ``loglik`` (B,),
        ``resid2`` (B, K, S, G) ‖X − CTF·S‖² (Fourier, unnormalised), and the tensors the M-step needs.
        """
        Y = self.observations(batch)  # (B, n)
        c = self._ctf_band(batch)  # (B, n)
        B = Y.shape[0]
        D2 = float(self.D**2)
        # shifted observations: the grid's shifts are added to the re-centring shift
        Ys = Y[:, None] * self.grid.take(phase_ramp(self.shift_grid, self.D))[None]  # (B, S, n)
        rots = torch.einsum("gab,ibc->igac", self.rot_grid, batch["rot"])  # (B, G, 3, 3): ΔR · R_i
        vox = self.grid.voxels(rots)  # (B, G, n)
        # pixels whose voxel lies inside the current resolution band (the same for every shift)
        inband = (self._shells.reshape(-1)[vox] < self.band_shell).to(Y.real.dtype)  # (B, G, n)
        n_eff = inband.sum(-1)  # (B, G)
        y2 = (Y.abs().square()[:, None] * inband).sum(-1)  # (B, G) (unit-modulus ramps)
        resid2 = []
        for j in range(self.K):
            model = c[:, None] * self.spectra[j].reshape(-1)[vox] * inband  # (B, G, n) CTF · slice
            cross = torch.einsum("bsn,bgn->bsg", Ys.conj(), model).real  # (B, S, G)
            m2 = model.abs().square().sum(-1)  # (B, G)
            resid2.append((y2[:, None, :] - 2 * cross + m2[:, None, :]).clamp(min=0))
        resid2 = torch.stack(resid2, 1)  # (B, K, S, G)
        if sigma2 is None:
            sigma2 = self.sigma2[batch["index"]]
        S, G = resid2.shape[2], resid2.shape[3]
        log_prior = self.log_pi[None, :, None, None] - math.log(S * G)
        normaliser = 0.5 * n_eff[:, None, None, :] * torch.log(2 * math.pi * sigma2)[:, None, None, None]
        scores = log_prior - resid2 / (2 * D2 * sigma2[:, None, None, None]) - normaliser
        loglik = scores.reshape(B, -1).logsumexp(1)  # (B,)
        log_post = scores - loglik[:, None, None, None]
        return {"log_post": log_post, "loglik": loglik, "resid2": resid2, "n_eff": n_eff, "Ys": Ys, "c": c, "vox": vox}

    def _em_step(self, batch: dict) -> None:
        out = self.e_step(batch)
        post = out["log_post"].exp()  # (B, K, S, G)
        D2 = float(self.D**2)
        expected = (post * out["resid2"]).flatten(1).sum(1)  # (B,) E‖R‖² under the posterior
        count = (post.sum((1, 2)) * out["n_eff"]).sum(1)  # (B,) expected number of compared pixels
        if self.hparams.noise == "image":
            # image-local M-step for σ_i (before the volumes, so they are solved with the new σ)
            sigma2 = (expected / (D2 * count)).float()
            self.sigma2[batch["index"]] = sigma2
            weight = 1.0 / (D2 * sigma2)  # (B,) inverse Fourier noise variance
        else:
            weight = torch.ones_like(expected, dtype=torch.float32)  # scaled by the new σ at the M-step
        self.residual_sum += expected.sum().double()
        self.count_sum += count.sum().double()
        self.loglik_sum += out["loglik"].double().sum()
        self.class_weight += post.sum((2, 3)).double().sum(0)
        self._backproject(post, out, weight)

    def _backproject(self, post: torch.Tensor, out: dict, weight: torch.Tensor) -> None:
        """Scatter ``post``-weighted CTF·X and CTF² of every significant (image, class, shift, rotation)."""
        b, j, s, g = torch.nonzero(post > _MIN_WEIGHT, as_tuple=True)
        w = post[b, j, s, g] * weight[b]  # (M,)
        c = out["c"][b]  # (M, n)
        vox = out["vox"][b, g]  # (M, n)
        flat = vox + (j * self.grid.P**3)[:, None]  # (M, n) into the (K·P³) accumulators
        self.num.view(-1).index_add_(0, flat.reshape(-1), (w[:, None] * c * out["Ys"][b, s]).reshape(-1))
        self.den.view(-1).index_add_(0, flat.reshape(-1), (w[:, None] * c.square()).reshape(-1))

    # ---- initialisation ----------------------------------------------------------------------------------------
    def phase(self) -> str:
        """``consensus`` (iteration 0), ``pca`` (the next ``pca_passes``, K > 1) or ``em``."""
        it = int(self.iteration)
        return "consensus" if it == 0 else "pca" if it <= self.n_pca else "em"

    def _consensus_step(self, batch: dict) -> None:
        """One-class backprojection; σ_i² from the band power (the noise bound for SNR → 0)."""
        Y = self.observations(batch)  # (B, n)
        D2, n = float(self.D**2), Y.shape[1]
        self.sigma2[batch["index"]] = Y.abs().square().sum(-1) / (D2 * n)
        out = {"c": self._ctf_band(batch), "vox": self.grid.voxels(batch["rot"])[:, None], "Ys": Y[:, None]}
        post = torch.zeros(len(Y), self.K, 1, 1, device=Y.device)
        post[:, 0] = 1.0
        self._backproject(post, out, 1.0 / (D2 * self.sigma2[batch["index"]]))

    def _pca_step(self, batch: dict) -> None:
        """EM for the principal volumes W of the residuals X_i − a_i·CTF·S(V_cons): per image the least-squares
        scale a_i and coordinates z_i (the scale absorbs the Wiener shrinkage of V_cons, which would otherwise
        be the leading "variability"), accumulated into W's normal equations."""
        Y = self.observations(batch)  # (B, n)
        c = self._ctf_band(batch)
        vox = self.grid.voxels(batch["rot"])  # (B, n)
        inband = (self._shells.reshape(-1)[vox] < self.band_shell).to(c.dtype)  # (B, n)
        Y, c = Y * inband, c * inband
        cons = c * self.consensus_spectrum.reshape(-1)[vox]  # (B, n)
        basis = torch.cat([cons[:, None], c[:, None] * self.components[:, vox].transpose(0, 1)], 1)  # (B, 1+M, n)
        gram = torch.einsum("bmn,bln->bml", basis.conj(), basis).real  # (B, 1+M, 1+M)
        rhs = torch.einsum("bmn,bn->bm", basis.conj(), Y).real  # (B, 1+M)
        ridge = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-30)
        coef = torch.linalg.solve(gram + ridge[:, None, None] * torch.eye(1 + self.M, device=Y.device), rhs)
        z = coef[:, 1:]  # (B, M)
        resid = Y - coef[:, :1] * cons  # (B, n)
        self.pca_z[batch["index"]] = z
        w = 1.0 / (self.D**2 * self.sigma2[batch["index"]])  # (B,)
        flat = vox.reshape(-1)
        for m in range(self.M):
            self.num[m].index_add_(0, flat, ((w * z[:, m])[:, None] * c * resid).reshape(-1))
            for n in range(self.M):
                self.pca_den[m * self.M + n].index_add_(0, flat, ((w * z[:, m] * z[:, n])[:, None] * c.square()).reshape(-1))

    def _wiener(self, num: torch.Tensor, den: torch.Tensor, tau2: torch.Tensor) -> torch.Tensor:
        """``num / (den + 1/τ²)`` per voxel for (J, P³) sums and (J, shells) τ² → (J, P, P, P), 0 beyond Nyquist."""
        P, n_shells = self.grid.P, self.grid.P // 2
        shells = self._shells.reshape(-1).clamp(max=n_shells - 1)
        spectra = (num / (den + 1.0 / tau2[:, shells])).reshape(-1, P, P, P)
        spectra[:, self._shells >= n_shells] = 0  # the corners beyond Nyquist are never sampled
        return spectra

    def _finish_consensus(self) -> None:
        if self.hparams.noise == "global":
            self.sigma2.fill_(float(self.sigma2.mean()))
        tau2 = self._moment_tau2(self.num[:1], self.den[:1])  # (1, shells)
        self.tau2.copy_(tau2.expand_as(self.tau2))
        self._update_band(self.den[:1])
        consensus = self.constrain(self._wiener(self.num[:1], self.den[:1], tau2))[0]
        self.consensus_spectrum = consensus
        self.spectra.copy_(consensus.expand_as(self.spectra))
        if self.n_pca:  # random initial principal volumes (white noise in the box, seeded)
            gen = torch.Generator().manual_seed(self.hparams.seed)
            noise = torch.randn(self.M, self.D, self.D, self.D, generator=gen).to(self.device)
            self.components = self.constrain(torch.stack([self.volume_to_spectrum(v) for v in noise])).reshape(self.M, -1)

    def _finish_pca(self) -> None:
        """Solve W from the pass's normal equations; after the last pass, split the images into K classes by
        k-means++ on their coordinates (metric of W, i.e. distances between the volumes V_cons + W z)."""
        if int(self.iteration) == self.n_pca:
            W = self.components  # the W the coordinates were computed with
            gram = (W.conj() @ W.T).real.double()  # (M, M)
            L = torch.linalg.cholesky(gram + 1e-9 * gram.diagonal().mean() * torch.eye(self.M, dtype=gram.dtype))
            features = self.pca_z.double() @ L  # ‖f_a − f_b‖² = (z_a − z_b)ᵀ WᴴW (z_a − z_b)
            gen = torch.Generator().manual_seed(self.hparams.seed)
            labels = kmeans_pp(features.cpu(), self.K, gen).to(self.device)
            counts = torch.bincount(labels, minlength=self.K).double()
            means = torch.zeros(self.K, self.M, dtype=torch.float64, device=self.device).index_add_(0, labels, self.pca_z.double())
            means = (means / counts.clamp(min=1)[:, None]).to(W.real.dtype)
            spectra = self.consensus_spectrum.reshape(1, -1) + means.to(W.dtype) @ W  # (K, P³)
            self.spectra.copy_(self.constrain(spectra.reshape(self.spectra.shape)))
            self.log_pi.copy_(torch.log((counts / counts.sum()).clamp(min=1e-12)).float())
            return
        P3, M = self.grid.P**3, self.M
        den = self.pca_den.reshape(M, M, P3).permute(2, 0, 1)  # (P³, M, M)
        n_shells = self.grid.P // 2
        lam = 1.0 / self.tau2[0, self._shells.reshape(-1).clamp(max=n_shells - 1)]  # (P³,)
        system = (den + lam[:, None, None] * torch.eye(M, device=den.device)).to(self.num.dtype)
        W = torch.linalg.solve(system, self.num[:M].T.unsqueeze(-1)).squeeze(-1).T  # (M, P³)
        W[:, (self._shells >= n_shells).reshape(-1)] = 0
        self.components = self.constrain(W.reshape(M, self.grid.P, self.grid.P, self.grid.P)).reshape(M, -1)

    # ---- M-step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def m_step(self) -> None:
        """End of an epoch: finish the initialisation phase, or solve the volumes, class priors and (global)
        noise from the epoch's sums (τ² re-estimated first if asked)."""
        phase = self.phase()
        if phase == "consensus":
            self._finish_consensus()
        elif phase == "pca":
            self._finish_pca()
        else:
            self._em_m_step()
        self.iteration += 1

    def _em_m_step(self) -> None:
        num, den = self.num, self.den
        if self.hparams.noise == "global":
            s_new = float(self.residual_sum) / (self.D**2 * float(self.count_sum))  # real-space σ²
            self.sigma2.fill_(s_new)
            num, den = num / (self.D**2 * s_new), den / (self.D**2 * s_new)
        self.log_likelihood.append(float(self.loglik_sum) + float(self.log_prior_volumes()))
        if self.hparams.prior_update:
            self.tau2.copy_(self._moment_tau2(num, den))
            self._update_band(den)
        self.spectra.copy_(self.constrain(self._wiener(num, den, self.tau2)))
        total = self.class_weight.sum().clamp(min=1e-12)
        self.log_pi.copy_(torch.log((self.class_weight / total).clamp(min=1e-12)).float())

    def _update_band(self, den: torch.Tensor) -> None:
        """Likelihood band = the first shell where every class's SSNR = τ²·⟨den⟩ (mean over sampled voxels)
        drops below 1 (RELION's current resolution), at least 4 px of the image's spectrum."""
        n_shells = self.grid.P // 2
        total = torch.stack([shell_mean(d, self._shells, n_shells) for d in den])
        sampled = torch.stack([shell_mean((d > 0).float(), self._shells, n_shells) for d in den])
        ssnr = self.tau2[: len(den)] * total / sampled.clamp(min=1e-12)  # (J, shells)
        below = ssnr < 1.0
        below[:, 0] = False  # the DC shell says nothing about resolution
        first = torch.where(below.any(1), below.float().argmax(1), torch.full_like(below[:, 0], n_shells, dtype=torch.long))
        self.band_shell.fill_(int(min(max(int(first.max()), 4 * self.grid.pad), n_shells)))

    def _moment_tau2(self, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        """τ²(k) = ⟨|num/den|² − 1/den⟩ over each shell's sampled voxels, floored at a tiny positive value."""
        n_shells = self.grid.P // 2
        sampled = den > 0
        raw = torch.where(sampled, num.abs().square() / den.clamp(min=1e-30) ** 2 - 1.0 / den.clamp(min=1e-30), 0.0)
        total = torch.stack([shell_mean(r, self._shells, n_shells) for r in raw])
        count = torch.stack([shell_mean(m.float(), self._shells, n_shells) for m in sampled])
        tau2 = total / count.clamp(min=1e-12)  # (K, shells) mean over sampled voxels only
        floor = 1e-8 * tau2.clamp(min=0).amax(1, keepdim=True).clamp(min=1e-30)
        return tau2.clamp(min=0) + floor

    def log_prior_volumes(self) -> torch.Tensor:
        """Σ_j log N(V_j | 0, τ_j²) over the voxels of the likelihood band, each voxel once (as the M-step's
        ``1/τ²`` term assumes); voxels beyond the band are not part of the objective."""
        shells = self._shells.reshape(-1)
        inside = shells < self.band_shell
        t = self.tau2[:, shells[inside]]  # (K, M)
        v2 = self.spectra.reshape(self.K, -1)[:, inside].abs().square()
        return -0.5 * (v2 / t + torch.log(2 * math.pi * t)).sum().double()

    # ---- evaluation contract ---------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, batch: dict) -> dict:
        out = self.e_step(batch)
        return {"latent": None, "class_probs": out["log_post"].exp().sum((2, 3))}

    @torch.no_grad()
    def decode(self, latent: torch.Tensor | None, classes: torch.Tensor | None) -> torch.Tensor:
        if classes is None:
            classes = torch.zeros(1 if latent is None else latent.shape[0], dtype=torch.long)
        return torch.stack([self.class_volume(int(j)) for j in classes])

    def class_volume(self, j: int) -> torch.Tensor:
        """Real-space volume of class j, (D, D, D), cropped from the P box (× the sphere mask if set)."""
        D, P = self.D, self.grid.P
        lo = P // 2 - D // 2
        vol = ifft3_center(self.spectra[j]).real[lo : lo + D, lo : lo + D, lo : lo + D]
        return vol * self.mask.to(vol) if self.mask is not None else vol

    def volume_to_spectrum(self, vol: torch.Tensor) -> torch.Tensor:
        """Spectrum on this model's (P, P, P) grid of a real (D, D, D) volume (zero-padded about the centre)."""
        D, P = self.D, self.grid.P
        lo = P // 2 - D // 2
        return fft3_center(torch.nn.functional.pad(vol, (lo, P - D - lo) * 3))

    # ---- outputs ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_outputs(self, out_dir: Path, datamodule) -> dict:
        """Class volumes, posteriors, assignments (pickles and STAR), sizes and the EM trace; returns sizes."""
        out_dir = Path(out_dir)
        emb = self.embed_all(datamodule.all_dataloader())
        order = torch.argsort(emb["index"])
        probs = emb["class_probs"][order]  # (N, K)
        classes = probs.argmax(1)
        sizes = torch.bincount(classes, minlength=self.K)
        for k in range(self.K):
            write_mrc(out_dir / f"class_{k:03d}.mrc", self.class_volume(k).cpu().numpy(), apix=self.apix)
            save_pickle(out_dir / f"class_{k:03d}_indices.pkl", torch.nonzero(classes == k).squeeze(1).numpy().astype(np.int64))
        save_pickle(out_dir / "posteriors.pkl", probs.numpy().astype(np.float32))
        save_pickle(out_dir / "classes.pkl", classes.numpy().astype(np.int64))
        write_class_star(out_dir / "particles_classes.star", classes.numpy(), self.info, datamodule,
                         probs.max(1).values.numpy())
        summary = {"class_sizes": sizes.tolist(), "class_priors": self.log_pi.exp().tolist()}
        for name, payload in (("class_sizes.json", summary), ("log_likelihood.json", {"log_likelihood": self.log_likelihood})):
            write_json_atomic(out_dir / name, payload)
        return summary


def kmeans_pp(x: torch.Tensor, K: int, generator: torch.Generator, iterations: int = 100) -> torch.Tensor:
    """k-means with k-means++ seeding (Arthur & Vassilvitskii 2007) of points ``x (N, d)`` → labels (N,)."""
    N = len(x)
    centres = x[torch.randint(N, (1,), generator=generator)]
    for _ in range(1, K):
        d2 = torch.cdist(x, centres).square().amin(1)  # (N,) squared distance to the nearest centre
        pick = torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones(N) / N, 1, generator=generator)
        centres = torch.cat([centres, x[pick]])
    labels = torch.cdist(x, centres).argmin(1)
    for _ in range(iterations):
        for k in range(K):
            if (labels == k).any():
                centres[k] = x[labels == k].mean(0)
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels
