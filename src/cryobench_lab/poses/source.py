"""Estimated poses as a pose source: per-image pose tables filled by a search, then refined by SGD (pure torch).

A pose source is a module ``forward(batch) -> (rot, trans)`` (:class:`KnownPoses` below): ``rot (B, 3, 3)``
or per class ``(B, K, 3, 3)``, ``trans (B, 2)`` px, the re-centring shift of docs/conventions.md.
:class:`SearchedPoses` keeps a rotation per image and class and a shift per image, and changes them on a
schedule of training epochs (:class:`PoseSchedule`):

1. ``pretrain_epochs``: random rotations (uniform on SO(3), fixed per image and class), zero shifts, so the
   fields learn the rotationally averaged low-resolution structure;
2. ``global_epochs``: the first time an image is seen in an epoch, it is searched in every class over the
   whole of SO(3) × shifts (:class:`~cryobench_lab.poses.search.PoseSearch`) against the class's field
   rendered at its latent centroid; the field keeps training between batches, so later batches are
   searched against a better volume (stochastic ab initio);
3. ``local_epochs``: the same, as a local search around the current pose;
4. after those, refinement: the model's optimiser moves a per-image axis-angle correction of every class's
   rotation and a shift correction (``param_groups``) by the gradient of the model's loss.

The image's shift is the one found in the class where the search's energy is lowest.

References (``reference``), rebuilt at most every ``render_every`` searched batches:

- ``field``: the model's field of the class rendered at its latent centroid (:func:`render_spectrum`);
- ``table`` (default): for the first ``field_epochs`` searched epochs the field as above, afterwards the
  Wiener backprojection of the pose table itself: every searched image is kept, within the search band, in
  the Fourier sums of the class the model assigns it to (``attach(..., assigned_class=)``), at its current
  pose, and a new search result replaces the image's old contribution; the sums are kept per half set
  (even/odd index) and solved with the half maps' FSC as the Wiener filter
  (:func:`physics.backprojection.wiener_solve`).

Why both, in that order (measured, BENCHMARKS.md, issue 9): from random poses, projection matching against
the table's own backprojection locks in noise-driven poses (adk: 66° median error after 6 epochs), while the
field, an MLP trained by SGD, is a smoothed running average that finds the fold (13° after 2 epochs). That
averaging then lags the assignments by epochs, which is what a pseudo-symmetric particle cannot afford: its
images start spread over symmetry-related orientations, and only a reference that follows the majority at
once pulls the rest into it (7PBL's pseudo-6-fold ring: 8 field-referenced epochs left it split 406/237/209
over orientations 60° apart; 3 rounds against the table's backprojection from there put 989 of 1000 in one,
bench/table_consolidation.py).
It is the usual order of an SGD ab initio followed by projection-matching refinement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Callable

import torch
from torch import nn

from cryobench_lab.physics.backprojection import wiener_solve
from cryobench_lab.physics.ctf import ctf_from_params
from cryobench_lab.physics.fft import fft2_center, ifft3_center
from cryobench_lab.physics.lattice import freq_grid_2d, freq_grid_3d
from cryobench_lab.physics.rotations import axis_angle_to_matrix, random_rotations
from cryobench_lab.physics.shift import phase_shift_2d
from cryobench_lab.physics.slicing import insert_slices, volume_spectrum
from cryobench_lab.poses.search import PoseSearch, SearchConfig


class KnownPoses(nn.Module):
    """The poses the data carries (consensus refinement or simulation)."""

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["rot"], batch["trans"]


@dataclass
class PoseSchedule:
    """The ``poses.*`` keys of conf/poses/search.yaml (epochs count from 0)."""

    pretrain_epochs: int = 1
    global_epochs: int = 2
    local_epochs: int = 2
    local_step_deg: float = 3.75  # first step of the local search (then halved twice)
    render_every: int = 4  # searched batches between rebuilds of the search references
    lr_rot: float = 0.01  # SparseAdam rate of the rotation corrections (radians)
    lr_trans: float = 0.1  # SparseAdam rate of the shift corrections (px)
    reference: str = "table"  # what images are searched against: "table" or "field" (module docstring)
    field_epochs: int = 5  # reference "table": searched epochs against the field before the table takes over
    search: SearchConfig = field(default_factory=SearchConfig)

    def phase(self, epoch: int) -> str:
        """``pretrain``, ``global``, ``local`` or ``refine`` at ``epoch``."""
        if epoch < self.pretrain_epochs:
            return "pretrain"
        if epoch < self.pretrain_epochs + self.global_epochs:
            return "global"
        if epoch < self.pretrain_epochs + self.global_epochs + self.local_epochs:
            return "local"
        return "refine"

    def __post_init__(self):
        if self.reference not in ("table", "field"):
            raise ValueError(f"poses.reference must be 'table' or 'field', got {self.reference!r}")
        if self.field_epochs < 1:
            raise ValueError("poses.field_epochs must be ≥ 1: the table is filled by a search against the fields")


def build_pose_source(cfg: dict | None, n_images: int, n_classes: int, box_size: int, apix: float,
                      has_poses: bool, seed: int = 0) -> nn.Module:
    """The pose source a ``poses`` config names: ``source: given`` (:class:`KnownPoses`, the data's poses;
    default when ``cfg`` is None) or ``source: search`` (:class:`SearchedPoses`). The other keys are those of
    :class:`PoseSchedule` and :class:`~cryobench_lab.poses.search.SearchConfig`, flat."""
    cfg = dict(cfg or {})
    source = cfg.pop("source", "given")
    if source == "given":
        if not has_poses:
            raise ValueError("the data carry no poses: pass data.poses=<pickle>, a star/cs file with angles, "
                             "or estimate them with poses=search")
        return KnownPoses()
    if source != "search":
        raise ValueError(f"poses.source must be 'given' or 'search', got {source!r}")
    search_keys = {f.name for f in fields(SearchConfig)}
    search = SearchConfig(**{k: cfg.pop(k) for k in list(cfg) if k in search_keys})
    return SearchedPoses(n_images, n_classes, box_size, apix, PoseSchedule(**cfg, search=search), seed=seed)


def render_spectrum(values: Callable[[torch.Tensor], torch.Tensor], D: int, radius: float, pad: int = 2) -> torch.Tensor:
    """Oversampled centred spectrum ``(pad·D,)*3`` of a field known as a function of frequency.

    ``values(coords (Q, 3)) -> complex (Q,)`` gives the field at integer frequencies [kx, ky, kz]
    (cycles/box); it is evaluated within ``|k| ≤ radius + 1`` only (the band a search uses, plus the
    neighbours trilinear interpolation touches), zero elsewhere, then brought to real space and zero-padded
    ``pad``-fold (:func:`physics.slicing.volume_spectrum`), which keeps the values at the integer
    frequencies and interpolates between them as for a volume confined to the box.
    """
    grid = freq_grid_3d(D)  # (D, D, D, 3)
    inside = grid.norm(dim=-1) <= radius + 1
    spectrum = torch.zeros(D, D, D, dtype=torch.complex64)
    spectrum[inside] = values(grid[inside]).to(torch.complex64).cpu()
    return volume_spectrum(ifft3_center(spectrum).real, pad)


class SearchedPoses(nn.Module):
    """Per-image poses from a search and SGD refinement; see the module docstring.

    Args:
        n_images, n_classes: table sizes (one rotation per image and class, one shift per image).
        box_size, apix: D (px) and Å/px of the training images.
        schedule: :class:`PoseSchedule` (or its keys as a dict).
        seed: seeds the random initial rotations.

    Before training, :meth:`attach` gives it the model's class fields, noise power and epoch counter.
    """

    def __init__(self, n_images: int, n_classes: int, box_size: int, apix: float,
                 schedule: PoseSchedule | dict | None = None, seed: int = 0):
        super().__init__()
        self.schedule = schedule if isinstance(schedule, PoseSchedule) else PoseSchedule(**(schedule or {}))
        self.K, self.D, self.apix = n_classes, box_size, apix
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("rot", random_rotations(n_images * n_classes, generator=g).reshape(n_images, n_classes, 3, 3))
        self.register_buffer("trans", torch.zeros(n_images, 2))
        # epoch in which each image was last searched (−1: never)
        self.register_buffer("searched_epoch", torch.full((n_images,), -1, dtype=torch.long))
        self.rot_delta = nn.Embedding(n_images, n_classes * 3, sparse=True)
        self.trans_delta = nn.Embedding(n_images, 2, sparse=True)
        nn.init.zeros_(self.rot_delta.weight)
        nn.init.zeros_(self.trans_delta.weight)
        # the table reference: Fourier sums Σ CTF·Y and Σ CTF² per class over a box Db that holds the search
        # band (empty with reference "field"), and the class each image is in (−1: none yet)
        cfg = self.schedule.search
        self.band = max(cfg.min_radius, cfg.max_radius * box_size / 2)  # px, the search's largest band radius
        Db = min(box_size, 2 * (math.ceil(self.band) + 2)) if self.schedule.reference == "table" else 0
        # (K, 2 half sets, Db, Db, Db): the half sets (even/odd image index) give the FSC that weights the solve
        self.register_buffer("table_num", torch.zeros(n_classes, 2, Db, Db, Db, dtype=torch.complex64))
        self.register_buffer("table_den", torch.zeros(n_classes, 2, Db, Db, Db))
        self.register_buffer("table_class", torch.full((n_images,), -1, dtype=torch.long))
        self._class_values: Callable | None = None
        self._noise_power: Callable | None = None
        self._epoch: Callable[[], int] = lambda: 0
        self._search_classes: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._assigned_class: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._searchers: list[PoseSearch] | None = None
        self._since_render = 0

    def attach(self, class_values: Callable[[torch.Tensor, int], torch.Tensor],
               noise_power: Callable[[], torch.Tensor] | None, epoch: Callable[[], int],
               search_classes: Callable[[torch.Tensor], torch.Tensor] | None = None,
               assigned_class: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``class_values(coords (Q, 3), k) -> complex (Q,)``: class k's current field (the model's prediction
        before CTF) at frequencies in cycles/box; ``noise_power() -> (D//2 + 1,)`` the per-shell noise power of
        the centred image spectra (None: white, 1); ``epoch() -> int`` the current training epoch;
        ``search_classes(index (b,)) -> bool (b, K)`` the classes to search each image in (None: all; an image
        keeps its previous poses in the others); ``assigned_class(index (b,)) -> long (b,)`` the class each
        image belongs to, whose table reference it joins (None: the class where the search fitted it best)."""
        self._class_values, self._noise_power, self._epoch = class_values, noise_power, epoch
        self._search_classes, self._assigned_class = search_classes, assigned_class

    def param_groups(self) -> list[dict]:
        """SparseAdam groups of the refinement corrections."""
        return [{"params": [self.rot_delta.weight], "lr": self.schedule.lr_rot},
                {"params": [self.trans_delta.weight], "lr": self.schedule.lr_trans}]

    def poses(self, index: torch.Tensor, refined: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotations ``(B, K, 3, 3)`` and shifts ``(B, 2)`` px of images ``index (B,)``, with the refinement
        corrections applied when ``refined``."""
        rot, trans = self.rot[index], self.trans[index]
        if refined:
            delta = axis_angle_to_matrix(self.rot_delta(index).reshape(-1, self.K, 3))  # (B, K, 3, 3)
            rot, trans = delta @ rot, trans + self.trans_delta(index)
        return rot, trans

    @torch.no_grad()
    def estimates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image's current rotations ``(N, K, 3, 3)`` and shift ``(N, 2)`` px (refinement included)."""
        return self.poses(torch.arange(len(self.trans), device=self.trans.device))

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        index = batch["index"]
        epoch = int(self._epoch())
        phase = self.schedule.phase(epoch)
        if self.training and phase in ("global", "local"):
            todo = self.searched_epoch[index] != epoch
            if todo.any():
                self._search(batch, todo, phase == "global")
                self.searched_epoch[index[todo]] = epoch
        rot, trans = self.poses(index, refined=phase == "refine" or not self.training)
        return (rot[:, 0] if self.K == 1 else rot), trans

    @torch.no_grad()
    def table_values(self, coords: torch.Tensor, k: int) -> torch.Tensor:
        """Class k's table reference (FSC-weighted Wiener backprojection of its images at their current poses)
        at integer frequencies ``coords (Q, 3)`` [kx, ky, kz] within the table's box → complex (Q,)."""
        V, _ = wiener_solve(self.table_num[k].cpu(), self.table_den[k].cpu(), "fsc")  # (Db, Db, Db) [z, y, x]
        idx = coords.round().long() + V.shape[-1] // 2
        return V[idx[:, 2], idx[:, 1], idx[:, 0]]

    @torch.no_grad()
    def _render(self) -> list[PoseSearch]:
        table = (self.schedule.reference == "table"
                 and self._epoch() >= self.schedule.pretrain_epochs + self.schedule.field_epochs)
        searchers = []
        for k in range(self.K):
            if table and bool((self.table_class == k).any()):
                values = partial(self.table_values, k=k)
            else:  # a field epoch, reference "field", or a class with no images in the table
                values = partial(self._class_values, k=k)
            searchers.append(PoseSearch(render_spectrum(values, self.D, self.band), self.D, config=self.schedule.search))
        return searchers

    @torch.no_grad()
    def _table_add(self, sign: float, index: torch.Tensor, spectra: torch.Tensor, ctf: torch.Tensor | None,
                   classes: torch.Tensor) -> None:
        """Add (``sign`` 1) or remove (−1) images ``index (b,)`` (observed spectra ``(b, D, D)``, CTF) at their
        current table poses in classes ``classes (b,)`` to or from the table sums."""
        Db, lo = self.table_num.shape[-1], self.D // 2 - self.table_num.shape[-1] // 2
        dev = self.table_num.device
        rot = self.rot[index.to(self.rot.device), classes.to(self.rot.device)].to(dev)  # (b, 3, 3)
        Y = phase_shift_2d(spectra, self.trans[index.to(self.trans.device)].cpu())[:, lo : lo + Db, lo : lo + Db]
        C = ctf[:, lo : lo + Db, lo : lo + Db] if ctf is not None else torch.ones(Y.shape)
        half = index % 2
        for k in classes.unique().tolist():
            for h in (0, 1):
                s = (classes == k) & (half == h)
                if s.any():
                    insert_slices((sign * C[s] * Y[s]).to(dev), rot[s], (sign * C[s].square()).to(dev),
                                  self.table_num[k, h], self.table_den[k, h])

    @torch.no_grad()
    def _search(self, batch: dict, todo: torch.Tensor, whole: bool) -> None:
        """Search images ``todo (B,)`` of the batch in every class; ``whole``: global, else local."""
        if self._class_values is None:
            raise RuntimeError("SearchedPoses.attach() was not called: the pose search needs the model's fields")
        if self._searchers is None or self._since_render >= self.schedule.render_every:
            self._searchers, self._since_render = self._render(), 0
        self._since_render += 1
        index = batch["index"][todo].cpu()
        spectra = fft2_center(batch["images"][todo].float().cpu())  # (b, D, D) observed, not re-centred
        ctf = None
        if "ctf" in batch:
            ctf = ctf_from_params(freq_grid_2d(self.D, self.apix)[None], batch["ctf"][todo].float().cpu())
        noise = self._noise_power().float().cpu() if self._noise_power is not None else None
        b = len(index)
        wanted = torch.ones(b, self.K, dtype=torch.bool)
        if self._search_classes is not None:
            wanted = self._search_classes(batch["index"][todo]).cpu()
        table = self.schedule.reference == "table"
        if table:  # the images leave the table at their old poses before those change
            old = self.table_class[index.to(self.table_class.device)].cpu()
            if (old >= 0).any():
                self._table_add(-1.0, index[old >= 0], spectra[old >= 0], ctf[old >= 0] if ctf is not None else None,
                                old[old >= 0])
        energies = torch.full((b, self.K), math.inf)
        shifts = self.trans[index.to(self.trans.device)].cpu()[:, None].repeat(1, self.K, 1)  # (b, K, 2)
        for k, searcher in enumerate(self._searchers):
            sel = torch.nonzero(wanted[:, k]).squeeze(1)
            if len(sel) == 0:
                continue
            c = ctf[sel] if ctf is not None else None
            if whole:
                out = searcher.search(spectra[sel], c, noise)
            else:
                out = searcher.local(spectra[sel], c, noise, self.rot[index[sel], k].cpu(), self.trans[index[sel]].cpu(),
                                     self.schedule.local_step_deg)
            self.rot[index[sel].to(self.rot.device), k] = out["rot"].to(self.rot)
            energies[sel, k] = out["energy"]
            shifts[sel, k] = out["trans"]
        best = energies.argmin(1)  # (b,) class where the image is explained best (of those searched)
        self.trans[index.to(self.trans.device)] = shifts[torch.arange(b), best].to(self.trans)
        if table:
            classes = self._assigned_class(batch["index"][todo]).cpu() if self._assigned_class is not None else best
            self._table_add(1.0, index, spectra, ctf, classes)
            self.table_class[index.to(self.table_class.device)] = classes.to(self.table_class)
