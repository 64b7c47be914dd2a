"""The one DataModule every method trains on.

A batch is a dict of tensors (B = batch size, D = training box in px):

=========  ==============  ====================================================================
key        shape           meaning
=========  ==============  ====================================================================
images     (B, D, D)       float32, windowed, Fourier-cropped to D, inverted if ``invert``, divided
                           by the dataset's std (so density is positive and of unit scale)
rot        (B, 3, 3)       pose rotation (docs/conventions.md); identity when the data has no poses
trans      (B, 2)          shift in px at box D that re-centres the image (+t convention)
ctf        (B, 9)          cryoDRGN CTF layout at box D: [D, apix, dfU, dfV, dfAng, kV, Cs, w, phase]
index      (B,)            int64 particle index into the whole dataset
label      (B,)            int64 ground-truth state, −1 when unknown
=========  ==============  ====================================================================

Lazy and in-memory modes give identical batches: both run the same ``_prepare`` on raw images.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

from cryobench_lab.data.checks import startup_warnings
from cryobench_lab.errors import InputError
from cryobench_lab.data.ground_truth import gt_volume_files, load_gt_volumes, load_labels, load_mask
from cryobench_lab.io.cryobench import load_cryobench
from cryobench_lab.io.particles import ParticleMetadata, load_particles
from cryobench_lab.io.volumes import check_volume_grids
from cryobench_lab.physics.fft import fft2_center, ifft2_center
from cryobench_lab.physics.lattice import soft_window

log = logging.getLogger(__name__)

_SCAN_CHUNK = 256  # images read at a time when scanning a stack (bounds memory in lazy mode)
_MMAP_THRESHOLD = 1 << 20  # bytes; see _return_freed_batches_to_os


def _return_freed_batches_to_os() -> None:
    """Make glibc serve every allocation of ≥ 1 MiB by mmap, so freed batches go back to the OS.

    By default glibc raises its mmap threshold to the size of the last freed large block (up to 32 MiB),
    after which batch-sized buffers come from the heap and fragmentation keeps them: one lazy pass over a
    40,000-image stack then grew the process by ~1.2 GB (bench/lazy_memory.py). Fixing the threshold
    turns that growth off. No-op where glibc is absent.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return


@dataclass
class DatasetInfo:
    """What a model needs to know about its data at construction time."""

    n_particles: int
    box_size: int  # D, px
    apix: float  # Å/px at box D
    has_poses: bool
    labels: Optional[np.ndarray] = None  # (N,) int64, −1 = unknown
    gt_volumes: Optional[torch.Tensor] = None  # (S, D, D, D) at box D, apix as above (a VolumeFiles if large)
    gt_volume_files: Optional[list] = None  # (S,) the file each state's volume was read from
    mask: Optional[torch.Tensor] = None  # (D, D, D) the dataset's own FSC mask (CryoBench init_mask/mask.mrc)
    structure: Optional[str] = None
    gt_structures: Optional[str] = None  # folder of per-state atomic models (state_XXX.cif/.pdb, label order)
    domains: Optional[dict] = None  # {name: [first, last] residue number}: groups for the atom metrics
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def n_states(self) -> int:
        if self.labels is None:
            return 0
        return int(self.labels.max()) + 1


def fourier_crop_2d(images: torch.Tensor, D: int) -> torch.Tensor:
    """Downsample (B, D0, D0) images to (B, D, D) by cropping their centred spectrum.

    Pixel values are kept on the same scale (a constant image stays the same constant).
    """
    D0 = images.shape[-1]
    if D == D0:
        return images
    if D > D0:
        raise InputError(f"data.box_size={D} is larger than the stack's box {D0}; choose data.box_size <= {D0}")
    lo = D0 // 2 - D // 2
    F = fft2_center(images)[..., lo : lo + D, lo : lo + D]  # (B, D, D)
    return ifft2_center(F).real * (D / D0) ** 2


