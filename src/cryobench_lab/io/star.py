"""RELION STAR files (``starfile``): particle tables, image locations, poses and CTF.

``read_star`` returns one particle table per file whatever the RELION version: 3.0 (a single loop) or 3.1+
(``data_optics`` + ``data_particles``, in either order, RELION 5 included) with each particle's optics
columns joined on by ``rlnOpticsGroup``. Column names are as starfile gives them (``rlnAngleRot``, ...).

Conventions (docs/conventions.md): ``rlnImageName`` is ``index@path`` with a 1-based index (a bare path is
image 0 of a single-image file); Euler angles map to pose matrices via ``physics.rotations``; shifts are
``rlnOriginX/YAngst`` in Å (3.1+) or ``rlnOriginX/Y`` in pixels (3.0), stored with the same sign as the
project's ``trans_px`` (the shift that re-centres the image).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import atomic_path
from cryobench_lab.physics.rotations import euler_to_matrix, matrix_to_euler

# RELION 3.1+ labels that belong to the optics table (per optics group, not per particle).
OPTICS_COLUMNS = (
    "rlnOpticsGroupName", "rlnAmplitudeContrast", "rlnSphericalAberration", "rlnVoltage",
    "rlnImagePixelSize", "rlnMicrographOriginalPixelSize", "rlnMicrographPixelSize", "rlnImageSize",
    "rlnImageDimensionality", "rlnCtfDataAreCtfPremultiplied", "rlnBeamTiltX", "rlnBeamTiltY",
    "rlnOddZernike", "rlnEvenZernike", "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11",
    "rlnMtfFileName", "rlnMicrographBinning",
)
ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
# cryoDRGN's parse_ctf_star uses w = 0.1 when a star has no rlnAmplitudeContrast (the PfCRT star and its
# ctf1.pkl show it); the same default keeps CTFs identical to cryoDRGN's on such files.
DEFAULT_AMPLITUDE_CONTRAST = 0.1


def _name(df: pd.DataFrame) -> str:
    """The file a table came from, for error messages."""
    return df.attrs.get("star_path", "star file")


def read_star_blocks(path: str | os.PathLike) -> dict:
    """All data blocks of any STAR file: ``{block name: DataFrame (loop) or dict (key/value)}``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; check the path")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted parser errors on malformed text
        raise InputError(f"{path}: not a readable STAR file ({type(exc).__name__}: {exc})") from exc
    if not blocks:
        raise InputError(f"{path}: no data blocks found; is this a STAR file?")
    return blocks


def read_star(path: str | os.PathLike) -> pd.DataFrame:
    """The particle table of a RELION STAR file, optics columns joined on (see module docstring).

    The table keeps the file's row order; ``df.attrs['star_path']`` records the file and
    ``df.attrs['optics_columns']`` the columns that came from the optics block.
    """
    path = Path(path)
    blocks = read_star_blocks(path)
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    if "particles" in tables:
        particles = tables["particles"]
    else:
        with_images = [k for k, v in tables.items() if k != "optics" and "rlnImageName" in v.columns]
        if not with_images:
            raise InputError(f"{path}: no particle table (a loop with rlnImageName) in blocks "
                             f"{list(blocks)}; pass a particle STAR file")
        if len(with_images) > 1:
            raise InputError(f"{path}: several tables with rlnImageName ({', '.join(with_images)}) and none "
                             "named data_particles; keep one particle table per file")
        particles = tables[with_images[0]]
    particles = particles.reset_index(drop=True).copy()
    optics_columns: list[str] = []
    optics = tables.get("optics")
    if optics is not None and len(optics):
        if "rlnOpticsGroup" not in optics.columns:
            raise InputError(f"{path}: data_optics has no rlnOpticsGroup column; the file is malformed")
        if "rlnOpticsGroup" not in particles.columns:
            if len(optics) != 1:
                raise InputError(f"{path}: particles have no rlnOpticsGroup but data_optics has "
                                 f"{len(optics)} groups; add rlnOpticsGroup to the particles")
            particles["rlnOpticsGroup"] = optics["rlnOpticsGroup"].iloc[0]
        table = optics.set_index("rlnOpticsGroup")
        missing = set(particles["rlnOpticsGroup"].unique()) - set(table.index)
        if missing:
            raise InputError(f"{path}: particles use optics groups {sorted(missing)} that data_optics does "
                             "not define; fix the optics table")
        for col in table.columns:
            if col not in particles.columns:  # a per-particle value overrides its group's
                particles[col] = particles["rlnOpticsGroup"].map(table[col]).to_numpy()
                optics_columns.append(col)
    particles.attrs["star_path"] = str(path)
    particles.attrs["optics_columns"] = optics_columns
    return particles


