"""Ground truth for scoring, read at data set-up: labels, the volume of each state, the dataset's mask.

Volumes are paired with states and checked against the particles' grid by ``io/volumes.py`` before they are
read here; each is then Fourier-cropped to the training box (the same field of view, so a crop is right).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryobench_lab.errors import InputError
from cryobench_lab.io.cryobench import read_mask
from cryobench_lab.io.mrc import read_mrc
from cryobench_lab.io.pickles import load_pickle
from cryobench_lab.io.volumes import order_by_state_number
from cryobench_lab.physics.fft import fft3_center, ifft3_center


def fourier_crop_3d(volume: torch.Tensor, D: int) -> torch.Tensor:
    """Downsample a (D0, D0, D0) volume to (D, D, D) by cropping its centred spectrum (values kept)."""
    D0 = volume.shape[-1]
    if D == D0:
        return volume
    lo = D0 // 2 - D // 2
    F = fft3_center(volume)[lo : lo + D, lo : lo + D, lo : lo + D]
    return ifft3_center(F).real * (D / D0) ** 3


def load_labels(path: str, n: int) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise InputError(f"data.labels: {p} does not exist; pass a .npy or .pkl with one label per particle")
    labels = np.load(p, allow_pickle=False) if p.suffix == ".npy" else load_pickle(p)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise InputError(f"{p}: has shape {labels.shape} but the stack has {n} particles; expected ({n},)")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise InputError(f"{p}: labels must be non-negative integers (0-based state index)")
    return labels.astype(np.int64)


def read_gt_volume(f, D: int) -> torch.Tensor:
    v, _ = read_mrc(f)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise InputError(f"{f}: ground-truth volume has shape {v.shape}; expected a cubic (D, D, D) map")
    return fourier_crop_3d(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)), D)  # (D, D, D)


class VolumeFiles:
    """Ground-truth volumes read from their files on each access, for sets too large for memory (Spike-MD
    has one per image): indexes like an (S, D, D, D) tensor (``len``, ``[s]``, iteration, ``shape``)."""

    def __init__(self, files: list, D: int):
        self.files, self.D = [str(f) for f in files], D

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, s: int) -> torch.Tensor:
        return read_gt_volume(self.files[int(s)], self.D)

    def __iter__(self):
        return (self[s] for s in range(len(self)))

    @property
    def shape(self) -> tuple:
        return (len(self.files), self.D, self.D, self.D)


def gt_volume_files(folder) -> tuple[Path, list[Path]]:
    """(folder, files): a list of files as given, or a folder's ``*.mrc`` in the order of the state number in
    their names (io/volumes.py; ambiguous names are refused)."""
    if isinstance(folder, (list, tuple)):
        return Path(folder[0]).parent, [Path(f) for f in folder]
    p = Path(folder)
    files = list(p.glob("*.mrc")) if p.is_dir() else []
    return p, order_by_state_number(files, f"data.gt_volumes={p}")


def load_gt_volumes(folder, n_states: int, D: int, memory_cap_gb: float = float("inf")):
    """Volumes of ``folder`` (its ``*.mrc`` ordered by state number) or of a list of files, Fourier-cropped
    to ``D`` → (S, D, D, D), or a :class:`VolumeFiles` when they would exceed ``memory_cap_gb``."""
    p, files = gt_volume_files(folder)
    if not files:
        raise InputError(f"data.gt_volumes: no .mrc files in {p}; pass a folder of one volume per state in label order")
    if n_states and len(files) != n_states:
        raise InputError(f"data.gt_volumes: {p} holds {len(files)} volumes but the labels name {n_states} states")
    if len(files) * D**3 * 4 > memory_cap_gb * 2**30:
        read_gt_volume(files[0], D)  # fail now, not at scoring time, if the files are not volumes
        return VolumeFiles(files, D)
    return torch.stack([read_gt_volume(f, D) for f in files])  # (S, D, D, D)


def load_mask(path: str, D0: int, D: int) -> torch.Tensor:
    """A dataset's FSC mask at the volumes' box ``D0``, resampled to ``D`` like the volumes and kept in [0, 1]."""
    mask = torch.from_numpy(read_mask(path, D0))  # (D0, D0, D0)
    return fourier_crop_3d(mask, D).clamp(0.0, 1.0)  # (D, D, D)