class ParticleDataset(Dataset):
    """Particles served by batches of indices: ``dataset[list_of_indices] -> batch dict``."""

    def __init__(
        self,
        meta: ParticleMetadata,
        box_size: int,
        invert: bool,
        window: bool,
        lazy: bool,
        labels: Optional[np.ndarray],
    ):
        self.meta = meta
        self.D0 = meta.D
        self.D = box_size
        self.invert = invert
        self.window = soft_window(self.D0) if window else None  # (D0, D0)
        self.lazy = lazy
        n = meta.images.n
        self.rot = torch.as_tensor(meta.rot, dtype=torch.float32) if meta.rot is not None else torch.eye(3).expand(n, 3, 3)
        trans = meta.trans_px if meta.trans_px is not None else np.zeros((n, 2), np.float32)
        self.trans = torch.as_tensor(trans, dtype=torch.float32) * (self.D / self.D0)  # (N, 2) px at D
        ctf = torch.as_tensor(meta.ctf, dtype=torch.float32).clone() if meta.ctf is not None else None
        if ctf is not None:
            ctf[:, 0] = self.D
            ctf[:, 1] = ctf[:, 1] * self.D0 / self.D
        self.ctf = ctf  # (N, 9) or None (no CTF: the models treat it as 1)
        self.labels = torch.as_tensor(labels if labels is not None else np.full(n, -1), dtype=torch.int64)
        self.scale = 1.0
        self.images: Optional[torch.Tensor] = None
        self._scan()

    def __len__(self) -> int:
        return self.meta.images.n

    def _prepare(self, raw: np.ndarray) -> torch.Tensor:
        """Raw (n, D0, D0) images → windowed, cropped, inverted (n, D, D), not yet normalised."""
        x = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
        if self.window is not None:
            x = x * self.window
        x = fourier_crop_2d(x, self.D)
        return -x if self.invert else x

    def _read(self, indices: np.ndarray) -> np.ndarray:
        raw = self.meta.images.read(indices)
        bad = ~np.isfinite(raw).reshape(len(indices), -1).all(axis=1)
        if bad.any():
            shown = ", ".join(str(i) for i in indices[bad][:10])
            more = f" and {int(bad.sum()) - 10} more" if bad.sum() > 10 else ""
            raise InputError(
                f"{self.meta.source}: NaN or Inf pixels in image(s) {shown}{more} (0-based); "
                "remove those particles from the star/stack and retry"
            )
        return raw

    def _scan(self) -> None:
        """One pass over the stack: reject NaN/Inf images, set the normalisation, load if in memory."""
        n = len(self)
        chunks = [np.arange(s, min(s + _SCAN_CHUNK, n)) for s in range(0, n, _SCAN_CHUNK)]
        kept = [] if not self.lazy else None
        total, total_sq, count = 0.0, 0.0, 0
        for idx in tqdm(chunks, desc=f"Reading {Path(self.meta.source).name}", unit="chunk", leave=False):
            x = self._prepare(self._read(idx))
            total += float(x.sum(dtype=torch.float64))
            total_sq += float((x.double() ** 2).sum())
            count += x.numel()
            if kept is not None:
                kept.append(x)
        mean = total / count
        std = max((total_sq / count - mean**2), 0.0) ** 0.5
        if std == 0.0:
            raise InputError(f"{self.meta.source}: every pixel has the same value; the stack holds no images")
        self.scale = 1.0 / std
        if kept is not None:
            self.images = torch.cat(kept) * self.scale  # (N, D, D)

    def __getitem__(self, indices: Sequence[int]) -> dict:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.images is not None:
            images = self.images[torch.from_numpy(idx)]
        else:
            # Read in sorted order so runs of contiguous particles become single slices, then restore order.
            order = np.argsort(idx, kind="stable")
            sorted_images = self._prepare(self._read(idx[order])) * self.scale
            images = torch.empty_like(sorted_images)
            images[torch.from_numpy(order)] = sorted_images
        t = torch.from_numpy(idx)
        batch = {
            "images": images,
            "rot": self.rot[t],
            "trans": self.trans[t],
            "index": t,
            "label": self.labels[t],
        }
        if self.ctf is not None:
            batch["ctf"] = self.ctf[t]
        return batch


