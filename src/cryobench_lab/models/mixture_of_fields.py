"""Mixture of neural fields (Hydra, Levy et al. 2024) and its special cases, with known poses.

K Fourier-space neural fields (:class:`~cryobench_lab.models.components.fields.FourierField`), each
conditioned on a per-class conformation latent of dimension d. Per image i: class logits (softmax → p_ik)
and one latent z_ik per class, from auto-decoded tables (default) or an image encoder. The loss per image is

    −log Σ_k p_ik · exp(−E_ik),   E_ik = ‖y_i − CTF_i · slice_k(R_i, z_ik)‖² / 2σ²

plus a standard-normal prior on the latents (or the KL of a Gaussian posterior, ``vae=True``). Residuals are
taken on the band-limited (|k| < r ≤ D/2) half plane of the re-centred image spectrum, with a per-shell
noise power ``S(|k|) = D²σ²`` estimated online from the assigned class's residuals (or fixed by
``noise_sigma``), so E is in nats. Gradients use the EM identity: with the posterior r_ik ∝ p_ik e^{−E_ik}
held fixed, ``Σ_k r_ik (E_ik − log p_ik)`` has the gradient of the loss above.

Named variants share this code: ``hydra`` (K=3, d=2), ``drgnai`` (K=1, d=8), ``classify3d`` (d=0) and
``cryodrgn`` (K=1, MLP encoder, VAE).

Training schedule, in fractions of ``trainer.max_epochs`` (progress p ∈ [0, 1)):

- coarse to fine: the band radius is ``radius_start · D/2`` until ``coarse_until``, then grows linearly to
  D/2 at ``fine_from``;
- balanced warm-up (K > 1, p < ``warmup``): responsibilities are balanced over the batch's classes by
  Sinkhorn iterations, so every field is fitted to a share of the images from the start (no collapse of
  all images onto the field that happens to be best at initialisation);
- hard assignment: after warm-up, an image is evaluated in every class until its posterior's largest
  probability exceeds ``confidence``; from then on only in that class, except in E-step epochs (every
  ``estep_every``-th epoch after warm-up, never the last), where all classes are evaluated for every image,
  within the band ``estep_radius · D/2`` where that is cheap, so that assignments can still change.
  ``coarse_until >= warmup`` keeps the all-class evaluations right after warm-up in the cheap band.

Outputs (:meth:`MixtureOfFields.write_outputs`, called from ``on_fit_end`` into the run folder's
``classes/``): ``class_XXX.mrc`` at each class's mean latent, ``class_XXX_traversal_YY.mrc`` along the first
principal axis of its latents, ``particles_classes.star`` (``rlnClassNumber``), ``classes.pkl`` (N,) 0-based
classes, ``class_XXX_indices.pkl`` (cryoDRGN ``--ind`` files) and ``z.pkl`` (N, d) assigned latents.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from cryobench_lab.data.particles import DatasetInfo
from cryobench_lab.io.mrc import write_mrc
from cryobench_lab.io.pickles import save_pickle
from cryobench_lab.metrics.latent import assigned_latent
from cryobench_lab.models.base import ReconstructionModule
from cryobench_lab.models.components.encoders import AmortisedInference
from cryobench_lab.models.components.fields import FourierField
from cryobench_lab.models.components.reconstruction import write_class_star
from cryobench_lab.models.components.tables import PerImageTables
from cryobench_lab.physics.ctf import ctf_from_params
from cryobench_lab.physics.fft import fft2_center, ifft2_center, ifft3_center
from cryobench_lab.physics.lattice import grid_2d
from cryobench_lab.physics.shift import phase_shift_2d
from cryobench_lab.physics.slicing import slice_coordinates
from cryobench_lab.poses.source import SearchedPoses, build_pose_source


def balanced_assignment(scores: torch.Tensor, spread: float = 3.0, n_iter: int = 50) -> torch.Tensor:
    """Responsibilities (B, K) that follow ``scores`` but give every class B/K images (Sinkhorn, log domain).

    scores (B, K) log-weights; rows of the result sum to 1, columns to B/K. Log-likelihood differences are
    often hundreds of nats, where Sinkhorn's iterations barely move; the scores are first divided by a
    temperature that brings their standard deviation (across classes) down to ``spread``.
    """
    B, K = scores.shape
    centred = scores - scores.mean(1, keepdim=True)
    q = scores / (centred.std() / spread).clamp(min=1.0)
    q = q - q.logsumexp(1, keepdim=True)
    for _ in range(n_iter):
        q = q - q.logsumexp(0, keepdim=True) + math.log(B / K)
        q = q - q.logsumexp(1, keepdim=True)
    return q.exp()


# Pairs whose responsibility is below this get no gradient through their field (their share of the gradient
# is that small); their log p_k term is kept, so the class logits still see every class.
_MIN_RESPONSIBILITY = 1e-3


class MixtureOfFields(ReconstructionModule):
    """K neural fields with per-image classes and latents; see the module docstring.

    Args (the ``model.*`` keys of conf/model/{hydra,drgnai,classify3d,cryodrgn}.yaml):
        n_classes, latent_dim: K fields and the dimension d of each class's conformation latent (0: none).
        encoder: ``none`` (auto-decoded per-image tables), ``mlp`` or ``cnn`` (amortised encoder).
        vae, kl_weight: Gaussian posterior on the latents with KL to N(0, I) × ``kl_weight`` (needs an encoder).
        decoder: ``separate`` (K MLPs) or ``shared`` (one MLP with a class embedding).
        hidden_dim, n_layers: MLP width and number of residual hidden layers (cryoDRGN's --dec-dim/--dec-layers).
        n_features, feature_scale: Gaussian Fourier features; their spread is ``feature_scale · D/2`` px.
            0.08 is cryoDRGN's default (``--feat-sigma 0.5``, whose features omit the 2π: 0.5/2π). Measured on
            tomotwin3 (hydra, 24 epochs, same seed): 0.25 plateaus at FSC-AUC 0.328, 0.08 reaches 0.371.
        encoder_hidden, encoder_layers: the encoder's width and residual layers.
        bf16: bfloat16 autocast for the field's matrix products (None: where the hardware has it natively).
        epochs: default ``trainer.max_epochs``; every schedule below is a fraction of the epochs.
        lr, logit_lr, latent_lr: Adam learning rate of the networks; SparseAdam rates of the tables.
        noise_sigma: fixed real-space noise std per pixel, in units of the normalised images (None: the
            per-shell noise power is estimated from the residuals).
        noise_momentum: EMA momentum of that estimate per step.
        radius_start, coarse_until, fine_from: band radius (fraction of D/2) at the start, held until
            ``coarse_until``, reaching D/2 at ``fine_from`` (fractions of training).
        warmup: fraction of training with balanced (Sinkhorn) responsibilities.
        confidence, estep_every, estep_radius: hard assignment above this posterior probability; all
            classes re-evaluated every ``estep_every`` epochs within ``estep_radius · D/2``.
        traversal_steps: volumes per class along its latent's first principal axis (outputs).
        seed: seeds the Gaussian features and the latent tables' initialisation.
    """

    outputs_dir = "classes"

    def __init__(
        self,
        info: DatasetInfo,
        name: str = "hydra",
        n_classes: int = 3,
        latent_dim: int = 2,
        encoder: str = "none",
        vae: bool = False,
        kl_weight: float = 1.0,
        decoder: str = "separate",
        hidden_dim: int = 256,
        n_layers: int = 3,
        n_features: int = 96,
        feature_scale: float = 0.08,
        encoder_hidden: int = 256,
        encoder_layers: int = 3,
        bf16: bool | None = None,
        epochs: int = 16,
        lr: float = 5e-4,
        logit_lr: float = 1.0,
        latent_lr: float = 0.05,
        noise_sigma: float | None = None,
        noise_momentum: float = 0.9,
        radius_start: float = 0.5,
        coarse_until: float = 0.25,
        fine_from: float = 0.6,
        warmup: float = 0.2,
        confidence: float = 0.99,
        estep_every: int = 4,
        estep_radius: float = 0.5,
        traversal_steps: int = 5,
        seed: int = 0,
        poses: dict | None = None,
    ):
        super().__init__(info, name)
        if n_classes < 1 or latent_dim < 0:
            raise ValueError(f"n_classes must be >= 1 and latent_dim >= 0 (got {n_classes}, {latent_dim})")
        if decoder not in ("separate", "shared"):
            raise ValueError(f"model.decoder must be 'separate' or 'shared', got {decoder!r}")
        if vae and (encoder == "none" or latent_dim == 0):
            raise ValueError("model.vae=true needs an encoder (encoder=mlp|cnn) and latent_dim > 0")
        self.save_hyperparameters(ignore=["info"])
        self.automatic_optimization = False
        self.default_epochs = epochs
        self.K, self.d = n_classes, latent_dim
        self.poses = build_pose_source(poses, info.n_particles, n_classes, self.D, self.apix, info.has_poses, seed)
        self.field = FourierField(
            self.D, n_classes, latent_dim, hidden_dim, n_layers, n_features, feature_scale,
            shared=decoder == "shared", bf16=bf16, seed=seed,
        )
        if encoder == "none":
            self.tables: PerImageTables | None = PerImageTables(info.n_particles, n_classes, latent_dim, seed=seed)
            self.encoder: AmortisedInference | None = None
        else:
            self.tables = None
            self.encoder = AmortisedInference(encoder, self.D, n_classes, latent_dim, vae, encoder_hidden, encoder_layers)
        n_shells = self.D // 2 + 1
        # per-shell noise power S = E|N(k)|² of the unnormalised centred FFT (D² σ² for white noise σ)
        self.register_buffer("noise_power", torch.ones(n_shells))
        self.register_buffer("scales_set", torch.tensor(False))
        # each image's class and posterior probability at its last evaluation in every class
        self.register_buffer("last_class", torch.zeros(info.n_particles, dtype=torch.long))
        self.register_buffer("last_confidence", torch.zeros(info.n_particles))
        self._point_cache: dict = {}
        if isinstance(self.poses, SearchedPoses):
            self.poses.attach(self._class_values, lambda: self.noise_power, lambda: self.current_epoch, self._search_classes,
                              lambda index: self.last_class[index])

    def setup(self, stage: str | None = None) -> None:
        # per-image tables, as in cryoDRGN, DRGN-AI and Hydra; an amortised encoder may keep a held-out split
        if self.tables is not None:
            self.train_on_every_particle()

    # ---- optimisers ------------------------------------------------------------------------------------
    def configure_optimizers(self):
        dense = list(self.field.parameters()) + (list(self.encoder.parameters()) if self.encoder else [])
        optimisers = [torch.optim.Adam(dense, lr=self.hparams.lr)]
        groups = []
        if self.tables is not None and self.tables.logits is not None:
            groups.append({"params": [self.tables.logits.weight], "lr": self.hparams.logit_lr})
        if self.tables is not None and self.tables.latents is not None:
            groups.append({"params": [self.tables.latents.weight], "lr": self.hparams.latent_lr})
        if isinstance(self.poses, SearchedPoses):
            groups += self.poses.param_groups()
        if groups:
            optimisers.append(torch.optim.SparseAdam(groups))
        return optimisers

    @torch.no_grad()
    def _class_values(self, coords: torch.Tensor, k: int) -> torch.Tensor:
        """Class k's field (complex, before CTF) at frequencies ``coords (Q, 3)`` cycles/box, at the mean latent
        of the images last assigned to it (the prior mean for an encoder): what the pose search renders."""
        z = None
        if self.d:
            z = torch.zeros(self.d, device=self.device)
            if self.tables is not None:
                latents = self.tables.latents.weight.reshape(-1, self.K, self.d)[:, k]  # (N, d)
                members = self.last_class == k
                z = latents[members].mean(0) if members.any() else latents.mean(0)
            z = z[None]
        out = self.field(coords[None].to(self.device), z, torch.zeros(1, dtype=torch.long, device=self.device),
                         torch.full((1,), k, dtype=torch.long, device=self.device))[0]  # (Q, 2)
        return torch.complex(out[:, 0], out[:, 1])

    # ---- schedule --------------------------------------------------------------------------------------
    def _progress(self, batch_idx: int) -> float:
        n_batches = max(int(self.trainer.num_training_batches), 1)
        return (self.current_epoch + batch_idx / n_batches) / max(self.trainer.max_epochs, 1)

    def band_radius(self, progress: float) -> int:
        """Band-limit radius (px, exclusive) at training progress ``progress`` ∈ [0, 1]."""
        h = self.hparams
        full = self.D // 2
        if progress <= h.coarse_until or h.fine_from <= h.coarse_until:
            frac = h.radius_start if progress <= h.coarse_until else 1.0
        else:
            t = min((progress - h.coarse_until) / (h.fine_from - h.coarse_until), 1.0)
            frac = h.radius_start + t * (1.0 - h.radius_start)
        return max(2, min(full, round(frac * full)))

    def _all_classes_epoch(self) -> bool:
        """Every class evaluated for every image this epoch: every ``estep_every``-th epoch after the first
        one past warm-up (that one evaluates every class anyway, no image being confident yet), never the
        last, which trains the assigned classes at full band."""
        epochs = max(self.trainer.max_epochs, 1)
        after = self.current_epoch - math.ceil(self.hparams.warmup * epochs)
        every = max(self.hparams.estep_every, 1)
        return after > 0 and after % every == 0 and self.current_epoch < epochs - 1

    # ---- data in Fourier space -------------------------------------------------------------------------
    def _points(self, radius: int, device) -> dict:
        """Half-plane lattice points with |k| < radius: indices, frequencies, shells and loss weights."""
        key = (radius, str(device))
        if key not in self._point_cache:
            k = grid_2d(self.D, device=device)  # (D, D, 2) [kx, ky] cycles/box
            kx, ky = k[..., 0], k[..., 1]
            r2 = kx.square() + ky.square()
            sel = (r2 < radius**2) & ((ky > 0) | ((ky == 0) & (kx >= 0)))
            iy, ix = torch.nonzero(sel, as_tuple=True)
            freqs = k[iy, ix]  # (P, 2)
            weight = torch.ones(len(iy), device=device)
            weight[(freqs == 0).all(-1)] = 0.5  # the zero frequency is its own Hermitian partner
            shell = r2[iy, ix].sqrt().round().long()
            self._point_cache[key] = {"iy": iy, "ix": ix, "freqs": freqs, "weight": weight, "shell": shell}
        return self._point_cache[key]

    def _observe(self, batch: dict, pts: dict) -> dict:
        """Re-centred spectra Y (B, P) complex, CTF (B, P), slice coordinates (B, P, 3) or (B, K, P, 3)."""
        rot, trans = self.poses(batch)
        spectra = phase_shift_2d(fft2_center(batch["images"]), trans)  # (B, D, D) complex, re-centred
        Y = spectra[:, pts["iy"], pts["ix"]]
        if "ctf" in batch:
            ctf = ctf_from_params(pts["freqs"][None] / (self.D * self.apix), batch["ctf"])  # (B, P)
        else:
            ctf = torch.ones_like(Y.real)
        coords = slice_coordinates(rot.reshape(-1, 3, 3), self.D)[:, pts["iy"], pts["ix"]]
        coords = coords.reshape(*rot.shape[:-2], -1, 3)
        return {"Y": Y, "ctf": ctf, "coords": coords, "spectra": spectra}

    def _infer(self, batch: dict, spectra: torch.Tensor | None = None) -> dict:
        """Per-image ``logits (B, K) | None``, ``mu (B, K, d) | None``, ``logvar | None``."""
        if self.tables is not None:
            return self.tables(batch["index"])
        if spectra is None:
            spectra = phase_shift_2d(fft2_center(batch["images"]), self.poses(batch)[1])
        return self.encoder(ifft2_center(spectra).real)  # the encoder sees re-centred images

    @torch.no_grad()
    def _set_scales(self, obs: dict, pts: dict) -> None:
        """Radial amplitude of the field and initial noise power from one batch at full band."""
        n = self.D // 2 + 1
        shell = pts["shell"].clamp(max=n - 1)
        count = torch.zeros(n, device=shell.device).index_add_(0, shell, torch.ones_like(pts["weight"]))
        power = torch.zeros(n, device=shell.device).index_add_(0, shell, obs["Y"].abs().square().mean(0))
        ctf2 = torch.zeros(n, device=shell.device).index_add_(0, shell, obs["ctf"].square().mean(0))
        filled = count > 0
        power = torch.where(filled, power / count.clamp(min=1), power[filled][-1])
        ctf2 = torch.where(filled, ctf2 / count.clamp(min=1), ctf2[filled][-1])
        self.field.amplitude.copy_((power / ctf2.clamp(min=1e-3)).sqrt())
        sigma = self.hparams.noise_sigma
        self.noise_power.copy_(torch.full_like(power, self.D**2 * sigma**2) if sigma is not None else power)
        self.scales_set.fill_(True)

    # ---- loss ------------------------------------------------------------------------------------------
    def _pairs(self, index: torch.Tensor, all_classes: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, class) pairs to evaluate: every class, or only the last assigned class of images whose last
        all-class posterior was confident."""
        K, B, device = self.K, len(index), index.device
        if all_classes or K == 1:
            return torch.arange(B, device=device).repeat_interleave(K), torch.arange(K, device=device).repeat(B)
        confident = self.last_confidence[index] >= self.hparams.confidence
        unsure = torch.nonzero(~confident).squeeze(1)
        image = torch.cat([torch.nonzero(confident).squeeze(1), unsure.repeat_interleave(K)])
        classes = torch.cat([self.last_class[index][confident], torch.arange(K, device=device).repeat(len(unsure))])
        return image, classes

    @torch.no_grad()
    def _search_classes(self, index: torch.Tensor) -> torch.Tensor:
        """Classes to search the poses of images ``index (B,)`` in → bool (B, K): those the loss will evaluate
        this epoch (every class during warm-up and E-step epochs and for unsure images, else the last
        assigned one), so the search never spends time on a class whose slice the loss does not use."""
        B = len(index)
        every = torch.ones(B, self.K, dtype=torch.bool, device=index.device)
        progress = self.current_epoch / max(self.trainer.max_epochs, 1)
        if self.K == 1 or progress < self.hparams.warmup or self._all_classes_epoch():
            return every
        confident = self.last_confidence[index] >= self.hparams.confidence
        one = torch.nn.functional.one_hot(self.last_class[index], self.K).bool()
        return torch.where(confident[:, None], one, every)

    def _energies(self, obs: dict, pts: dict, z: torch.Tensor | None, image, classes) -> tuple[torch.Tensor, torch.Tensor]:
        """E (M,) = Σ_points w |Y − CTF·F|² / S and the squared residuals (M, P) of M pairs."""
        coords = obs["coords"]
        if coords.dim() == 4:  # per-class poses: one slice per pair
            coords, field_image = coords[image, classes], torch.arange(len(image), device=coords.device)
        else:
            field_image = image
        zz = z[image, classes] if z is not None else None
        pred = self.field(coords, zz, field_image, classes)  # (M, P, 2)
        Y, ctf = obs["Y"][image], obs["ctf"][image]
        res2 = (Y.real - ctf * pred[..., 0]).square() + (Y.imag - ctf * pred[..., 1]).square()  # (M, P)
        w = pts["weight"] / self.noise_power[pts["shell"]]
        return res2 @ w, res2

    def _loss(self, batch: dict, radius: int, all_classes: bool, balanced: bool) -> dict:
        pts = self._points(radius, self.device)
        obs = self._observe(batch, pts)
        params = self._infer(batch, obs["spectra"])
        B, K = batch["images"].shape[0], self.K
        mu, logvar = params["mu"], params["logvar"]
        z = mu
        if logvar is not None and self.training:
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        logits = params["logits"]
        logp = logits.log_softmax(1) if logits is not None else torch.zeros(B, 1, device=self.device)
        image, classes = self._pairs(batch["index"], all_classes)
        several = len(image) > B
        if several:
            # E-step without gradients, in chunks of B pairs (bounded memory): responsibilities first, then
            # the fields are differentiated only where they matter (see _MIN_RESPONSIBILITY)
            with torch.no_grad():
                E_all = torch.cat([self._energies(obs, pts, z, image[s : s + B], classes[s : s + B])[0]
                                   for s in range(0, len(image), B)])
        else:
            E_all, res2 = self._energies(obs, pts, z, image, classes)
        loglik = torch.full((B, K), -math.inf, device=self.device).index_put((image, classes), E_all.detach().neg())
        with torch.no_grad():
            scores = logp + loglik
            post = balanced_assignment(scores) if balanced else scores.softmax(1)
            assigned = post.argmax(1)
            if self.training:  # remember each fully evaluated image's class (balanced in warm-up) and belief
                full = torch.bincount(image, minlength=B) == K
                self.last_class[batch["index"][full]] = assigned[full]
                if not balanced:  # confidence only counts after warm-up: the first epoch after it sees every class
                    self.last_confidence[batch["index"][full]] = post[full].max(1).values
        r = post[image, classes]  # (M,) responsibilities of the evaluated pairs
        if several:
            grad = (r > _MIN_RESPONSIBILITY) | (classes == assigned[image])
            image_g, classes_g = image[grad], classes[grad]
            E, res2 = self._energies(obs, pts, z, image_g, classes_g)
            # Σ_k r_k (E_k − log p_k): the log p_k part over every pair keeps the logits' gradient p − r exact
            data = (r[grad] * E).sum() - (r * logp[image, classes]).sum()
        else:
            image_g, classes_g = image, classes
            data = (r * (E_all - logp[image, classes])).sum()
        if logvar is not None:
            prior = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum((1, 2)) * self.hparams.kl_weight
        elif mu is not None:
            prior = 0.5 * mu.square().sum((1, 2))
        else:
            prior = torch.zeros(B, device=self.device)
        loss = (data + prior.sum()) / B
        with torch.no_grad():
            nll = -scores.logsumexp(1)  # exact when every class was evaluated
            keep = classes_g == assigned[image_g]  # one pair per image: its assigned class
            signal = (obs["Y"].abs().square() @ pts["weight"]).sum()
            residual = (res2[keep] @ pts["weight"]).sum() / signal  # fraction of the data's power not explained
        return {"loss": loss, "nll": nll.mean(), "prior": prior.mean(), "res2": res2[keep].detach(), "pts": pts,
                "residual": residual, "n_points": len(pts["weight"]), "n_pairs": len(image),
                "n_grad_pairs": len(image_g), "assigned": assigned}

    @torch.no_grad()
    def _update_noise(self, res2: torch.Tensor, pts: dict) -> None:
        """EMA of the per-shell residual power of the assigned classes (shells inside the current band)."""
        if self.hparams.noise_sigma is not None or len(res2) == 0:
            return
        n = self.noise_power.numel()
        total = torch.zeros(n, device=res2.device).index_add_(0, pts["shell"], res2.mean(0))
        count = torch.zeros(n, device=res2.device).index_add_(0, pts["shell"], torch.ones_like(pts["weight"]))
        seen = count > 0
        m = self.hparams.noise_momentum
        self.noise_power[seen] = m * self.noise_power[seen] + (1 - m) * total[seen] / count[seen]

    def training_step(self, batch: dict, batch_idx: int):
        if not bool(self.scales_set):
            full = self._points(self.D // 2, self.device)
            self._set_scales(self._observe(batch, full), full)
        progress = self._progress(batch_idx)
        radius = self.band_radius(progress)
        balanced = self.K > 1 and progress < self.hparams.warmup
        estep = self.K > 1 and not balanced and self._all_classes_epoch()
        if estep:  # every class for every image, in the low-resolution band where that is cheap
            radius = min(radius, max(2, round(self.hparams.estep_radius * self.D / 2)))
        out = self._loss(batch, radius, balanced or estep, balanced)
        optimisers = self.optimizers()
        optimisers = optimisers if isinstance(optimisers, list) else [optimisers]
        for opt in optimisers:
            opt.zero_grad()
        self.manual_backward(out["loss"])
        for opt in optimisers:
            opt.step()
        self._update_noise(out["res2"], out["pts"])
        B = batch["images"].shape[0]
        self.log_dict(
            {"train/loss": out["loss"].detach(), "train/nll_per_point": out["nll"] / out["n_points"],
             "train/residual": out["residual"],
             "train/radius": float(out["pts"]["shell"].max() + 1), "train/pairs_per_image": out["n_pairs"] / B,
             "train/grad_pairs_per_image": out["n_grad_pairs"] / B},
            prog_bar=False, on_step=True, on_epoch=True, batch_size=B,
        )
        return out["loss"].detach()

    # ---- evaluation contract ---------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, batch: dict) -> dict:
        params = self._infer(batch)
        probs = params["logits"].softmax(1) if params["logits"] is not None else None
        latent = params["mu"]
        if latent is not None and self.K == 1:
            latent = latent[:, 0]  # (B, d)
        return {"latent": latent, "class_probs": probs}

    @torch.no_grad()
    def decode(self, latent: torch.Tensor | None, classes: torch.Tensor | None) -> torch.Tensor:
        """Volumes (M, D, D, D) of classes (M,) at latents (M, d); latent None means the prior mean (zeros)."""
        M = len(classes) if classes is not None else (len(latent) if latent is not None else 1)
        if classes is None:
            classes = torch.zeros(M, dtype=torch.long)
        vols = []
        for m in range(M):
            z = None
            if self.d:
                z = latent[m].to(self.device) if latent is not None else torch.zeros(self.d, device=self.device)
            spectrum = self.field.volume_spectrum(z, int(classes[m]))
            vols.append(ifft3_center(spectrum).real / self.apix)
        return torch.stack(vols)

    # ---- outputs ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_outputs(self, out_dir: Path, datamodule) -> dict:
        """Per-class volumes and traversals, class assignments as STAR and pickles; returns the class sizes."""
        was_training = self.training
        self.eval()
        out_dir = Path(out_dir)
        emb = self.embed_all(datamodule.all_dataloader())
        order = torch.argsort(emb["index"])
        probs = emb["class_probs"][order] if emb["class_probs"] is not None else None
        N = len(order)
        classes = probs.argmax(1) if probs is not None else torch.zeros(N, dtype=torch.long)
        z = assigned_latent(emb["latent"][order], probs) if emb["latent"] is not None else None
        sizes = torch.bincount(classes, minlength=self.K)
        for k in range(self.K):
            members = torch.nonzero(classes == k).squeeze(1)
            save_pickle(out_dir / f"class_{k:03d}_indices.pkl", members.numpy().astype(np.int64))
            if len(members) == 0:
                continue
            zk = z[members] if z is not None else None
            centre = zk.mean(0, keepdim=True) if zk is not None else None
            vol = self.decode(centre, torch.tensor([k]))[0].cpu().numpy()
            write_mrc(out_dir / f"class_{k:03d}.mrc", vol, apix=self.apix)
            if zk is None or len(members) < 2 or self.hparams.traversal_steps < 2:
                continue
            # traversal along the class's first principal axis, 5th to 95th percentile of its scores
            _, _, vh = torch.linalg.svd((zk - centre).double(), full_matrices=False)
            axis = vh[0].float()
            axis = axis * torch.sign(axis[axis.abs().argmax()])  # reproducible direction
            lo, hi = torch.quantile((zk - centre) @ axis, torch.tensor([0.05, 0.95]))
            for j, s in enumerate(torch.linspace(float(lo), float(hi), self.hparams.traversal_steps)):
                zs = (centre[0] + s * axis)[None]
                vol = self.decode(zs, torch.tensor([k]))[0].cpu().numpy()
                write_mrc(out_dir / f"class_{k:03d}_traversal_{j:02d}.mrc", vol, apix=self.apix)
        save_pickle(out_dir / "classes.pkl", classes.numpy().astype(np.int64))
        if z is not None:
            save_pickle(out_dir / "z.pkl", z.numpy().astype(np.float32))
        max_prob = probs.max(1).values.numpy() if probs is not None else None
        self._write_star(out_dir / "particles_classes.star", classes.numpy(), datamodule, max_prob)
        if was_training:
            self.train()
        return {"class_sizes": sizes.tolist()}

    def _write_star(self, path: Path, classes: np.ndarray, datamodule, max_prob: np.ndarray | None = None) -> None:
        write_class_star(path, classes, self.info, datamodule, max_prob)
