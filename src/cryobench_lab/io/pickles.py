"""cryoDRGN-format pickles (poses, CTF, labels), loaded with a restricted unpickler.

A pickle can run arbitrary code when loaded, so ``load_pickle`` resolves only the few numpy globals that
rebuild arrays, dtypes and scalars; any other class or function in the stream is refused with an
InputError before anything is constructed. Containers (tuple, list, dict) and plain ints, floats, strings,
bools and None are built by the pickle machine itself and need no globals. Object arrays are refused
after loading as well (they could only hold such plain values, but no cryoDRGN file uses them).

Formats (docs/conventions.md):
- poses: ``(rot (N, 3, 3), trans (N, 2))`` with trans a FRACTION of the box (× D for pixels), or a bare
  ``rot`` array; trans is the shift that re-centres the observed image.
- CTF: ``(N, 9)`` ``[D, apix Å, defocus_u Å, defocus_v Å, defocus_angle °, voltage kV, cs mm,
  amplitude_contrast, phase_shift °]``.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import atomic_path

# Globals numpy's own pickling uses for arrays, dtypes and scalars (numpy 1.x and 2.x module names).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Protocol 2 pickles build array buffers with codecs.encode(str, "latin1"): a pure str → bytes call.
    ("_codecs", "encode"),
}

_PLAIN = (int, float, str, bool, type(None), np.generic)

CTF_COLUMNS = ("D", "apix", "defocus_u", "defocus_v", "defocus_angle", "voltage", "cs",
               "amplitude_contrast", "phase_shift")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise InputError(f"{self._path}: pickle refers to {module}.{name}, which is not a numpy array; "
                         "only numpy arrays (in tuples/lists/dicts) are loaded, re-save the data with "
                         "numpy arrays only")


def _check_plain(obj, path: Path) -> None:
    """Refuse anything that is not a non-object numpy array, scalar or container of them."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise InputError(f"{path}: pickle holds an object-dtype array; only numeric numpy arrays are "
                             "loaded, re-save it with a numeric dtype")
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _check_plain(item, path)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, path)
            _check_plain(value, path)
    elif not isinstance(obj, _PLAIN):
        raise InputError(f"{path}: pickle holds a {type(obj).__name__}; only numpy arrays (in "
                         "tuples/lists/dicts) are loaded")


def load_pickle(path: str | os.PathLike):
    """Load a pickle that may contain only numpy arrays/scalars inside tuples, lists and dicts."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; check the path")
    data = path.read_bytes()
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), path).load()
    except InputError:
        raise
    except Exception as exc:  # a damaged stream raises many types (UnpicklingError, EOFError, ...)
        raise InputError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc}); re-create the "
                         "file") from exc
    _check_plain(obj, path)
    return obj


def save_pickle(path: str | os.PathLike, obj) -> None:
    """Pickle ``obj`` (numpy arrays in plain containers) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_rows(path: Path, what: str, rows: int, n: int | None) -> None:
    if n is not None and rows != n:
        raise InputError(f"{path}: {what} has {rows} rows but the stack has {n} images; pass the {what} "
                         "file made for these particles")


def _check_rotations(path: Path, rot: np.ndarray) -> None:
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise InputError(f"{path}: rotations must have shape (N, 3, 3), got {rot.shape}; expected a "
                         "cryoDRGN poses pickle (rot, trans)")
    if not np.all(np.isfinite(rot)):
        raise InputError(f"{path}: rotations contain NaN or inf; re-create the poses file")
    # A rotation is orthonormal with determinant +1; a reflection or a non-rotation means the file is
    # not what it claims (e.g. Euler angles or a different array).
    rot64 = rot.astype(np.float64)
    ortho = np.abs(rot64 @ rot64.transpose(0, 2, 1) - np.eye(3)).max() if len(rot) else 0.0
    det = np.linalg.det(rot64) if len(rot) else np.ones(0)
    if ortho > 1e-3 or np.any(det < 0):
        raise InputError(f"{path}: rotations are not proper rotation matrices (max |R Rᵀ - I| = "
                         f"{ortho:.2g}, min det = {det.min():.3g}); check the poses file")