class ParticleDataModule(L.LightningDataModule):
    """Particle stacks with poses, CTF and optional ground truth, for every method.

    Built from a :class:`cryobench_lab.config.DataConfig` (a preset is simulated on first use).
    """

    def __init__(self, cfg, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.dataset: Optional[ParticleDataset] = None
        self.info: Optional[DatasetInfo] = None

    def _resolve_files(self) -> dict:
        cfg = self.cfg
        files = dict(
            particles=cfg.particles, poses=cfg.poses, ctf=cfg.ctf, labels=cfg.labels,
            gt_volumes=cfg.gt_volumes, structure=cfg.structure, gt_structures=cfg.gt_structures, meta={},
        )
        if cfg.layout is not None:
            if cfg.layout != "cryobench":
                raise InputError(f"data.layout={cfg.layout!r} is unknown; use data.layout=cryobench (or leave it unset)")
            if cfg.preset:
                raise InputError("data.layout=cryobench reads data.root; unset data.preset (data.preset=null)")
            if not cfg.root:
                raise InputError("data.root is not set; pass data.root=/path/to/<dataset> (a CryoBench download folder)")
            return files  # read by io/cryobench.py in setup
        if cfg.preset:
            from cryobench_lab.data.presets import ensure_dataset

            overrides = {k: v for k, v in dict(
                box_size=cfg.box_size, n_particles=cfg.n_particles, snr=cfg.snr, seed=cfg.sim_seed,
                structures=list(cfg.structures) if cfg.structures else None,
            ).items() if v is not None}
            overrides.update(OmegaConf.to_container(cfg.recipe) if OmegaConf.is_config(cfg.recipe) else (cfg.recipe or {}))
            folder = Path(ensure_dataset(cfg.preset, cache_dir=cfg.cache_dir, overrides=overrides))
            meta = json.loads((folder / "meta.json").read_text())
            files.update(
                particles=str(folder / "particles.star"), labels=str(folder / "labels.npy"),
                gt_volumes=str(folder / "gt_volumes"), meta=meta,
            )
            if files["gt_structures"] is None and meta.get("files", {}).get("gt_structures"):
                files["gt_structures"] = str(folder / meta["files"]["gt_structures"])
            if files["structure"] is None and meta.get("structure"):
                files["structure"] = meta["structure"]
        elif not cfg.particles:
            raise InputError("data.particles is not set; pass data.particles=/path/to/particles.star (or .cs/.txt/.mrcs)")
        if files["structure"] and not Path(files["structure"]).expanduser().is_file():
            from cryobench_lab.data.presets import STRUCTURES_DIR

            if (STRUCTURES_DIR / files["structure"]).is_file():  # a bundled model, e.g. adk/pdb1ake.pdb.gz
                files["structure"] = str(STRUCTURES_DIR / files["structure"])
        return files

    def setup(self, stage: Optional[str] = None) -> None:
        if self.dataset is not None:
            return
        cfg = self.cfg
        files = self._resolve_files()
        if cfg.layout == "cryobench":
            bench = load_cryobench(cfg.root, snr=cfg.snr, particles=cfg.particles, apix=cfg.apix)
            meta, labels = bench.particles, bench.labels
            files.update(bench.files, gt_volumes=bench.volume_files, meta={**bench.files, "root": bench.root, "invert": True})
        else:
            ctf_file = None if cfg.ctf == "none" else files["ctf"]
            meta = load_particles(files["particles"], poses=files["poses"], ctf=ctf_file, datadir=cfg.datadir, apix=cfg.apix)
            labels = load_labels(files["labels"], meta.images.n) if files["labels"] else None
        if cfg.ctf == "none":  # the user's explicit choice: images without CTF, whatever the files say
            meta.ctf = None
        elif meta.ctf is None:
            raise InputError(f"{files['particles']}: the particles carry no CTF (no rlnDefocusU column in a .star, no "
                             "ctf/* fields in a .cs, none in a bare stack) and no data.ctf pickle was given; pass "
                             "data.ctf=<ctf.pkl>, or data.ctf=none if the images truly have no CTF")
        n = meta.images.n
        D = cfg.box_size or meta.D
        if D % 2:
            raise InputError(f"data.box_size={D} is odd; choose an even box size")
        gt_files = None
        if files["gt_volumes"]:  # checked before the stack is scanned: bad ground truth fails at once
            _, gt_files = gt_volume_files(files["gt_volumes"])
            assumed = check_volume_grids(gt_files, meta.D, meta.apix, D, same_field_of_view=cfg.layout == "cryobench")
            if assumed:
                log.warning(assumed)
        invert = cfg.invert if cfg.invert is not None else bool(files["meta"].get("invert", True))
        lazy = cfg.lazy
        if lazy is None:
            lazy = n * D * D * 4 > cfg.memory_cap_gb * 2**30
        if lazy:
            _return_freed_batches_to_os()
        self.dataset = ParticleDataset(meta, D, invert=invert, window=cfg.window, lazy=lazy, labels=labels)
        gt = None
        if gt_files:
            gt = load_gt_volumes(gt_files, int(labels.max()) + 1 if labels is not None else 0, D, cfg.memory_cap_gb)
        mask = load_mask(files["mask"], files["volume_box"], D) if files.get("mask") else None
        self.info = DatasetInfo(
            n_particles=n, box_size=D, apix=meta.apix * meta.D / D, has_poses=meta.rot is not None, mask=mask,
            labels=labels, gt_volumes=gt, gt_volume_files=[str(f) for f in gt_files] if gt_files else None,
            structure=files["structure"], gt_structures=files["gt_structures"],
            domains={k: [int(v) for v in r] for k, r in cfg.domains.items()} if cfg.domains else None,
            source=str(files["particles"]), meta=files["meta"],
        )
        for line in startup_warnings(self.dataset, str(files["particles"])):
            log.warning(line)
        rng = np.random.default_rng(cfg.split_seed)
        perm = rng.permutation(n)
        n_val = int(round(cfg.val_fraction * n)) if n > 1 else 0
        self.val_indices = np.sort(perm[:n_val])
        self.train_indices = np.sort(perm[n_val:])

    def _loader(self, indices: np.ndarray, shuffle: bool) -> DataLoader:
        subset = _IndexView(indices)
        generator = None
        if shuffle:
            generator = torch.Generator().manual_seed(self.seed)
            sampler = RandomSampler(subset, generator=generator)
        else:
            sampler = SequentialSampler(subset)
        batches = _MappedBatchSampler(BatchSampler(sampler, self.cfg.batch_size, drop_last=False), indices,
                                      generator, self.seed)
        return DataLoader(
            self.dataset, sampler=batches, batch_size=None, num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        from cryobench_lab.data.samplers import training_loader  # data.shuffle=chunked; DDP shards batches

        return training_loader(self, self.train_indices)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_indices, shuffle=False)

    def all_dataloader(self) -> DataLoader:
        """Every particle once, in index order (for embedding and evaluation)."""
        return self._loader(np.arange(len(self.dataset)), shuffle=False)


class _IndexView:
    def __init__(self, indices: np.ndarray):
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)


class _MappedBatchSampler:
    """Maps batches of positions in a subset to dataset indices.

    The shuffle order of an epoch depends only on the seed and the epoch number (Lightning calls
    :meth:`set_epoch` before each epoch), so a run resumed from a checkpoint sees the same batches as an
    uninterrupted one.
    """

    def __init__(self, batch_sampler: BatchSampler, indices: np.ndarray, generator=None, seed: int = 0):
        self.batch_sampler = batch_sampler
        self.indices = indices
        self.generator = generator
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        if self.generator is not None:
            self.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def __iter__(self):
        for positions in self.batch_sampler:
            yield self.indices[positions].tolist()

    def __len__(self) -> int:
        return len(self.batch_sampler)
