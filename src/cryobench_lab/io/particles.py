"""One entry point from user files to particle images + metadata: ``load_particles``.

Sources of each quantity, in priority order:
- images: the particle file (``.star``, ``.cs``, ``.txt`` list of stacks, or one ``.mrcs``);
- poses / CTF: the pickles when given (cryoDRGN format), else the star / cs file, else none;
- pixel size (Å): the star / cs file, else the CTF pickle (rescaled to the image box), else the ``apix``
  argument, else the first stack's header. Values from several of these must agree (an ``apix``
  argument that contradicts a file is an error, not silently ignored). Headers come last, after the
  argument, because real ones often say 0 or 1 Å (SOURCES.md).
Every row count is cross-checked against the number of images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryobench_lab.errors import InputError
from cryobench_lab.io.cryosparc import read_cs
from cryobench_lab.io.pickles import load_ctf, load_poses
from cryobench_lab.io.stacks import ImageSource
from cryobench_lab.io.star import (
    _parse_image_names,
    ctf_from_star,
    has_ctf,
    has_poses,
    poses_from_star,
    read_star,
    star_apix,
    star_box_size,
)


@dataclass
class ParticleMetadata:
    """Particle images and their metadata, all rows in image order.

    ``rot`` (N, 3, 3) float32 pose matrices, ``trans_px`` (N, 2) float32 re-centring shifts in pixels,
    ``ctf`` (N, 9) float32 cryoDRGN CTF at this image box (D, apix columns equal ``D``, ``apix``); each
    None when unknown (``trans_px`` is zeros when poses come without shifts). ``apix`` in Å, ``D`` in pixels, ``source`` the particle file.
    """

    images: ImageSource
    rot: np.ndarray | None
    trans_px: np.ndarray | None
    ctf: np.ndarray | None
    apix: float
    D: int
    source: str

    @property
    def n(self) -> int:
        return self.images.n


def _ctf_at_box(ctf: np.ndarray, D: int) -> np.ndarray:
    """CTF rows rescaled to box ``D``: downsampling D0 → D keeps the field of view, so apix × D0 / D."""
    ctf = ctf.copy()
    ctf[:, 1] = ctf[:, 1] * ctf[:, 0] / D
    ctf[:, 0] = D
    return ctf


def _agree(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-3 * max(abs(a), abs(b))


def _refuse_reordered(star_rows: np.ndarray, pickle_rows: np.ndarray, star: Path, pickle, what: str) -> None:
    """Refuse a pickle whose rows are the star file's rows in another order.

    cryoDRGN pickles carry no image names, so rows cannot be paired by name; pairing them by position when
    they were written in another order would silently give every image another particle's pose or CTF. A
    pickle that differs from the star row by row is allowed (refined poses or CTF replace the star's) unless
    every differing row equals some other star row, which only a reordering produces.
    Rows are compared after scaling each column by its largest magnitude, within 1e-4.
    """
    a = star_rows.reshape(len(star_rows), -1).astype(np.float64)  # (N, C)
    b = pickle_rows.reshape(len(pickle_rows), -1).astype(np.float64)  # (N, C)
    scale = np.maximum(np.abs(a).max(0), 1e-12)
    a, b = a / scale, b / scale
    moved = np.flatnonzero(np.abs(a - b).max(1) > 1e-4)
    if not len(moved):
        return
    from scipy.spatial import cKDTree

    dist, match = cKDTree(b).query(a[moved], distance_upper_bound=1e-4 * a.shape[1] ** 0.5)
    if np.isfinite(dist).all():
        row = int(moved[0])
        raise InputError(f"{pickle}: its {what} are the rows of {star} in another order ({len(moved)} rows "
                         f"moved; star row {row + 1} is pickle row {int(match[0]) + 1}); the pickle has no image "
                         f"names to pair by: write it in the star's row order, or give data.poses as a STAR file "
                         "(paired by image name)")


def _image_keys(images: ImageSource) -> np.ndarray:
    """``"index@stack file name"`` (1-based) of every particle, the name both a star and a cs file carry."""
    names = np.array([Path(f).name for f in images.files], dtype=object)
    return np.array([f"{i + 1}@{n}" for i, n in zip(images._indices, names[images._file_ids])], dtype=object)


def _poses_by_name(poses: Path, images: ImageSource, apix: float) -> tuple[np.ndarray, np.ndarray]:
    """Poses from a STAR file (a refinement's output), paired with the particles by image name.

    A star carries ``rlnImageName``, so its rows may come in any order (and hold extra particles): each
    particle takes the row naming the same image (same 1-based index in a stack of the same file name; the
    folders may differ between projects). A particle no row names is refused with its name.
    """
    df = read_star(poses)
    if not has_poses(df):
        raise InputError(f"{poses}: no rlnAngleRot/Tilt/Psi columns, so no poses; pass a refined star file")
    paths, indices = _parse_image_names(df)
    keys = np.array([f"{i + 1}@{Path(p).name}" for p, i in zip(paths, indices)], dtype=object)
    table = pd.Index(keys)
    if not table.is_unique:
        dup = table[table.duplicated()][0]
        raise InputError(f"{poses}: image {dup} has more than one row; keep one pose per particle")
    wanted = _image_keys(images)
    rows = table.get_indexer(wanted)
    missing = np.flatnonzero(rows < 0)
    if len(missing):
        raise InputError(f"{poses}: has no row for image {wanted[missing[0]]} (particle {missing[0] + 1}; "
                         f"{len(missing)} of {len(wanted)} particles unmatched); the star and the particles "
                         "name different images")
    rot, trans = poses_from_star(df, star_apix(df) or apix)
    return rot[rows], trans[rows]


def load_particles(
    particles: str | os.PathLike,
    poses: str | os.PathLike | None = None,
    ctf: str | os.PathLike | None = None,
    datadir: str | os.PathLike | None = None,
    apix: float | None = None,
) -> ParticleMetadata:
    """Load particle images (lazily) with poses, CTF and pixel size; see the module docstring.

    Args:
        particles: ``.star``, ``.cs``, ``.txt`` (stack list) or ``.mrcs``/``.mrc`` file.
        poses: cryoDRGN poses pickle, or a STAR file paired with the particles by image name, overriding
            poses in the particle file.
        ctf: cryoDRGN CTF pickle, overriding CTF in the particle file.
        datadir: folder the star/cs image paths are relative to (default: the metadata file's folder).
        apix: pixel size in Å, used only where the files do not give one.
    """
    path = Path(particles)
    suffix = path.suffix.lower()
    rot = trans_px = ctf_array = None
    file_apix: float | None = None  # from a star or cs file
    where = "star file"
    if suffix == ".star":
        df = read_star(path)
        images = ImageSource.from_star(df, path, datadir)
        D = images.D
        box = star_box_size(df)
        if box is not None and box != D:
            raise InputError(f"{path}: rlnImageSize is {box} but the images are {D} px; point the star at "
                             "the stacks it describes")
        file_apix = star_apix(df)
        star_df = df
    elif suffix == ".cs":
        cs = read_cs(path)
        images = ImageSource.from_cs(cs, path, datadir)
        D = images.D
        if cs["D"] is not None and cs["D"] != D:
            raise InputError(f"{path}: blob/shape says {cs['D']} px but the images are {D} px; point the .cs "
                             "file at the stacks it describes")
        file_apix = cs["apix"]
        where = "cs file"
        star_df = None
    else:
        images = ImageSource.from_path(path, datadir)
        D = images.D
        star_df = None
    n = images.n

    ctf_pickle = None
    if ctf is not None:
        ctf_pickle = _ctf_at_box(load_ctf(ctf, n=n), D)

    # Pixel size: star/cs, then CTF pickle, then argument, then header. Every value the files and the
    # argument give must agree: a disagreement means the metadata describe different images.
    stated = []
    if file_apix is not None and file_apix > 0:
        stated.append((file_apix, f"the {where} {path}"))
    if ctf_pickle is not None and len(ctf_pickle):
        stated.append((float(ctf_pickle[0, 1]), f"the CTF pickle {ctf} (rescaled to D={D})"))
    if apix is not None:
        stated.append((float(apix), "data.apix"))
    for value, origin in stated[1:]:
        if not _agree(value, stated[0][0]):
            raise InputError(f"{origin} gives a pixel size of {value:g} Å but {stated[0][1]} says "
                             f"{stated[0][0]:g} Å; make them agree (or drop data.apix)")
    final_apix = stated[0][0] if stated else (images.apix if images.apix > 0 else None)
    if final_apix is None or not final_apix > 0:
        raise InputError(f"{path}: no pixel size in the particle files (header says 0); pass data.apix=<Å per "
                         "pixel>")

    if poses is not None and Path(poses).suffix.lower() == ".star":
        rot, trans_px = _poses_by_name(Path(poses), images, final_apix)
    elif poses is not None:
        rot, trans_px = load_poses(poses, n=n, D=D)
        if star_df is not None and has_poses(star_df):
            _refuse_reordered(poses_from_star(star_df, final_apix)[0], rot, path, poses, "poses")
    elif star_df is not None and has_poses(star_df):
        rot, trans_px = poses_from_star(star_df, final_apix)
    elif suffix == ".cs":
        rot, trans_px = cs["rot"], cs["trans_px"]
    if rot is not None and trans_px is None:  # poses without shifts: the images are centred
        trans_px = np.zeros((n, 2), dtype=np.float32)

    if ctf_pickle is not None:
        ctf_array = ctf_pickle
        if star_df is not None and has_ctf(star_df):
            star_ctf = ctf_from_star(star_df, D, final_apix)
            _refuse_reordered(star_ctf[:, 2:5], ctf_pickle[:, 2:5], path, ctf, "CTF parameters")
    elif star_df is not None and has_ctf(star_df):
        ctf_array = ctf_from_star(star_df, D, final_apix)
    elif suffix == ".cs" and cs["ctf"] is not None:
        ctf_array = _ctf_at_box(cs["ctf"], D)

    return ParticleMetadata(images=images, rot=rot, trans_px=trans_px, ctf=ctf_array,
                            apix=float(final_apix), D=int(D), source=str(path))