def load_poses(path: str | os.PathLike, n: int | None = None, D: int | None = None):
    """Load cryoDRGN poses: ``(rot (N, 3, 3) float32, trans_px (N, 2) float32 or None)``.

    Accepts a ``(rot, trans)`` tuple (trans as a fraction of the box, multiplied by ``D`` here, so ``D``
    is required then) or a bare rotation array (``trans_px`` is None). ``n`` checks the row count.
    """
    path = Path(path)
    obj = load_pickle(path)
    if isinstance(obj, (tuple, list)):
        if len(obj) not in (1, 2):
            raise InputError(f"{path}: a poses pickle is (rot, trans) or rot alone, got a sequence of "
                             f"{len(obj)} items")
        rot = np.asarray(obj[0])
        trans = np.asarray(obj[1]) if len(obj) == 2 else None
    elif isinstance(obj, np.ndarray):
        rot, trans = obj, None
    else:
        raise InputError(f"{path}: a poses pickle is (rot, trans) or rot alone, got {type(obj).__name__}")
    _check_rotations(path, rot)
    _check_rows(path, "poses", len(rot), n)
    if trans is None:
        return rot.astype(np.float32), None
    if trans.shape != (len(rot), 2):
        raise InputError(f"{path}: translations must have shape ({len(rot)}, 2), got {trans.shape}")
    if not np.all(np.isfinite(trans)):
        raise InputError(f"{path}: translations contain NaN or inf; re-create the poses file")
    if np.abs(trans).max(initial=0.0) > 1.0:
        raise InputError(f"{path}: translations up to {np.abs(trans).max():.3g} exceed the box; cryoDRGN "
                         "poses store trans as a fraction of the box, divide pixel shifts by D")
    if D is None:
        raise InputError(f"{path}: poses store shifts as a fraction of the box, so the box size is needed "
                         "to convert them; pass D")
    return rot.astype(np.float32), (trans * D).astype(np.float32)


def load_ctf(path: str | os.PathLike, n: int | None = None) -> np.ndarray:
    """Load a cryoDRGN CTF pickle ``(N, 9)`` float32 (columns in ``CTF_COLUMNS``); ``n`` checks rows."""
    path = Path(path)
    obj = load_pickle(path)
    if not isinstance(obj, np.ndarray) or obj.ndim != 2 or obj.shape[1] != 9:
        shape = obj.shape if isinstance(obj, np.ndarray) else type(obj).__name__
        raise InputError(f"{path}: a CTF pickle is an (N, 9) array [D, apix, dfU, dfV, dfAng, kV, Cs, w, "
                         f"phase], got {shape}")
    _check_rows(path, "CTF", len(obj), n)
    ctf = obj.astype(np.float32)
    if not np.all(np.isfinite(ctf)):
        raise InputError(f"{path}: CTF parameters contain NaN or inf; re-create the CTF file")
    if len(ctf) and (np.any(ctf[:, 0] < 1) or np.any(ctf[:, 1] <= 0)):
        raise InputError(f"{path}: CTF columns 0 (box size D) and 1 (apix) must be positive; check the "
                         "column order [D, apix, dfU, dfV, dfAng, kV, Cs, w, phase]")
    return ctf


def save_poses(path: str | os.PathLike, rot, trans_px=None, D: int | None = None) -> None:
    """Write cryoDRGN poses: ``(rot float32, trans_px / D float32)``, or ``rot`` alone if no shifts."""
    rot = _as_numpy(rot).astype(np.float32)
    if trans_px is None:
        save_pickle(path, rot)
        return
    if D is None:
        raise ValueError("save_poses needs the box size D to store shifts as a fraction of the box")
    trans = _as_numpy(trans_px).astype(np.float64) / D
    save_pickle(path, (rot, trans.astype(np.float32)))


def save_ctf(path: str | os.PathLike, ctf) -> None:
    """Write a cryoDRGN CTF pickle, an ``(N, 9)`` float32 array."""
    ctf = _as_numpy(ctf).astype(np.float32)
    if ctf.ndim != 2 or ctf.shape[1] != 9:
        raise ValueError(f"save_ctf expects (N, 9) CTF parameters, got {ctf.shape}")
    save_pickle(path, ctf)
