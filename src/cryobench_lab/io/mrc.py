"""MRC/MRCS maps and image stacks (``mrcfile``).

Volumes are ``(D, D, D)`` float32 indexed ``[z, y, x]``; stacks are ``(N, D, D)`` indexed ``[n, y, x]``.
Real headers are often sloppy (no 'MAP ' ID, voxel size 0 or 1), so files are opened with
``permissive=True`` and the voxel size is returned exactly as the header states it (0.0 when unset):
deciding whether to trust it is the caller's job (see ``io.particles``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np

from cryobench_lab.errors import InputError, TrainingError
from cryobench_lab.io.atomic import atomic_path

_HEADER_BYTES = 1024


def _header_apix(mrc) -> float:
    """Voxel size along x in Å as the header says it; 0.0 when unset or not a finite positive number."""
    apix = float(mrc.voxel_size.x)
    return apix if np.isfinite(apix) and apix > 0 else 0.0


def read_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a whole map or stack into memory: ``(array float32, apix Å)``; apix is 0.0 when unset."""
    path = Path(path)
    _check_size(path)
    try:
        with warnings.catch_warnings():
            # permissive mode warns about every sloppy header field; the size check above is the one
            # that matters and it raises.
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True) as mrc:
                data = None if mrc.data is None else np.array(mrc.data, dtype=np.float32)
                apix = _header_apix(mrc)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable MRC file ({exc}); check the path and format") from exc
    if data is None:
        raise InputError(f"{path}: MRC data could not be read; re-save it as float32 MRC")
    return data, apix


def read_header(path: str | os.PathLike) -> tuple[tuple[int, int, int], float]:
    """Shape ``(nz, ny, nx)`` and voxel size (Å, x; 0.0 when unset) from the header alone, file checked
    for truncation; for checking a map's grid without reading its data."""
    header = _check_size(Path(path))
    mx = int(header.mx)
    apix = float(header.cella.x) / mx if mx > 0 else 0.0
    return (int(header.nz), int(header.ny), int(header.nx)), (apix if np.isfinite(apix) and apix > 0 else 0.0)


def write_mrc(
    path: str | os.PathLike,
    array: np.ndarray,
    apix: float,
    origin: tuple[float, float, float] | None = None,
) -> None:
    """Write a map (or a single 2D image) as float32 MRC with voxel size ``apix`` Å, atomically.

    ``origin`` (x, y, z) in Å goes into the header's origin field; by default a 3D map gets
    :func:`centred_origin`, so that its box centre (index ``D // 2``) sits at (0, 0, 0) Å, the frame of every
    atomic model the project reads and writes (docs/conventions.md): ChimeraX then shows maps and models
    together without a fit. A map with NaN or Inf values
    is refused (TrainingError): it can only come from a diverged computation and must never be a result.
    """
    data = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    if not np.isfinite(data).all():
        raise TrainingError(f"{path}: refusing to write a map with {int((~np.isfinite(data)).sum())} NaN/Inf "
                            "values (a diverged model or reconstruction); nothing was written")
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = float(apix)
        if origin is None and data.ndim == 3:
            origin = centred_origin(data.shape, apix)
        if origin is not None:
            mrc.header.origin = tuple(float(o) for o in origin)


