"""cryoSPARC ``.cs`` particle files (numpy structured arrays, loaded without pickle).

Conventions (pinned against cryoDRGN's ``pose.cs.pkl`` / ``ctf2.pkl`` in tests/test_io_cryosparc.py):
- ``alignments3D/pose`` is an axis-angle vector (radians); the project's pose matrix is the TRANSPOSE of
  its rotation matrix.
- ``alignments3D/shift`` (pixels) is the project's ``trans_px`` as is (same sign), as cryoDRGN reads it.
  Like cryoDRGN, the shift is taken in pixels of the particle blob.
- ``ctf/df_angle_rad`` and ``ctf/phase_shift_rad`` are radians; the CTF array stores degrees.
- ``blob/path`` may start with '>' (cryoSPARC's marker for a path inside the project); it is dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cryobench_lab.errors import InputError
from cryobench_lab.physics.rotations import axis_angle_to_matrix


def _field(cs: np.ndarray, name: str) -> np.ndarray | None:
    return cs[name] if name in (cs.dtype.names or ()) else None


def _uniform(path: Path, values: np.ndarray, what: str, rtol: float) -> float:
    values = np.asarray(values, dtype=np.float64)
    if np.ptp(values) > rtol * np.abs(values).max():
        raise InputError(f"{path}: particles have different {what} ({values.min():g} to {values.max():g}); "
                         "split the particles so each set has one value")
    return float(values[0])


def read_cs(path: str | os.PathLike) -> dict:
    """Read a cryoSPARC particle ``.cs`` file.

    Returns a dict with (None where the file lacks the fields):
    ``paths`` list[str] stack paths as written (relative to the cryoSPARC project), ``indices`` (N,) int64
    0-based, ``D`` int box size, ``apix`` float Å, ``rot`` (N, 3, 3) float32, ``trans_px`` (N, 2) float32,
    ``ctf`` (N, 9) float32 in cryoDRGN layout, ``n`` int.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; check the path")
    try:
        cs = np.load(path, allow_pickle=False)
    except Exception as exc:  # np.load raises ValueError/OSError/UnpicklingError on foreign files
        raise InputError(f"{path}: not a readable cryoSPARC .cs file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(cs, np.ndarray) or cs.dtype.names is None or cs.ndim != 1:
        raise InputError(f"{path}: a cryoSPARC .cs file is a 1D numpy structured array; got something else")
    n = len(cs)
    out: dict = {"n": n, "paths": None, "indices": None, "D": None, "apix": None, "rot": None,
                 "trans_px": None, "ctf": None}

    blob_path = _field(cs, "blob/path")
    if blob_path is not None:
        decoded = [p.decode() if isinstance(p, bytes) else str(p) for p in blob_path]
        out["paths"] = [p.removeprefix(">") for p in decoded]
    if _field(cs, "blob/idx") is not None:
        out["indices"] = cs["blob/idx"].astype(np.int64)
    shape = _field(cs, "blob/shape")
    if shape is not None and n:
        shape = np.asarray(shape).reshape(n, -1)
        if not (np.all(shape == shape[0]) and shape[0, 0] == shape[0, -1]):
            raise InputError(f"{path}: blob/shape is not one square box for all particles "
                             f"(first {tuple(shape[0])}); re-extract with one square box size")
        out["D"] = int(shape[0, 0])
    if _field(cs, "blob/psize_A") is not None and n:
        out["apix"] = _uniform(path, cs["blob/psize_A"], "blob/psize_A", 1e-3)

    pose = _field(cs, "alignments3D/pose")
    if pose is not None:
        rotvec = torch.tensor(np.asarray(pose, dtype=np.float64))  # (N, 3) radians
        out["rot"] = axis_angle_to_matrix(rotvec).transpose(-1, -2).numpy().astype(np.float32)
    shift = _field(cs, "alignments3D/shift")
    if shift is not None:
        out["trans_px"] = np.asarray(shift, dtype=np.float32).reshape(n, 2)

    if _field(cs, "ctf/df1_A") is not None:
        if out["D"] is None or out["apix"] is None:
            raise InputError(f"{path}: CTF fields without blob/shape and blob/psize_A; the CTF needs the box "
                             "size and pixel size, pass a CTF pickle instead")
        required = ["ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast"]
        missing = [f for f in required if _field(cs, f) is None]
        if missing:
            raise InputError(f"{path}: CTF fields {missing} are missing; pass a CTF pickle instead")
        phase = _field(cs, "ctf/phase_shift_rad")
        columns = [
            np.full(n, float(out["D"])),
            np.full(n, out["apix"]),
            cs["ctf/df1_A"],
            cs["ctf/df2_A"],
            np.rad2deg(cs["ctf/df_angle_rad"].astype(np.float64)),
            cs["ctf/accel_kv"],
            cs["ctf/cs_mm"],
            cs["ctf/amp_contrast"],
            np.zeros(n) if phase is None else np.rad2deg(phase.astype(np.float64)),
        ]
        out["ctf"] = np.stack([np.asarray(c, dtype=np.float64) for c in columns], 1).astype(np.float32)
    return out