def _parse_image_names(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``rlnImageName`` → (relative paths (N,) object, 0-based indices (N,) int64)."""
    if "rlnImageName" not in df.columns:
        raise InputError(f"{_name(df)}: no rlnImageName column; a particle STAR file needs it")
    names = df["rlnImageName"].astype(str).to_numpy()
    paths = np.empty(len(names), dtype=object)
    indices = np.zeros(len(names), dtype=np.int64)
    for row, name in enumerate(names):
        index, sep, file = name.partition("@")
        if not sep:  # a bare path: the single image of that file
            paths[row] = name
            continue
        try:
            indices[row] = int(index) - 1
        except ValueError:
            raise InputError(f"{_name(df)}: row {row + 1} rlnImageName {name!r} is not index@path") from None
        if indices[row] < 0:
            raise InputError(f"{_name(df)}: row {row + 1} rlnImageName {name!r} has index < 1 (indices "
                             "are 1-based)")
        paths[row] = file
    return paths, indices


def resolve_path(name: str, base: Path) -> Path:
    """Absolute path of a file named in a metadata file, relative to ``base``.

    The exact path is used when it exists; otherwise ``base / basename`` when that exists (cryoDRGN's
    fallback for stars written in another project folder); otherwise the exact path (so the caller's
    "not found" message names what was expected).
    """
    exact = base / name
    if not exact.exists():
        flat = base / Path(name).name
        if flat.exists():
            return Path(os.path.abspath(flat))
    return Path(os.path.abspath(exact))


def image_locations(
    df: pd.DataFrame, star_path: str | os.PathLike, datadir: str | os.PathLike | None = None
) -> tuple[list[str], np.ndarray]:
    """Absolute stack path and 0-based index of each row's image, from ``rlnImageName``.

    Relative paths are resolved against ``datadir`` if given, else the star file's folder.
    """
    names, indices = _parse_image_names(df)
    base = Path(datadir) if datadir is not None else Path(star_path).resolve().parent
    resolved = {name: str(resolve_path(name, base)) for name in pd.unique(names)}
    return [resolved[name] for name in names], indices


def _unique_value(df: pd.DataFrame, values, what: str, rtol: float = 1e-3) -> float:
    """The first row's value of a column that should be the same for all particles.

    Values spread by more than ``rtol`` (relative) raise InputError.
    """
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise InputError(f"{_name(df)}: {what} has missing or non-numeric values; fix the star file")
    lo, hi = values.min(), values.max()
    if hi - lo > rtol * abs(hi):
        raise InputError(f"{_name(df)}: particles have different {what} ({lo:g} to {hi:g}); split the "
                         "star file by optics group and process each separately")
    return float(values[0])


# Optics groups of one session often differ slightly in pixel size after magnification-anisotropy
# correction (the real 6-group file in the tests spans 1.24-1.25 Å); RELION refines such groups together.
# Up to this spread the first particle's pixel size is used, as cryoDRGN does; more means different data.
APIX_SPREAD = 0.01


def star_apix(df: pd.DataFrame) -> float | None:
    """Pixel size in Å: ``rlnImagePixelSize``, else ``rlnDetectorPixelSize`` (µm) · 1e4 /
    ``rlnMagnification``, else None. The first particle's value; a spread over ``APIX_SPREAD`` across
    particles raises InputError."""
    if len(df) == 0:
        return None
    if "rlnImagePixelSize" in df.columns:
        return _unique_value(df, df["rlnImagePixelSize"], "rlnImagePixelSize", APIX_SPREAD)
    if "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        apix = df["rlnDetectorPixelSize"].astype(float) * 1e4 / df["rlnMagnification"].astype(float)
        return _unique_value(df, apix, "pixel size (rlnDetectorPixelSize/rlnMagnification)", APIX_SPREAD)
    return None


def star_box_size(df: pd.DataFrame) -> int | None:
    """Box size in pixels from ``rlnImageSize``, or None when the star does not give it."""
    if len(df) == 0 or "rlnImageSize" not in df.columns:
        return None
    return round(_unique_value(df, df["rlnImageSize"], "rlnImageSize"))


def has_poses(df: pd.DataFrame) -> bool:
    """True when the table has all three Euler angle columns."""
    return all(c in df.columns for c in ANGLE_COLUMNS)


def poses_from_star(df: pd.DataFrame, apix: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Poses of every row: ``(rot (N, 3, 3) float32, trans_px (N, 2) float32)``.

    Shifts: ``rlnOriginX/YAngst`` (Å) ÷ ``apix``, else ``rlnOriginX/Y`` (px), else zeros.
    """
    missing = [c for c in ANGLE_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{_name(df)}: no {', '.join(missing)} column(s), so no poses; pass a poses "
                         "pickle or a refined star file")
    euler = torch.tensor(df[list(ANGLE_COLUMNS)].to_numpy(dtype=np.float64))  # (N, 3)
    rot = euler_to_matrix(euler).numpy().astype(np.float32)  # (N, 3, 3)
    if "rlnOriginXAngst" in df.columns or "rlnOriginYAngst" in df.columns:
        if apix is None or not apix > 0:
            raise InputError(f"{_name(df)}: shifts are in Å (rlnOriginXAngst) but the pixel size is "
                             "unknown; pass data.apix=")
        trans = np.stack([_column(df, "rlnOriginXAngst"), _column(df, "rlnOriginYAngst")], 1) / apix
    elif "rlnOriginX" in df.columns or "rlnOriginY" in df.columns:
        trans = np.stack([_column(df, "rlnOriginX"), _column(df, "rlnOriginY")], 1)
    else:
        trans = np.zeros((len(df), 2))
    return rot, trans.astype(np.float32)


def _column(df: pd.DataFrame, col: str, default: float | None = 0.0) -> np.ndarray:
    """A numeric column as float64 ``(N,)``; ``default`` fills a missing column (None: required)."""
    if col not in df.columns:
        if default is None:
            raise InputError(f"{_name(df)}: no {col} column; the CTF needs it, add it or pass a CTF pickle")
        return np.full(len(df), default, dtype=np.float64)
    values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise InputError(f"{_name(df)}: column {col} has missing or non-numeric values; fix the star file")
    return values


def has_ctf(df: pd.DataFrame) -> bool:
    """True when the table has defocus values."""
    return "rlnDefocusU" in df.columns


def ctf_from_star(df: pd.DataFrame, D: int, apix: float) -> np.ndarray:
    """cryoDRGN CTF array ``(N, 9)`` float32: ``[D, apix, dfU, dfV, dfAngle, kV, Cs, w, phase]``.

    Required: rlnDefocusU/V/Angle, rlnVoltage, rlnSphericalAberration. A missing rlnPhaseShift is 0 and a
    missing rlnAmplitudeContrast is ``DEFAULT_AMPLITUDE_CONTRAST`` (0.1, as cryoDRGN).
    """
    n = len(df)
    columns = [
        np.full(n, float(D)),
        np.full(n, float(apix)),
        _column(df, "rlnDefocusU", None),
        _column(df, "rlnDefocusV", None),
        _column(df, "rlnDefocusAngle", None),
        _column(df, "rlnVoltage", None),
        _column(df, "rlnSphericalAberration", None),
        _column(df, "rlnAmplitudeContrast", DEFAULT_AMPLITUDE_CONTRAST),
        _column(df, "rlnPhaseShift", 0.0),
    ]
    return np.stack(columns, 1).astype(np.float32)  # (N, 9)


def _split_optics(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a merged particle table into (optics, particles).

    The table's own ``rlnOpticsGroup`` numbering (and names) is kept when each group has one set of
    optics values; otherwise there is one group per distinct combination of optics values.
    """
    df = df.copy()
    if "rlnImagePixelSize" not in df.columns and {"rlnDetectorPixelSize", "rlnMagnification"} <= set(df):
        # RELION 3.0 pixel size → the 3.1 optics label (what relion_convert_star does).
        df["rlnImagePixelSize"] = df["rlnDetectorPixelSize"].astype(float) * 1e4 / df["rlnMagnification"]
        df = df.drop(columns=["rlnDetectorPixelSize", "rlnMagnification"])
    if {"rlnOriginX", "rlnOriginY"} <= set(df) and "rlnImagePixelSize" in df.columns:
        for axis in "XY":
            df[f"rlnOrigin{axis}Angst"] = df.pop(f"rlnOrigin{axis}").astype(float) * df["rlnImagePixelSize"]
    cols = set(OPTICS_COLUMNS) | set(df.attrs.get("optics_columns", ()))
    optics_cols = [c for c in df.columns if c in cols and c not in ("rlnOpticsGroup", "rlnOpticsGroupName")]
    if optics_cols:
        # Array-valued labels (Zernike lists) arrive as text, so every column is hashable.
        codes = df.groupby(optics_cols, sort=False, dropna=False).ngroup().to_numpy()
    else:
        codes = np.zeros(len(df), dtype=np.int64)
    first_rows = pd.Series(np.arange(len(df))).groupby(codes).first().to_numpy()
    optics = df.iloc[first_rows].reset_index(drop=True)
    own = df["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in df.columns else None
    keep_numbering = False
    if own is not None:
        # The existing numbering is usable when groups and value combinations correspond one to one.
        pairs = set(zip(own.tolist(), codes.tolist()))
        keep_numbering = len(pairs) == len(first_rows) == len(set(own.tolist()))
    if keep_numbering:
        group_ids = optics["rlnOpticsGroup"].to_numpy()
        particle_groups = own
    else:
        group_ids = np.arange(1, len(first_rows) + 1)
        particle_groups = codes + 1
    names = (optics["rlnOpticsGroupName"].to_numpy() if keep_numbering and "rlnOpticsGroupName" in optics
             else [f"opticsGroup{g}" for g in group_ids])
    optics = optics[optics_cols]
    optics.insert(0, "rlnOpticsGroup", group_ids)
    optics.insert(1, "rlnOpticsGroupName", names)
    if "rlnImageDimensionality" not in optics.columns:
        optics["rlnImageDimensionality"] = 2
    optics = optics.sort_values("rlnOpticsGroup", kind="stable").reset_index(drop=True)
    particles = df.drop(columns=optics_cols + [c for c in ("rlnOpticsGroupName",) if c in df.columns])
    particles["rlnOpticsGroup"] = particle_groups
    return optics, particles


def write_star(path: str | os.PathLike, df_particles: pd.DataFrame, optics: pd.DataFrame | None = None) -> None:
    """Write a RELION 3.1 particle STAR file (``data_optics`` + ``data_particles``) atomically.

    With ``optics`` given, both tables are written as they are. Without it, the optics columns of
    ``df_particles`` (``OPTICS_COLUMNS`` plus any ``read_star`` joined on) are moved into an optics table,
    one group per distinct combination; RELION 3.0 pixel-size and pixel-shift labels are converted to
    ``rlnImagePixelSize`` and ``rlnOriginX/YAngst`` on the way.
    """
    if optics is None:
        optics, particles = _split_optics(df_particles)
    else:
        particles = df_particles.copy()
        if "rlnOpticsGroup" not in particles.columns:
            if len(optics) != 1:
                raise ValueError("write_star: particles need rlnOpticsGroup when optics has several groups")
            particles["rlnOpticsGroup"] = optics["rlnOpticsGroup"].iloc[0]
    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": particles}, tmp, float_format="%.6f")


def write_particle_star(
    path: str | os.PathLike,
    image_names: list[str],
    rot,
    trans_px,
    ctf,
    apix: float,
    D: int,
    labels=None,
    extra: dict | None = None,
) -> None:
    """Write a RELION 3.1 particle STAR file from arrays, atomically.

    ``image_names`` are ``index@path`` strings (1-based index); ``rot`` (N, 3, 3) pose matrices → Euler
    angles (degrees); ``trans_px`` (N, 2) px → ``rlnOriginX/YAngst`` (× apix); ``ctf`` (N, 9) cryoDRGN
    layout (its D and apix columns must match ``D`` and ``apix``); ``labels`` (N,) 0-based →
    ``rlnClassNumber`` (1-based); ``extra`` further per-particle columns ``{label: (N,) values}``. ``rot``, ``trans_px``, ``ctf`` may be None to leave those columns out.
    Voltage, Cs and amplitude contrast go to the optics table.
    """
    df = pd.DataFrame({"rlnImageName": list(image_names)})
    n = len(df)
    if rot is not None:
        rot = torch.as_tensor(np.asarray(rot), dtype=torch.float64)
        euler = matrix_to_euler(rot).numpy()  # (N, 3) degrees
        for k, col in enumerate(ANGLE_COLUMNS):
            df[col] = euler[:, k]
    if trans_px is not None:
        trans = np.asarray(trans_px, dtype=np.float64) * apix  # (N, 2) Å
        df["rlnOriginXAngst"] = trans[:, 0]
        df["rlnOriginYAngst"] = trans[:, 1]
    if ctf is not None:
        ctf = np.asarray(ctf, dtype=np.float64)
        if ctf.shape != (n, 9):
            raise ValueError(f"write_particle_star: ctf must be ({n}, 9), got {ctf.shape}")
        if not (np.allclose(ctf[:, 0], D) and np.allclose(ctf[:, 1], apix, rtol=1e-4)):
            raise ValueError(f"write_particle_star: ctf columns D/apix ({ctf[0, 0]:g}, {ctf[0, 1]:g}) do not "
                             f"match D={D}, apix={apix}")
        for k, col in enumerate(("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
                                 "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnPhaseShift"), start=2):
            df[col] = ctf[:, k]
    if labels is not None:
        df["rlnClassNumber"] = np.asarray(labels, dtype=np.int64) + 1
    for label, values in (extra or {}).items():
        df[label] = np.asarray(values)
    df["rlnImagePixelSize"] = float(apix)
    df["rlnImageSize"] = int(D)
    write_star(path, df)