def centred_origin(shape: tuple[int, int, int], apix: float) -> tuple[float, float, float]:
    """Header origin (x, y, z) Å of a ``[z, y, x]`` map whose voxel ``n // 2`` on each axis is at 0 Å."""
    return tuple(-(n // 2) * float(apix) for n in (shape[2], shape[1], shape[0]))


def write_stack(path: str | os.PathLike, images: np.ndarray, apix: float) -> None:
    """Write ``(N, D, D)`` images as a float32 MRCS image stack (space group 0) with pixel size ``apix`` Å,
    atomically."""
    data = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
    if data.ndim != 3:
        raise ValueError(f"write_stack expects (N, D, D) images, got shape {data.shape}")
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
        mrc.voxel_size = float(apix)


def _check_size(path: Path):
    """Read the header only and check the file holds all the data it declares.

    Returns the header; raises InputError for a missing, unreadable or truncated file.
    """
    if not path.is_file():
        raise InputError(f"{path}: file not found; check the path (or pass data.datadir=)")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty (0 bytes); re-copy or re-extract it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                header = mrc.header.copy()
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable MRC file ({exc}); check the path and format") from exc
    try:
        itemsize = mrcfile.utils.dtype_from_mode(header.mode).itemsize
    except ValueError as exc:
        raise InputError(f"{path}: unsupported MRC data mode {int(header.mode)}; re-save it as float32 "
                         "MRC") from exc
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) < 1:
        raise InputError(f"{path}: MRC header declares an empty array ({nz} x {ny} x {nx}); the file is "
                         "damaged, re-export it")
    expected = _HEADER_BYTES + int(header.nsymbt) + nx * ny * nz * itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise InputError(f"{path}: file is truncated, its header needs {expected} bytes "
                         f"({nz} x {ny} x {nx}) but it has {actual}; re-copy or re-extract it")
    return header


class MRCStack:
    """Lazy reader of one MRC/MRCS image stack, by index, without loading or mapping the whole file.

    The header is validated when the object is built (size vs header, square images). Images are read with
    positioned file reads, one per run of consecutive indices, so the process holds only the images it
    asked for: a memory map would keep every page it ever touched resident in this process, and a pass over
    a stack larger than RAM would then grow the process to the stack's size. A 3D file is read as
    ``N = nz`` images of ``ny x nx``; a 2D file is a stack of one. The object can be pickled (for
    DataLoader workers): the file handle is dropped and reopened on demand.

    Attributes: ``n`` images, ``D`` box size (px), ``apix`` header pixel size (Å, 0.0 when unset).
    """

    def __init__(self, path: str | os.PathLike):
        self._fh = None
        self.path = Path(path)
        header = _check_size(self.path)
        nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
        if nx != ny:
            raise InputError(f"{self.path}: images are {ny} x {nx} pixels, not square; cryobench_lab "
                             "needs square images, re-extract them with a square box")
        self.n = nz
        self.D = nx
        self._dtype = mrcfile.utils.data_dtype_from_header(header)  # includes the file's byte order
        self._offset = _HEADER_BYTES + int(header.nsymbt)
        mx = int(header.mx)
        # Pixel size = cell length / sampling; mrcfile does the same, with 0 for an unset cell.
        apix = float(header.cella.x) / mx if mx > 0 else 0.0
        self.apix = apix if np.isfinite(apix) and apix > 0 else 0.0

    def _read_run(self, start: int, count: int) -> np.ndarray:
        """``count`` consecutive images from ``start`` as float32 ``(count, D, D)``."""
        if self._fh is None:
            self._fh = open(self.path, "rb")
        pixels = self.D * self.D
        self._fh.seek(self._offset + start * pixels * self._dtype.itemsize)
        data = np.fromfile(self._fh, dtype=self._dtype, count=count * pixels)
        if data.size != count * pixels:
            raise InputError(f"{self.path}: file ended while reading images {start}..{start + count - 1}; "
                             "it was truncated after it was opened, re-copy it")
        return data.reshape(count, self.D, self.D).astype(np.float32, copy=False)

    def read(self, indices) -> np.ndarray:
        """Images at ``indices`` (0-based; an int, a slice, or an int array) as a ``(n, D, D)`` float32 copy.

        Each run of consecutive indices is one contiguous read of the file.
        """
        if isinstance(indices, slice):
            indices = np.arange(*indices.indices(self.n))
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"{self.path}: image index out of range 0..{self.n - 1}: "
                             f"{int(idx.min())}..{int(idx.max())}")
        out = np.empty((idx.size, self.D, self.D), dtype=np.float32)  # (n, D, D)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        for run_start, run in zip(np.concatenate([[0], breaks]), np.split(idx, breaks)):
            if run.size:
                out[run_start : run_start + run.size] = self._read_run(int(run[0]), run.size)
        return out

    def close(self) -> None:
        """Close the file (it is reopened by the next ``read``)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fh"] = None  # file handles cannot be pickled; reopen in the receiving process
        return state

    def __del__(self):
        self.close()

    def __repr__(self) -> str:
        return f"MRCStack({str(self.path)!r}, n={self.n}, D={self.D}, apix={self.apix})"
