"""Hierarchical part-aware Gaussian mixture (CryoSPIRE, Shekarforoush et al., NeurIPS 2025) and its ablations.

No public code exists for this method; this implementation follows the paper's description
(docs: ../shared/docs/domain.md §5). Known poses and CTF; per-image latents are auto-decoded (a table
row per image, SparseAdam) with the prior ``λ_z‖z‖²``.

Stages, run one after the other in one ``trainer.fit`` (epoch 0 is stage 0, then ``stage1_epochs`` of
stage 1, then ``stage2_epochs`` of stage 2). The optimisers of stages 1 and 2 (Adam + SparseAdam each) are
Lightning's (``configure_optimizers``), so a killed run resumes from ``last.ckpt`` like every method. At the
end of each stage the module also writes ``checkpoints/partgmm_stage{0,1,2}.pt`` into the run folder;
``model.resume=<that file>`` starts a new run after that stage, e.g. stage 2 with other settings (all
parameter shapes are fixed at construction, so a checkpoint always loads). Under DDP stage 0's sums are
added over ranks (``rank_summed_buffers``).

- Stage 0, consensus: one pass of the homogeneous Wiener backprojection (``models/backproject.py`` with
  ``use_labels=False``). Gaussians are seeded on its support — voxels above ``median + support_mads · MAD``
  of the non-zero voxels inside its sphere mask (a robust noise level of the mostly-solvent box) — uniformly, σ = half the mean spacing
  ``(support volume / n)^(1/3)`` (at least apix/2), then centres, σ and amplitudes are fitted to the
  consensus in 3D (``fit_steps`` Adam steps on voxelised Gaussians: a homogeneous Gaussian fit).
- Stage 1, part discovery: ``n_coarse`` Gaussians, each with a feature f_i (``feature_dim``); one MLP of
  ``[z, f_i]`` gives a shift (px, × apix → Å) and an amplitude-gate logit per Gaussian. A weak prior
  ``feature_reg · Σ‖f_i‖²`` keeps features that the data do not need near 0, so static Gaussians share
  one feature cluster. Then :func:`~cryobench_lab.models.components.parts.discover_anchors`: k-means++ into
  parts (``n_parts``, or a count up to ``max_parts`` by :func:`~cryobench_lab.models.components.parts.choose_k`),
  then k-means++ on positions inside each part; ``n_anchors`` in total, allocated by part size. Anchor = the coarse Gaussian nearest its
  centroid (its centre c_a and feature f̄_a). What is clustered (``part_space``): the paper clusters the
  features (``features``). The default ``response`` clusters what the features do instead: each
  Gaussian's shifts (weighted by its gate: an invisible Gaussian's shift changes nothing) and gates predicted by stage 1's network at 256 training latents, as a relative change
  of a Gaussian of the mixture's median width (:func:`~cryobench_lab.models.components.parts.response_profile`), reduced to its first
  ``max_parts − 1`` principal components (the span of up to ``max_parts`` part centroids). Gaussians that move and appear together are close there by
  construction; in feature space they need not be (adk: silhouette 0.2 for features vs 0.4 for
  responses, NMP merged into CORE; BENCHMARKS.md, issue 6).
- Stage 2, part-aware mixture: ``n_fine`` Gaussians, re-seeded and fitted like stage 0 but on the union
  of the states (the consensus rescaled by stage 1's gates so that density present in only some images
  is at full strength, :meth:`PartGMM.union_density`). Each belongs to the coarse Gaussian that puts the
  most density at its position when present (:meth:`PartGMM.coarse_owner`), takes that one's anchor and
  is stored as an offset o_i from the anchor's centre. It is
  warm-started from stage 1: Δf_i starts at (feature of its coarse Gaussian − f̄_a) and MLP_G at
  stage 1's MLP (same shape), so gates learned in stage 1 carry over. Per
  image, MLP_A([z, f̄_a]) → a rotation (quaternion vector part, real part 1) and a translation (px) per
  anchor; the PIVOT is the anchor's centre c_a. MLP_G([z, f_i]) with ``f_i = f̄_a + Δf_i`` → a residual
  displacement (px) and the gate logit (the gate shares MLP_G's hidden layers):
  ``x_i = c_a + R_a o_i + t_a + δ_i``, amplitude ``A_i · sigmoid(g_i)``; regulariser
  ``feature_reg · Σ‖Δf_i‖²``.

Ablations on the same module: ``hierarchy=false`` (``partgmm_flat``: no MLP_A, only per-Gaussian
displacements, ``x_i = c_a + o_i + δ_i``), ``n_anchors=64`` (``partgmm_oversegmented``),
``features=positional`` (``partgmm_posenc``: f_i a fixed Fourier encoding of the Gaussian's consensus
position — sin/cos of projections on ``feature_dim/2`` random directions at frequencies 1, 2, 4, 8 per box
length — instead of a learned feature; no feature regulariser).

Rendering: :func:`~cryobench_lab.models.components.gaussian_render.render_gaussians` (pixel-integrated like
``physics.gaussians.project_gaussians``, with per-image amplitudes), shifted by −t, times the CTF in
Fourier space. Loss per image: ``‖y − CTF·P(x, A)‖² / 2σ²`` (σ = ``noise_sigma`` in the data's
unit-std units, so the data term is a Gaussian log-likelihood in nats) + ``λ_z‖z‖²``; the global
feature terms are divided by the number of images so the per-batch loss is the full objective / N.

Per-Gaussian MLPs evaluate ``[z, f_i]`` for every (image, Gaussian) pair; their first layer is split as
``W_z z + W_f f_i`` (the same function), computed once per image and once per Gaussian.

Outputs (written when stage 2 ends, folder ``parts/``): ``parts.mrc`` (label map, 0 = solvent, p + 1 = part p),
``anchors.mrc`` (the same per anchor), ``gaussians.pdb`` (one atom per stage-2 Gaussian at its consensus
position, part in the B-factor column, anchor in the residue number's chain block: chain letter per part),
``parts.png`` (label map seen along z, y and x), ``parts.json`` (sizes; with ground-truth structures:
ARI of parts and anchors vs the nearest chain — or vs ``domains`` for a single chain — and per-state
mean amplitude gates over the Gaussians of present and absent chains; for several states of one
complex also ``coappearance_ari_vs_chain``, the ARI of grouping chains by the states they are present
in: when chains neither move nor appear separately, that is the ceiling of a part discovery).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import gemmi
import numpy as np
import torch
from torch import nn

from cryobench_lab.data.particles import DatasetInfo
from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import atomic_path, write_json_atomic
from cryobench_lab.io.mrc import write_mrc
from cryobench_lab.metrics.classes import classification_metrics
from cryobench_lab.models.backproject import Backprojection
from cryobench_lab.models.base import ReconstructionModule
from cryobench_lab.models.components.atoms import quaternion_vector_to_matrix
from cryobench_lab.models.components.gaussian_render import render_gaussians
from cryobench_lab.models.components.parts import discover_anchors, principal_components, response_profile
from cryobench_lab.physics.fft import fft2_center, ifft2_center
from cryobench_lab.physics.gaussians import voxelize_gaussians

FEATURES = ("learned", "positional")
PART_SPACES = ("response", "features")
RESPONSE_LATENTS = 256  # training latents at which part discovery samples stage 1's network
UNION_LATENTS = 1024  # training latents at which stage 2's seeding reads stage 1's gates
ON_QUANTILE = 0.95  # a Gaussian's gate "when present": it must be on in ≥ 5 % of the images to count
GATE_INIT_LOGIT = 3.0  # gates start at sigmoid(3) ≈ 0.95: every Gaussian present


class PairMLP(nn.Module):
    """MLP of ``[z, f]`` for every (image, item) pair: z ``(B, d)``, f ``(N, F)`` → ``(B, N, d_out)``.

    ``n_layers`` hidden layers of width ``hidden``; the first is ``W_z z + W_f f + b`` (= a linear layer on
    the concatenation). The output layer starts at zero (no motion), with bias ``out_bias`` (d_out,).
    """

    def __init__(self, d: int, f: int, hidden: int, n_layers: int, d_out: int, out_bias: list[float] | None = None):
        super().__init__()
        self.wz = nn.Linear(d, hidden)
        self.wf = nn.Linear(f, hidden, bias=False)
        layers: list[nn.Module] = []
        for _ in range(n_layers - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, d_out)
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            self.out.bias.copy_(torch.tensor(out_bias or [0.0] * d_out))

    def forward(self, z: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.wz(z)[:, None, :] + self.wf(f)[None, :, :])  # (B, N, hidden)
        return self.out(self.body(h))


class GaussianSet(nn.Module):
    """n isotropic Gaussians: ``centers (n, 3)`` Å, ``log_sigma (n,)`` (σ in Å), ``log_amp (n,)``."""

    def __init__(self, n: int):
        super().__init__()
        self.centers = nn.Parameter(torch.zeros(n, 3))
        self.log_sigma = nn.Parameter(torch.zeros(n))
        self.log_amp = nn.Parameter(torch.full((n,), -30.0))

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    @property
    def amp(self) -> torch.Tensor:
        return self.log_amp.exp()


def positional_features(x: torch.Tensor, dim: int, box_length: float, seed: int) -> torch.Tensor:
    """Fourier encoding of positions ``x (n, 3)`` Å → ``(n, dim)``: sin/cos of projections on ``dim/2``
    random unit directions, at 1, 2, 4, 8 cycles per ``box_length`` Å (cycled over the directions)."""
    g = torch.Generator().manual_seed(seed)
    n_freq = dim // 2
    dirs = torch.randn(n_freq, 3, generator=g)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    freqs = 2.0 ** (torch.arange(n_freq) % 4).float() / box_length  # cycles/Å
    phase = 2 * math.pi * (x @ dirs.T.to(x)) * freqs.to(x)  # (n, dim/2)
    return torch.cat([phase.sin(), phase.cos()], dim=1)


class PartGMM(ReconstructionModule):
    """Part-aware Gaussian mixture (CryoSPIRE) and its ablations; see the module docstring.

    Args (``model.*`` keys of conf/model/partgmm*.yaml):
        hierarchy: rigid per-anchor transforms (MLP_A) before the per-Gaussian residual; false = flat.
        features: ``learned`` (per-Gaussian learnable features) or ``positional`` (fixed encoding).
        feature_dim, latent_dim: F and d.
        n_coarse, n_fine: Gaussians in stages 1 and 2.
        part_space: what part discovery clusters: ``response`` (stage 1's predicted shifts and gates of each
            Gaussian over training latents) or ``features`` (the features themselves, as in the paper).
        n_parts: parts (None: a count in 2..max_parts by :func:`~cryobench_lab.models.components.parts.choose_k`); n_anchors: anchors in total.
        hidden_dim, n_layers: the per-Gaussian MLPs (stage 1, MLP_G); anchor_hidden, anchor_layers: MLP_A.
        latent_prior: λ_z; feature_reg: λ_f; noise_sigma: σ of the data term (unit-std image units).
        stage1_epochs, stage2_epochs: epochs of stages 1 and 2 (stage 0 is one pass).
        lr, gaussian_lr, latent_lr: Adam rates of the networks, of the Gaussians' parameters and features
            (centres step in units of apix), SparseAdam rate of the latent table.
        support_mads, fit_steps: consensus support threshold (MADs above the median) and Adam steps of
            the 3D Gaussian fit to the consensus.
        domains: {name: [first, last] residue} for part ARI on a single-chain structure (rest: CORE).
        resume: a ``partgmm_stage{k}.pt`` file; training restarts after stage k.
        seed: seeds features, latents, seeding and part discovery.
    """

    # DDP: stage 0's backprojection sums, added over ranks before the consensus is solved (callbacks/distributed.py)
    rank_summed_buffers = ("consensus_num", "consensus_den")

    def __init__(
        self,
        info: DatasetInfo,
        name: str = "partgmm",
        hierarchy: bool = True,
        features: str = "learned",
        part_space: str = "response",
        feature_dim: int = 24,
        latent_dim: int = 4,
        n_coarse: int = 512,
        n_fine: int = 2048,
        n_parts: int | None = None,
        max_parts: int = 12,
        n_anchors: int = 16,
        hidden_dim: int = 64,
        n_layers: int = 2,
        anchor_hidden: int = 128,
        anchor_layers: int = 3,
        latent_prior: float = 0.1,
        feature_reg: float = 0.01,
        noise_sigma: float = 1.0,
        stage1_epochs: int = 32,
        stage2_epochs: int = 6,
        lr: float = 1e-3,
        gaussian_lr: float = 1e-2,
        latent_lr: float = 0.2,
        support_mads: float = 3.0,
        fit_steps: int = 60,
        domains: dict | None = None,
        resume: str | None = None,
        seed: int = 0,
    ):
        super().__init__(info, name)
        if features not in FEATURES:
            raise ValueError(f"model.features must be one of {', '.join(FEATURES)}, got {features!r}")
        if part_space not in PART_SPACES:
            raise ValueError(f"model.part_space must be one of {', '.join(PART_SPACES)}, got {part_space!r}")
        if not info.has_poses:
            raise ValueError(f"model={name} uses known poses: pass data.poses= or a star/cs file with angles")
        if n_parts is not None and not 1 <= n_parts <= n_anchors:
            raise ValueError(f"model.n_parts must be in [1, n_anchors={n_anchors}] (each part needs an anchor), got {n_parts}")
        if feature_dim % 2:
            raise ValueError(f"model.feature_dim must be even (sin/cos pairs for features=positional), got {feature_dim}")
        self.save_hyperparameters(ignore=["info"])
        self.automatic_optimization = False
        torch.manual_seed(seed)
        F, d = feature_dim, latent_dim
        self.latents = nn.Embedding(info.n_particles, d, sparse=True)
        with torch.no_grad():
            self.latents.weight.copy_(torch.randn(info.n_particles, d, generator=torch.Generator().manual_seed(seed)) * 0.1)
        self.coarse = GaussianSet(n_coarse)
        self.fine = GaussianSet(n_fine)  # centers hold the offsets o_i from the Gaussian's anchor centre
        self.coarse_features = nn.Parameter(torch.randn(n_coarse, F) * 0.01, requires_grad=features == "learned")
        self.fine_dfeat = nn.Parameter(torch.zeros(n_fine, F), requires_grad=features == "learned")
        self.register_buffer("fine_pe", torch.zeros(n_fine, F))  # positional features of the fine Gaussians
        self.net1 = PairMLP(d, F, hidden_dim, n_layers, 4, [0.0, 0.0, 0.0, GATE_INIT_LOGIT])
        self.net_g = PairMLP(d, F, hidden_dim, n_layers, 4, [0.0, 0.0, 0.0, GATE_INIT_LOGIT])
        self.net_a = PairMLP(d, F, anchor_hidden, anchor_layers, 6) if hierarchy else None
        self.register_buffer("consensus", torch.zeros(self.D, self.D, self.D))
        self.register_buffer("support_threshold", torch.tensor(0.0))  # consensus density units
        self.register_buffer("anchor_centers", torch.zeros(n_anchors, 3))
        self.register_buffer("anchor_features", torch.zeros(n_anchors, F))
        self.register_buffer("anchor_part", torch.zeros(n_anchors, dtype=torch.long))
        self.register_buffer("coarse_part", torch.zeros(n_coarse, dtype=torch.long))
        self.register_buffer("coarse_anchor", torch.zeros(n_coarse, dtype=torch.long))
        self.register_buffer("fine_anchor", torch.zeros(n_fine, dtype=torch.long))
        self.register_buffer("stage_done", torch.tensor(-1))
        if resume:
            self._load_stage(resume)
        self._bp: list[Backprojection] = []  # stage-0 accumulator, kept out of the state dict
        self._standalone_opt: dict[int, tuple] = {}  # optimisers of step() called outside a Trainer
        self.fit_losses: list[float] = []  # squared error of the last 3D fit to the consensus, per step
        lengths = {0: 1, 1: stage1_epochs, 2: stage2_epochs}
        self._schedule = [s for s in (0, 1, 2) if s > int(self.stage_done) for _ in range(lengths[s])]
        self.default_epochs = max(1, len(self._schedule))

    # ---- stages ----------------------------------------------------------------------------------------
    def _load_stage(self, path: str) -> None:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            self.load_state_dict(ckpt["state_dict"])
        except (OSError, KeyError, RuntimeError) as err:
            raise InputError(f"model.resume: {path} is not a partgmm stage checkpoint of this configuration ({str(err).splitlines()[0]}); pass a checkpoints/partgmm_stage*.pt of the same model settings") from None

    def stage_of_epoch(self, epoch: int) -> int:
        return self._schedule[min(epoch, len(self._schedule) - 1)] if self._schedule else 2

    def setup(self, stage: str | None = None) -> None:
        self.train_on_every_particle()  # auto-decoded latents

    def configure_optimizers(self):
        # Stage 1's (Adam, SparseAdam), then stage 2's: Lightning owns all four, so last.ckpt holds their
        # states and the divergence guard sees every step (callbacks/reliability.py).
        return [*self.stage_optimisers(1), *self.stage_optimisers(2)]

    def stage_optimisers(self, stage: int) -> tuple:
        """New (Adam of the networks, Gaussians and features; SparseAdam of the latent table) of stage 1 or 2."""
        h = self.hparams
        if stage == 1:
            nets, gauss = list(self.net1.parameters()), [self.coarse.log_sigma, self.coarse.log_amp]
            centers, feats = self.coarse.centers, [self.coarse_features]
        else:
            nets = list(self.net_g.parameters()) + (list(self.net_a.parameters()) if self.net_a is not None else [])
            gauss, centers, feats = [self.fine.log_sigma, self.fine.log_amp], self.fine.centers, [self.fine_dfeat]
        groups = [{"params": nets, "lr": h.lr}, {"params": gauss, "lr": h.gaussian_lr},
                  {"params": [centers], "lr": h.gaussian_lr * self.apix}]
        if h.features == "learned":
            groups.append({"params": feats, "lr": h.gaussian_lr})
        return torch.optim.Adam(groups), torch.optim.SparseAdam([self.latents.weight], lr=h.latent_lr)

    def _optimisers(self, stage: int) -> tuple:
        if self._trainer is not None:
            return tuple(self.optimizers()[2 * (stage - 1) : 2 * stage])
        if stage not in self._standalone_opt:
            self._standalone_opt[stage] = self.stage_optimisers(stage)
        return self._standalone_opt[stage]

    def training_step(self, batch: dict, batch_idx: int):
        stage = self.stage_of_epoch(self.current_epoch)
        if stage == 0:
            self.consensus_step(batch)
            return None
        out = self.step(batch, stage)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True, on_step=True, on_epoch=False,
                      batch_size=batch["images"].shape[0])
        self.log("train/stage", float(stage), on_step=True, on_epoch=False)
        return out["loss"]  # the divergence guard checks it

    def on_train_epoch_end(self) -> None:
        stage = self.stage_of_epoch(self.current_epoch)
        last_of_stage = self.current_epoch + 1 >= len(self._schedule) or self.stage_of_epoch(self.current_epoch + 1) != stage
        if last_of_stage and stage > int(self.stage_done):
            self.finish_stage(stage)
            out_dir = Path(self.trainer.default_root_dir)
            self.save_stage(out_dir / "checkpoints" / f"partgmm_stage{stage}.pt")
            datamodule = getattr(self.trainer, "datamodule", None)
            if stage == 2 and datamodule is not None:
                self.write_outputs(out_dir / "parts", datamodule)

    def save_stage(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # a later resume trusts this file
            torch.save({"state_dict": self.state_dict(), "stage": int(self.stage_done), "hparams": dict(self.hparams)}, tmp)

    @property
    def consensus_num(self) -> torch.Tensor:
        return self._bp[0].num if self._bp else torch.zeros(0, device=self.device)

    @property
    def consensus_den(self) -> torch.Tensor:
        return self._bp[0].den if self._bp else torch.zeros(0, device=self.device)

    def consensus_step(self, batch: dict) -> None:
        """Stage 0: add a batch to the homogeneous backprojection."""
        if not self._bp:
            self._bp.append(Backprojection(self.info, use_labels=False).to(self.device))
        with torch.no_grad():
            self._bp[0].training_step(batch, 0)

    @torch.no_grad()
    def finish_stage(self, stage: int) -> None:
        """End of a stage: 0 → consensus and coarse seeding; 1 → part discovery and fine seeding."""
        if stage == 0:
            self._bp[0].solve()
            self.consensus.copy_(self._bp[0].volumes[0])
            self._bp.clear()
            # Robust noise level over the voxels the reconstruction defines: the backprojection's sphere
            # mask zeroes about half the box, and those exact zeros would collapse the MAD to ~0.
            v = self.consensus[self.consensus != 0]
            med = v.median()
            self.support_threshold.copy_(med + self.hparams.support_mads * 1.4826 * (v - med).abs().median())
            self._seed(self.coarse, self.hparams.seed)
        elif stage == 1:
            self.discover_parts()
        self.stage_done.fill_(stage)

    def _seed(self, gs: GaussianSet, seed: int, density: torch.Tensor | None = None) -> torch.Tensor:
        """Seed ``gs`` uniformly on the support of ``density`` (D, D, D) in consensus units (default: the
        consensus) and fit it to that density; returns centres (n, 3) Å."""
        D, apix = self.D, self.apix
        density = self.consensus if density is None else density
        support = torch.nonzero(density > self.support_threshold)  # (m, 3) as [z, y, x]
        if len(support) == 0:
            raise InputError("stage 0: the consensus reconstruction has no density above its noise level; check data.invert and the poses")
        n = gs.centers.shape[0]
        g = torch.Generator().manual_seed(seed)
        pick = support[torch.randint(len(support), (n,), generator=g)].flip(1).float()  # (n, 3) [x, y, z] px
        centers = (pick - D // 2 + torch.rand(n, 3, generator=g) - 0.5) * apix  # Å
        spacing = (len(support) * apix**3 / n) ** (1.0 / 3.0)
        sigma = max(0.5 * spacing, 0.5 * apix)
        target = density / apix  # projections of V/apix voxelised match the images (voxelize_gaussians)
        mean_density = float(target[density > self.support_threshold].mean())
        amp0 = max(mean_density, 1e-6) * spacing**3 / ((2 * math.pi) ** 1.5 * sigma**3)
        gs.centers.copy_(centers)
        gs.log_sigma.fill_(math.log(sigma))
        gs.log_amp.fill_(math.log(amp0))
        with torch.enable_grad():
            opt = torch.optim.Adam([{"params": [gs.log_amp, gs.log_sigma], "lr": 0.05}, {"params": [gs.centers], "lr": 0.1 * apix}])
            self.fit_losses = []
            for _ in range(self.hparams.fit_steps):
                vol = voxelize_gaussians(gs.centers, gs.sigma, gs.amp, D, apix)
                loss = ((vol - target) ** 2).sum()
                self.fit_losses.append(float(loss.detach()))
                opt.zero_grad()
                loss.backward()
                opt.step()
        return gs.centers.detach().clone()

    @torch.no_grad()
    def discover_parts(self) -> dict:
        """Cluster the coarse Gaussians into parts, then by position into anchors; re-seed the fine mixture."""
        h = self.hparams
        feats = self._coarse_features()
        # every part needs an anchor: at most n_anchors parts
        max_parts = min(h.n_parts or h.max_parts, h.n_anchors)
        # the centroids of k clusters span k − 1 dimensions: that many principal components keep every
        # between-part difference of up to max_parts parts and drop the rest as noise
        space = feats.cpu().numpy() if h.part_space == "features" else principal_components(self.coarse_response(), max_parts - 1)
        found = discover_anchors(space, self.coarse.centers.cpu().numpy(), h.n_parts, h.n_anchors, max_parts, h.seed)
        K = len(found["anchor_index"])
        idx = torch.from_numpy(found["anchor_index"]).to(self.device)
        self.anchor_centers.zero_()
        self.anchor_features.zero_()
        self.anchor_centers[:K] = self.coarse.centers[idx]
        self.anchor_features[:K] = feats[idx]
        self.anchor_part[:K] = torch.from_numpy(found["anchor_part"]).to(self.device)
        self.coarse_part.copy_(torch.from_numpy(found["part"]))
        self.coarse_anchor.copy_(torch.from_numpy(found["anchor"]))
        on, mean = self.coarse_gates()
        positions = self._seed(self.fine, h.seed + 1, self.union_density(on, mean))  # (n2, 3) Å, box frame
        owner = self.coarse_owner(positions, on)  # (n2,)
        self.fine_anchor.copy_(self.coarse_anchor[owner])
        self.fine.centers.sub_(self.anchor_centers[self.fine_anchor])  # stored relative to the anchor
        # Stage 2 starts from what stage 1 learned: each fine Gaussian takes the feature of the coarse Gaussian
        # whose density it sits in (as an offset from its anchor's) and MLP_G starts as stage 1's network, so
        # the gates and displacements begin where stage 1 left them instead of being learned again from zero.
        self.fine_dfeat.copy_(feats[owner] - self.anchor_features[self.fine_anchor])
        if h.features == "positional":
            self.fine_dfeat.zero_()
            self.fine_pe.copy_(positional_features(positions, h.feature_dim, self.D * self.apix, h.seed))
        self.net_g.load_state_dict(self.net1.state_dict())
        return found

    @torch.no_grad()
    def stage1_outputs(self, n_latents: int) -> torch.Tensor:
        """Stage 1's network at ``n_latents`` training latents drawn with the model's seed (the first k of one
        fixed permutation, so fewer latents are a subset of more) → ``(L, n_coarse, 4)``: shift (px) and
        gate logit of every coarse Gaussian."""
        n = self.latents.num_embeddings
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.seed))[:n_latents]
        feats = self._coarse_features()
        return torch.cat([self.net1(z, feats) for z in self.latents.weight[pick.to(self.device)].split(256)])

    @torch.no_grad()
    def coarse_gates(self, n_latents: int = UNION_LATENTS) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1's gate of every coarse Gaussian over ``n_latents`` training latents drawn with the model's
        seed → (gate when present: its ``ON_QUANTILE``, mean gate), each ``(n_coarse,)``."""
        gates = torch.sigmoid(self.stage1_outputs(n_latents)[..., 3])  # (L, n1)
        return torch.quantile(gates, ON_QUANTILE, dim=0), gates.mean(0)

    @torch.no_grad()
    def union_density(self, on: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """The consensus as the union of the states → (D, D, D), consensus units, from the coarse gates
        ``on`` and ``mean`` (n_coarse,) of :meth:`coarse_gates`.

        The consensus averages the states, so a chain present in 1 image of 9 is at 1/9 of its density
        there: stage 2 seeded on it would put few, faint Gaussians on that chain, and their gates barely
        touch the loss. The consensus is rescaled voxel by voxel by (coarse mixture with the gates ``on``) /
        (the same with the gates ``mean``), so density that appears in some states is seeded at its full
        value. Where every Gaussian is always on, the ratio is 1 and this is the consensus.
        """
        c, sigma, amp = self.coarse.centers, self.coarse.sigma, self.coarse.amp
        full = voxelize_gaussians(c, sigma, amp * on, self.D, self.apix)
        avg = voxelize_gaussians(c, sigma, amp * mean, self.D, self.apix)
        eps = 0.01 * avg.max()  # keeps the ratio at 1 in the solvent, where both mixtures vanish
        return self.consensus * (full + eps) / (avg + eps)

    @torch.no_grad()
    def coarse_owner(self, positions: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """For each position ``(n, 3)`` Å, the coarse Gaussian contributing most density there when present
        (amplitude × ``on`` gate × its profile) → ``(n,)`` indices. Not simply the nearest centre: stage 1
        covers a chain it rarely sees with a few wide Gaussians, and a small always-on Gaussian nearby would
        otherwise hand its gate to the fine Gaussians around its centre."""
        sigma = self.coarse.sigma
        r2 = torch.cdist(positions, self.coarse.centers) ** 2  # (n, n1)
        log_density = (self.coarse.amp * on).clamp_min(1e-30).log() - r2 / (2 * sigma**2)
        return log_density.argmax(1)

    @torch.no_grad()
    def coarse_response(self, n_latents: int = RESPONSE_LATENTS) -> np.ndarray:
        """Stage 1's response profile of every coarse Gaussian (:func:`response_profile`) over ``n_latents``
        training latents drawn with the model's seed → ``(n_coarse, 4 · n_latents)``."""
        out = self.stage1_outputs(n_latents)  # (L, n_coarse, 4)
        return response_profile((out[..., :3] * self.apix).cpu().numpy(), torch.sigmoid(out[..., 3]).cpu().numpy(),
                                float(self.coarse.sigma.median()))

    # ---- model -----------------------------------------------------------------------------------------
    def _coarse_features(self) -> torch.Tensor:
        if self.hparams.features == "positional":
            return positional_features(self.coarse.centers.detach(), self.hparams.feature_dim, self.D * self.apix, self.hparams.seed)
        return self.coarse_features

    def _fine_features(self) -> torch.Tensor:
        if self.hparams.features == "positional":
            return self.fine_pe
        return self.anchor_features[self.fine_anchor] + self.fine_dfeat

    def mixture(self, z: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gaussians of latents z (B, d) at a stage (1 or 2) → centres (B, n, 3) Å, σ (n,) Å, amplitudes
        (B, n) and gates (B, n)."""
        if stage == 1:
            out = self.net1(z, self._coarse_features())  # (B, n1, 4)
            centers = self.coarse.centers + out[..., :3] * self.apix
            gate = torch.sigmoid(out[..., 3])
            return centers, self.coarse.sigma, self.coarse.amp * gate, gate
        anchors = self.anchor_centers[self.fine_anchor]  # (n2, 3) pivots
        if self.net_a is not None:
            out_a = self.net_a(z, self.anchor_features)  # (B, K, 6)
            rot = quaternion_vector_to_matrix(out_a[..., :3])[:, self.fine_anchor]  # (B, n2, 3, 3)
            trans = out_a[..., 3:][:, self.fine_anchor] * self.apix  # (B, n2, 3) Å
            centers = anchors + torch.einsum("bnij,nj->bni", rot, self.fine.centers) + trans
        else:
            centers = (anchors + self.fine.centers).expand(z.shape[0], -1, -1)
        out = self.net_g(z, self._fine_features())  # (B, n2, 4)
        centers = centers + out[..., :3] * self.apix
        gate = torch.sigmoid(out[..., 3])
        return centers, self.fine.sigma, self.fine.amp * gate, gate

    def render(self, z: torch.Tensor, batch: dict, stage: int) -> torch.Tensor:
        """Images of latents z (B, d) in each image's pose, shift and CTF → (B, D, D)."""
        centers, sigma, amp, _ = self.mixture(z, stage)
        shifts = -batch["trans"] if "trans" in batch else None
        img = render_gaussians(centers, sigma, amp, batch["rot"], self.D, self.apix, shifts)
        ctf = self.ctf(batch)
        return img if ctf is None else ifft2_center(fft2_center(img) * ctf).real

    def losses(self, batch: dict, stage: int) -> dict:
        h = self.hparams
        z = self.latents(batch["index"])
        pred = self.render(z, batch, stage)
        sq = ((pred - batch["images"]) ** 2).sum((1, 2))  # (B,)
        nll = sq.mean() / (2 * h.noise_sigma**2)
        prior = h.latent_prior * (z**2).sum(1).mean()
        if h.features == "learned":
            f = self.coarse_features if stage == 1 else self.fine_dfeat
            reg = h.feature_reg * (f**2).sum() / self.info.n_particles
        else:
            reg = nll.new_zeros(())
        return {"loss": nll + prior + reg, "nll": nll, "prior": prior, "feature_reg": reg,
                "mse": sq.mean().detach() / self.D**2}

    def step(self, batch: dict, stage: int) -> dict:
        """One optimisation step of stage 1 or 2 on a batch; returns the (detached) loss terms."""
        dense, sparse = self._optimisers(stage)
        out = self.losses(batch, stage)
        dense.zero_grad()
        sparse.zero_grad()
        if self._trainer is not None:
            self.manual_backward(out["loss"])  # under DDP this is where gradients are all-reduced
        else:
            out["loss"].backward()
        dense.step()
        sparse.step()
        return {k: v.detach() for k, v in out.items()}

    # ---- evaluation contract -----------------------------------------------------------------------------
    def embed(self, batch: dict) -> dict:
        return {"latent": self.latents(batch["index"]).detach(), "class_probs": None}

    def _current_stage(self) -> int:
        return min(2, int(self.stage_done))

    @torch.no_grad()
    def decode(self, latent: torch.Tensor | None, classes: torch.Tensor | None) -> torch.Tensor:
        stage = self._current_stage()
        if latent is None:
            latent = torch.zeros(1 if classes is None else len(classes), self.hparams.latent_dim)
        latent = latent.to(self.device)
        if stage < 1:  # nothing but the consensus yet
            return self.consensus.expand(len(latent), -1, -1, -1).clone()
        vols = []
        for z in latent:
            centers, sigma, amp, _ = self.mixture(z[None], stage)
            vols.append(voxelize_gaussians(centers[0], sigma, amp[0], self.D, self.apix))
        return torch.stack(vols)

    # ---- outputs ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def fine_positions(self) -> torch.Tensor:
        """Consensus positions of the stage-2 Gaussians (anchor centre + offset) → (n2, 3) Å, box frame."""
        return self.anchor_centers[self.fine_anchor] + self.fine.centers

    @torch.no_grad()
    def label_map(self, labels: torch.Tensor) -> torch.Tensor:
        """Voxel labels (D, D, D) int: 0 where the stage-2 consensus mixture is below the support threshold,
        else 1 + the label (of ``labels (n2,)``) whose Gaussians contribute most density to the voxel."""
        pos, sigma, amp = self.fine_positions(), self.fine.sigma, self.fine.amp
        per = torch.stack([voxelize_gaussians(pos[labels == k], sigma[labels == k], amp[labels == k], self.D, self.apix)
                           for k in range(int(labels.max()) + 1)])  # (L, D, D, D)
        inside = per.sum(0) > self.support_threshold / self.apix
        return torch.where(inside, per.argmax(0) + 1, torch.zeros_like(inside, dtype=torch.long))

    @torch.no_grad()
    def write_outputs(self, out_dir: Path, datamodule=None) -> dict:
        """Label maps, the Gaussians as a PDB, a figure and ``parts.json`` (see the module docstring)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        part = self.anchor_part[self.fine_anchor]
        parts_map = self.label_map(part)
        write_mrc(out_dir / "parts.mrc", parts_map.float().cpu().numpy(), self.apix)
        write_mrc(out_dir / "anchors.mrc", self.label_map(self.fine_anchor).float().cpu().numpy(), self.apix)
        write_gaussians_pdb(out_dir / "gaussians.pdb", self.fine_positions().cpu().numpy(), part.cpu().numpy(), self.fine_anchor.cpu().numpy())
        plot_label_map(out_dir / "parts.png", parts_map.cpu().numpy(), self.apix)
        summary = {"n_parts": int(part.max()) + 1, "n_anchors": int(self.fine_anchor.max()) + 1,
                   "part_sizes": torch.bincount(part).tolist()}
        if datamodule is not None:
            summary.update(self.part_scores(datamodule))
        write_json_atomic(out_dir / "parts.json", summary, indent=1)
        print(f"[cryobench_lab] {self.method_name} parts: " + "  ".join(
            f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float)), file=sys.stderr)
        return summary

    @torch.no_grad()
    def part_scores(self, datamodule) -> dict:
        """Part ARI vs the nearest chain (or domain) and per-state gate means, when ground-truth structures
        exist (``gt_structures``/``state_XXX``). Gaussians farther than 2·apix from every atom are skipped."""
        from scipy.spatial import cKDTree

        from cryobench_lab.io.structures import read_structure

        folder = getattr(self.info, "gt_structures", None)
        files = sorted(Path(folder).glob("state_*.*")) if folder else []
        if not files:
            return {}
        states = [read_structure(f) for f in files]
        coords = np.concatenate([s.atom_coords for s in states])
        chains = np.concatenate([s.atom_chain_ids for s in states]).astype(str)
        residues = np.concatenate([s.atom_residue_numbers for s in states])
        dist, nearest = cKDTree(coords).query(self.fine_positions().cpu().numpy())
        near = dist <= 2 * self.apix
        scores: dict = {"gaussians_near_atoms": int(near.sum())}
        chain_ids = sorted(set(chains.tolist()))
        if len(chain_ids) > 1:
            truth, truth_name = np.searchsorted(chain_ids, chains[nearest]), "chain"
        elif self.hparams.domains:
            truth = np.zeros(len(nearest), np.int64)
            for k, (lo, hi) in enumerate(self.hparams.domains.values(), start=1):
                truth[(residues[nearest] >= lo) & (residues[nearest] <= hi)] = k
            truth_name = "domain"
        else:
            return scores
        part = self.anchor_part[self.fine_anchor].cpu().numpy()
        anchor = self.fine_anchor.cpu().numpy()
        for name, labels in (("part", part), ("anchor", anchor)):
            scores[f"{name}_ari_vs_{truth_name}"] = float(classification_metrics(labels[near], truth[near])["ari"])
        if truth_name == "chain" and len(states) > 1:
            # Chains that are present in exactly the same states cannot be told apart by composition: the
            # partition into such groups is the best ARI a rigid assembly's data support
            pattern = {c: tuple(c in set(st.atom_chain_ids.astype(str).tolist()) for st in states) for c in chain_ids}
            groups = {pat: g for g, pat in enumerate(sorted(set(pattern.values())))}
            co = np.array([groups[pattern[c]] for c in chains[nearest]])
            scores["coappearance_ari_vs_chain"] = float(classification_metrics(co[near], truth[near])["ari"])
        if truth_name == "chain" and self.info.labels is not None:
            emb = self.embed_all(datamodule.all_dataloader())
            z = emb["latent"][torch.argsort(emb["index"])]
            labels = np.asarray(self.info.labels)
            gates = {}
            for s, st in enumerate(states[: self.info.n_states]):
                if not (labels == s).any():
                    continue
                zs = z[torch.from_numpy(labels == s)].mean(0, keepdim=True).to(self.device)
                gate = self.mixture(zs, 2)[3][0].cpu().numpy()
                present = np.isin(chains[nearest], np.unique(st.atom_chain_ids.astype(str)))
                gates[s] = {"present": float(gate[near & present].mean()) if (near & present).any() else None,
                            "absent": float(gate[near & ~present].mean()) if (near & ~present).any() else None}
            scores["gates"] = gates
            absent = [g["absent"] for g in gates.values() if g["absent"] is not None]
            present = [g["present"] for g in gates.values() if g["present"] is not None]
            scores["gate_absent_max"] = max(absent) if absent else float("nan")
            scores["gate_present_min"] = min(present) if present else float("nan")
        return scores


def write_gaussians_pdb(path: Path, positions: np.ndarray, part: np.ndarray, anchor: np.ndarray) -> None:
    """Gaussians as a PDB point file: one CA atom per Gaussian (residue ``GAU``), part in the B-factor
    column, chain letter per part (A, B, …, cycling after 62), residue number = anchor·1000 + rank within
    the anchor (so each anchor is a numbered block)."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    st = gemmi.Structure()
    model = gemmi.Model("1")
    rank = np.zeros(len(part), np.int64)
    for a in np.unique(anchor):
        rank[anchor == a] = np.arange((anchor == a).sum())
    for p in np.unique(part):
        chain = gemmi.Chain(letters[int(p) % len(letters)])
        for i in np.flatnonzero(part == p):
            res = gemmi.Residue()
            res.name = "GAU"
            res.seqid = gemmi.SeqId(int(anchor[i] * 1000 + rank[i]) % 10000, " ")
            atom = gemmi.Atom()
            atom.name, atom.element = "CA", gemmi.Element("C")
            atom.pos = gemmi.Position(*map(float, positions[i]))
            atom.b_iso, atom.occ = float(p), 1.0
            res.add_atom(atom)
            chain.add_residue(res)
        model.add_chain(chain)
    st.add_model(model)
    st.write_pdb(str(path))


def plot_label_map(path: Path, labels: np.ndarray, apix: float) -> Path:
    """Part label map (D, D, D) [z, y, x] seen along z, y and x: each pixel shows the label of the first
    non-zero voxel along the ray (a surface view), one colour per part."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from cryobench_lab.plots import save_figure

    D = labels.shape[0]
    n = int(labels.max())
    cmap = colormaps["tab20"].resampled(max(n, 1))
    extent = ((-(D // 2) - 0.5) * apix, (D - D // 2 - 0.5) * apix) * 2
    fig = Figure(figsize=(11.0, 3.8), dpi=110, layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, axis, (h, v) in zip(axes, (0, 1, 2), (("x", "y"), ("x", "z"), ("y", "z"))):
        vol = np.moveaxis(labels, axis, 0)
        first = np.argmax(vol > 0, axis=0)
        view = np.take_along_axis(vol, first[None], 0)[0].astype(float)
        rgba = cmap((view - 1) / max(n - 1, 1))
        rgba[view == 0] = (1, 1, 1, 1)
        ax.imshow(rgba, origin="lower", extent=extent)
        ax.set_title(f"parts seen along {'zyx'[axis]}")
        ax.set_xlabel(f"{h} (Å)")
        ax.set_ylabel(f"{v} (Å)")
    fig.suptitle(f"{n} parts (colour = part)")
    return save_figure(fig, path)
